"""`worker doctor`: preflight checks against models.yaml, on scripted GPUs, disks, ports and registries."""

from __future__ import annotations

import argparse
import http.server
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pynvml
import pytest

from worker.cli import doctor
from worker.config import NodeConfig
from worker.gpu import FakeGpu, FakeNvmlBackend

GIB = 1024**3
PRICES = {"prompt_per_mtok": "0.1", "completion_per_mtok": "0.2"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("WORKER_", "HF_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def write_config(tmp_path: Path, *models: dict[str, Any], port: int | None = None) -> Path:
    path = tmp_path / "models.yaml"
    worker = {"id": "w", "host": "127.0.0.1", "port": port or free_port()}
    path.write_bytes(orjson.dumps({"worker": worker, "models": list(models)}))  # JSON is YAML
    return path


def vllm_model(model_id: str = "org/Model-8B", **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "source": model_id, "quantization": "bf16", "pricing": PRICES, **extra}


def mock_model(model_id: str = "tiny") -> dict[str, Any]:
    return {"id": model_id, "engine": "mock", "source": model_id, "quantization": "bf16", "pricing": PRICES}


def no_driver() -> FakeNvmlBackend:
    return FakeNvmlBackend(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


def gpus(*used_gib: float, total_gib: float = 80) -> FakeNvmlBackend:
    return FakeNvmlBackend([FakeGpu(uuid=f"GPU-{i}", memory_total_bytes=int(total_gib * GIB),
                                    memory_used_bytes=int(used * GIB)) for i, used in enumerate(used_gib)])


def probes(nvml: FakeNvmlBackend, *, disk_free_gib: float = 1000, vllm: bool = True) -> doctor.Probes:
    return doctor.Probes(nvml=nvml, disk_free=lambda _: int(disk_free_gib * GIB),
                         import_check=lambda python, module: (True, "0.32.0") if vllm
                         else (False, "ModuleNotFoundError: No module named 'vllm'"))


def run_doctor(config: Path, probe: doctor.Probes, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="worker")
    doctor.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", "--config", str(config), *argv])
    return args.handler(args, probe)


def checks_of(capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    document = orjson.loads(capsys.readouterr().out)
    return {check["name"]: check for check in document["checks"]}


def test_mock_models_pass_on_a_node_without_gpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, mock_model())
    assert run_doctor(config, probes(no_driver(), vllm=False), "--json") == 0
    checks = checks_of(capsys)
    assert [name for name in checks] == ["python", "config", "listing", "nvml", "gpus", "gpu_memory", "disk",
                                         "port", "registry", "vllm"]
    assert {check["status"] for check in checks.values()} <= {"PASS", "SKIP"}
    assert checks["vllm"]["status"] == "SKIP"  # no vLLM model: vllm need not be importable


def test_vllm_models_fail_without_gpus_and_pass_as_mock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, vllm_model(replicas=2))
    assert run_doctor(config, probes(no_driver())) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("FAIL") and " gpus " in line and "need 2 GPU(s)" in line for line in lines)
    assert any(line.startswith("FAIL") and " nvml " in line for line in lines)
    assert lines[-1] == "doctor: 2 FAIL, 0 WARN"

    assert run_doctor(config, probes(no_driver(), vllm=False), "--engine", "mock", "--json") == 0
    document_checks = checks_of(capsys)
    assert document_checks["gpus"]["status"] == "PASS"
    assert document_checks["vllm"]["status"] == "SKIP"


def test_json_document_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, vllm_model())
    assert run_doctor(config, probes(no_driver()), "--json") == 1
    document = orjson.loads(capsys.readouterr().out)
    assert document["ok"] is False
    for check in document["checks"]:
        assert set(check) == {"name", "status", "message", "detail"}
        assert check["status"] in {"PASS", "WARN", "FAIL", "SKIP"}
    assert {c["name"]: c for c in document["checks"]}["gpus"]["detail"] == {"needed": 1, "present": 0, "gpus": []}


def test_too_few_gpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, vllm_model(gpus_per_replica=2))
    assert run_doctor(config, probes(gpus(1.0)), "--json") == 1
    checks = checks_of(capsys)
    assert checks["nvml"]["status"] == "PASS"
    assert checks["gpus"]["status"] == "FAIL" and "need 2 GPU(s); this node has 1" in checks["gpus"]["message"]


@pytest.mark.parametrize(
    ("model", "used_gib", "status", "phrase"),
    [
        (vllm_model("org/Model-8B"), (1.0,), "PASS", "enough free GPU memory"),
        # Something else holds 20 GiB: 60 free < 0.9 x 80 that vLLM asks for.
        (vllm_model("org/Model-8B"), (20.0,), "FAIL", "60.0 GiB free"),
        (vllm_model("org/Model-8B", engine_args={"gpu_memory_utilization": 0.7}), (20.0,), "PASS", "enough"),
        (vllm_model("org/Model-70B"), (1.0,), "FAIL", "exceed"),  # 140 GB of bf16 weights on one GPU
        (vllm_model("org/Model-70B", gpus_per_replica=2), (1.0, 1.0), "WARN", "little of"),  # 70 GB per GPU
        (vllm_model("org/Model-70B", gpus_per_replica=2, quantization="fp8"), (1.0, 1.0), "PASS", "enough"),
        (vllm_model("org/mystery"), (1.0,), "WARN", "size unknown"),
    ],
)
def test_gpu_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str], model: dict[str, Any],
                    used_gib: tuple[float, ...], status: str, phrase: str) -> None:
    config = write_config(tmp_path, model)
    run_doctor(config, probes(gpus(*used_gib)), "--json")
    check = checks_of(capsys)["gpu_memory"]
    assert check["status"] == status, check
    assert phrase in check["message"]


def test_disk_space_for_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, vllm_model("org/Model-8B"))  # ~16 GB of bf16 weights
    run_doctor(config, probes(gpus(1.0), disk_free_gib=10), "--json")
    disk = checks_of(capsys)["disk"]
    assert disk["status"] == "FAIL" and str(tmp_path / "hf" / "hub") in disk["message"]
    assert disk["detail"]["needed_bytes"] == 16_000_000_000

    run_doctor(config, probes(gpus(1.0), disk_free_gib=100), "--json")
    assert checks_of(capsys)["disk"]["status"] == "PASS"

    # Already downloaded into the Hugging Face cache: nothing more to fit.
    (tmp_path / "hf" / "hub" / "models--org--Model-8B" / "snapshots" / "abc").mkdir(parents=True)
    run_doctor(config, probes(gpus(1.0), disk_free_gib=1), "--json")
    disk = checks_of(capsys)["disk"]
    assert disk["status"] == "PASS" and "already" in disk["message"]

    unknown = write_config(tmp_path, vllm_model("org/mystery"))
    run_doctor(unknown, probes(gpus(1.0), disk_free_gib=10), "--json", "--min-free-disk-gib", "50")
    assert checks_of(capsys)["disk"]["status"] == "WARN"


def test_local_weights_are_measured(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"\0" * 1000)
    (weights / "config.json").write_text("{}")
    model = NodeConfig.model_validate({"worker": {"id": "w"}, "models": [
        {"id": "m", "source": str(weights), "pricing": PRICES}]}).models[0]
    assert doctor.estimate_weight_bytes(model) == 1000


def test_busy_port_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        config = write_config(tmp_path, mock_model(), port=port)
        assert run_doctor(config, probes(no_driver()), "--json") == 1
        port_check = checks_of(capsys)["port"]
        assert port_check["status"] == "FAIL" and "already in use" in port_check["message"]
        # --port checks the port `worker serve --port` would use instead.
        other = free_port()
        assert run_doctor(config, probes(no_driver()), "--json", "--port", str(other)) == 0
        assert checks_of(capsys)["port"]["detail"] == {"host": "127.0.0.1", "port": other}


class _Status(http.server.BaseHTTPRequestHandler):
    """Answers every GET with `status`; each test server gets a subclass of its own (see `http_server`)."""

    status: ClassVar[int] = 200
    seen_authorization: ClassVar[list[str | None]]

    def do_GET(self) -> None:
        type(self).seen_authorization.append(self.headers.get("authorization"))
        self.send_response(type(self).status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, type[_Status]]]:
    handler = type("Handler", (_Status,), {"status": 200, "seen_authorization": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/registry", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_registry_reachability(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                               http_server: tuple[str, type[_Status]]) -> None:
    url, handler = http_server
    config = write_config(tmp_path, mock_model())
    monkeypatch.setenv("WORKER_REGISTRY_URL", url)
    monkeypatch.setenv("WORKER_REGISTRY_TOKEN", "doctor-token")
    assert run_doctor(config, probes(no_driver()), "--json") == 0
    registry = checks_of(capsys)["registry"]
    assert registry["status"] == "PASS"
    assert handler.seen_authorization == ["Bearer doctor-token"]
    assert "doctor-token" not in registry["message"]

    handler.status = 401
    assert run_doctor(config, probes(no_driver()), "--json") == 1
    assert checks_of(capsys)["registry"]["status"] == "FAIL"

    monkeypatch.setenv("WORKER_REGISTRY_URL", f"http://127.0.0.1:{free_port()}/")
    assert run_doctor(config, probes(no_driver()), "--json") == 1
    registry = checks_of(capsys)["registry"]
    assert registry["status"] == "FAIL" and "unreachable" in registry["message"]


def test_vllm_must_be_importable_by_the_engine_python(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, vllm_model())
    assert run_doctor(config, probes(gpus(1.0), vllm=False), "--json") == 1
    vllm = checks_of(capsys)["vllm"]
    assert vllm["status"] == "FAIL" and "No module named 'vllm'" in vllm["message"]
    assert run_doctor(config, probes(gpus(1.0)), "--json") == 0


def test_import_probe_runs_the_given_interpreter() -> None:
    assert doctor._import_in(sys.executable, "json")[0] is True
    ok, output = doctor._import_in(sys.executable, "no_such_module_for_doctor")
    assert not ok and "no_such_module_for_doctor" in output
    assert doctor._import_in("/nonexistent/python", "json")[0] is False


def test_invalid_config_and_old_python(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("worker: {id: w}\nmodels: []\n")
    assert run_doctor(bad, probes(no_driver()), "--json") == 1
    config_check = checks_of(capsys)["config"]
    assert config_check["status"] == "FAIL" and "models" in config_check["message"]
    assert doctor.check_python((3, 10, 12)).status == "FAIL"
    assert doctor.check_python((3, 12, 1)).status == "PASS"


def test_listing_warns_about_quantization_routers_do_not_know(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, {**mock_model(), "quantization": "q3_k_m"})
    assert run_doctor(config, probes(no_driver()), "--json") == 0  # a warning, not a failure
    listing = checks_of(capsys)["listing"]
    assert listing["status"] == "WARN" and listing["detail"] == {"models": ["tiny"]}


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", 8e9),
        ("meta-llama/Llama-3.3-70B-Instruct", 70e9),
        ("Qwen/Qwen2.5-0.5B-Instruct", 0.5e9),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", 56e9),
        ("Qwen/Qwen3-235B-A22B", 235e9),
        ("openai/gpt-oss-120b", 120e9),
        ("BAAI/bge-m3", None),
        ("intfloat/e5-large-560M", 560e6),
        ("org/mystery", None),
    ],
)
def test_parameter_count_from_names(name: str, parameters: float | None) -> None:
    assert doctor.parameter_count(name) == parameters
