"""`worker doctor`: preflight checks against models.yaml, on scripted GPUs, disks, ports and registries."""

from __future__ import annotations

import argparse
import asyncio
import http.server
import os
import socket
import sqlite3
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import huggingface_hub.constants
import orjson
import pynvml
import pytest

from tests.cli.fake_hub import HubState, serve_fake_hub
from worker.billing.store.schema import LATEST_VERSION
from worker.cli import doctor, doctor_weights
from worker.config import NodeConfig
from worker.gpu import FakeGpu, FakeNvmlBackend

GIB = 1024**3
PRICES = {"prompt_per_mtok": "0.1", "completion_per_mtok": "0.2"}
HF_TOKEN = "hf_valid_token_for_the_fake_hub"
ADMIN_TOKEN = "admin-token-0123456789abcdef0123456789"
METRICS_TOKEN = "metrics-token-0123456789abcdef0123456789"
# Read before the tests clear WORKER_* from the environment.
POSTGRES_URL = os.environ.get("WORKER_TEST_POSTGRES_URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def fake_hub() -> Iterator[tuple[str, HubState]]:
    state = HubState()
    with serve_fake_hub(state) as url:
        yield url, state


@pytest.fixture
def hub(fake_hub: tuple[str, HubState]) -> HubState:
    return fake_hub[1]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_hub: tuple[str, HubState]) -> None:
    """A node set up as it should be: tokens, a fresh SQLite ledger, the (fake) hub and a token it knows."""
    for name in list(os.environ):
        if name.startswith(("WORKER_", "HF_", "HUGGING_FACE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads where its token file lives when first imported; no developer's login leaks in.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    url, state = fake_hub
    state.reset()
    state.valid_tokens.add(HF_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("WORKER_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("WORKER_METRICS_TOKEN", METRICS_TOKEN)
    monkeypatch.setenv("WORKER_DB_URL", f"sqlite:///{tmp_path / 'ledger.db'}")


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


def probes(nvml: FakeNvmlBackend, *, disk_free_gib: float = 1000, vllm: bool = True,
           shm_gib: float | None = 64) -> doctor.Probes:
    return doctor.Probes(nvml=nvml, disk_free=lambda _: int(disk_free_gib * GIB),
                         import_check=lambda python, module: (True, "0.32.0") if vllm
                         else (False, "ModuleNotFoundError: No module named 'vllm'"),
                         shm_size=lambda: None if shm_gib is None else int(shm_gib * GIB))


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
    assert list(checks) == ["python", "config", "listing", "nvml", "gpus", "gpu_memory", "disk", "port", "registry",
                            "vllm", "huggingface", "shm", "database", "admin_token", "metrics_token"]
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
    assert doctor_weights.estimate_weight_bytes(model) == 1000


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
    assert doctor_weights.parameter_count(name) == parameters


# -- Hugging Face access (against the fake hub of tests/cli/fake_hub.py) -----------------------------


def huggingface_check(tmp_path: Path, capsys: pytest.CaptureFixture[str], *models: dict[str, Any]) -> dict[str, Any]:
    run_doctor(write_config(tmp_path, *models), probes(gpus(1.0, 1.0)), "--json")
    return checks_of(capsys)["huggingface"]


def test_huggingface_passes_with_a_token_granted_the_gated_repository(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], hub: HubState) -> None:
    hub.gated["meta-llama/Llama-3.1-8B-Instruct"] = {HF_TOKEN}
    check = huggingface_check(tmp_path, capsys, vllm_model("meta-llama/Llama-3.1-8B-Instruct"),
                              vllm_model("org/Public-1B", revision="main"))
    assert check["status"] == "PASS", check
    assert check["detail"]["token"] is True
    assert ("/api/models/meta-llama/Llama-3.1-8B-Instruct/auth-check", HF_TOKEN) in hub.requests
    assert ("/api/models/org/Public-1B/revision/main", HF_TOKEN) in hub.requests
    assert HF_TOKEN not in orjson.dumps(check).decode()


@pytest.mark.parametrize(
    ("setup", "token", "phrase"),
    [
        # Gated, the token's account not granted access: the Hub answers 403 GatedRepo.
        (lambda hub: hub.gated.update({"org/Gated-8B": set()}), HF_TOKEN, "has not been granted access"),
        # Gated and no token at all: 401 GatedRepo.
        (lambda hub: hub.gated.update({"org/Gated-8B": {HF_TOKEN}}), None, "no token is set"),
        (lambda hub: hub.missing.add("org/Gated-8B"), HF_TOKEN, "not found"),
        (lambda hub: None, "hf_revoked_token", "refused the token"),
    ],
    ids=["gated-not-granted", "gated-no-token", "missing", "invalid-token"],
)
def test_huggingface_fails_when_the_weights_cannot_be_downloaded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, hub: HubState,
        setup: Any, token: str | None, phrase: str) -> None:
    setup(hub)
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    config = write_config(tmp_path, vllm_model("org/Gated-8B"))
    assert run_doctor(config, probes(gpus(1.0)), "--json") == 1
    check = checks_of(capsys)["huggingface"]
    assert check["status"] == "FAIL" and phrase in check["message"], check


def test_huggingface_fails_on_an_unknown_revision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check = huggingface_check(tmp_path, capsys, vllm_model("org/Model-8B", revision="no-such-branch"))
    assert check["status"] == "FAIL" and "no revision 'no-such-branch'" in check["message"]


def test_huggingface_warns_without_a_token_when_every_repository_is_public(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, hub: HubState) -> None:
    monkeypatch.delenv("HF_TOKEN")
    check = huggingface_check(tmp_path, capsys, vllm_model("org/Model-8B"))
    assert check["status"] == "WARN" and "no Hugging Face token" in check["message"]
    assert hub.requests and all(token is None for _, token in hub.requests)


def test_huggingface_fails_when_the_hub_is_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    check = huggingface_check(tmp_path, capsys, vllm_model("org/Model-8B"))
    assert check["status"] == "FAIL" and "unreachable" in check["message"]


def test_huggingface_is_skipped_for_local_weights_and_mock_engines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], hub: HubState) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    check = huggingface_check(tmp_path, capsys, {**vllm_model("local"), "source": str(weights)}, mock_model())
    assert check["status"] == "SKIP"
    assert hub.requests == []


def test_huggingface_offline_needs_the_weights_in_the_cache(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, hub: HubState) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check = huggingface_check(tmp_path, capsys, vllm_model("org/Model-8B"))
    assert check["status"] == "FAIL" and "org/Model-8B not in the cache" in check["message"]
    (tmp_path / "hf" / "hub" / "models--org--Model-8B" / "snapshots" / "abc").mkdir(parents=True)
    assert huggingface_check(tmp_path, capsys, vllm_model("org/Model-8B"))["status"] == "PASS"
    assert hub.requests == []


# -- /dev/shm for tensor parallelism -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus_per_replica", "shm_gib", "status"),
    [(2, 4.0, "PASS"), (2, 0.0625, "FAIL"), (2, None, "FAIL"), (1, 0.0625, "PASS")],
    ids=["tensor-parallel-enough", "tensor-parallel-docker-default", "tensor-parallel-no-shm", "one-gpu-small"],
)
def test_shared_memory_for_tensor_parallelism(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              gpus_per_replica: int, shm_gib: float | None, status: str) -> None:
    config = write_config(tmp_path, vllm_model("org/Model-8B", gpus_per_replica=gpus_per_replica))
    run_doctor(config, probes(gpus(1.0, 1.0), shm_gib=shm_gib), "--json")
    check = checks_of(capsys)["shm"]
    assert check["status"] == status, check
    if status == "FAIL":
        assert "need at least 2 GiB" in check["message"] and "org/Model-8B" in check["message"]


def test_shm_size_reads_the_filesystem(tmp_path: Path) -> None:
    assert (doctor.shm_size(tmp_path) or 0) > 0
    assert doctor.shm_size(tmp_path / "missing") is None


# -- billing database --------------------------------------------------------------------------------


def database_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    run_doctor(write_config(tmp_path, mock_model()), probes(no_driver()), "--json")
    return checks_of(capsys)["database"]


def sqlite_at_version(path: Path, version: int) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
                           "applied_at DOUBLE PRECISION NOT NULL)")
        connection.execute("INSERT INTO schema_version VALUES (?, 'test', 0)", (version,))
    connection.close()


def test_database_sqlite_new_current_older_and_newer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = tmp_path / "ledger.db"
    check = database_check(tmp_path, capsys)
    assert check["status"] == "PASS" and "creates it" in check["message"]
    assert not database.exists()  # the doctor creates nothing

    sqlite_at_version(database, LATEST_VERSION)
    check = database_check(tmp_path, capsys)
    assert check["status"] == "PASS" and check["detail"]["schema_version"] == LATEST_VERSION

    database.unlink()
    sqlite_at_version(database, LATEST_VERSION - 1)
    check = database_check(tmp_path, capsys)
    assert check["status"] == "PASS" and f"migrates it to {LATEST_VERSION}" in check["message"]

    database.unlink()
    sqlite_at_version(database, LATEST_VERSION + 1)
    check = database_check(tmp_path, capsys)
    assert check["status"] == "FAIL" and "upgrade the worker" in check["message"]


def test_database_sqlite_that_is_not_a_ledger_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ledger.db").write_bytes(b"this is not a database" * 100)
    check = database_check(tmp_path, capsys)
    assert check["status"] == "FAIL" and "not a database" in check["message"]


def test_database_postgres_unreachable_fails_without_showing_the_password(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_DB_URL", f"postgresql://worker:s3cret-pw@127.0.0.1:{free_port()}/ledger")
    assert run_doctor(write_config(tmp_path, mock_model()), probes(no_driver()), "--json") == 1
    check = checks_of(capsys)["database"]
    assert check["status"] == "FAIL" and "unreachable" in check["message"]
    assert "s3cret-pw" not in orjson.dumps(check).decode()
    assert check["detail"]["url"] == "postgresql://127.0.0.1:" + check["detail"]["url"].rsplit(":", 1)[1]


def test_database_is_skipped_without_a_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_LEDGER", "false")
    monkeypatch.setenv("WORKER_AUTH", "false")
    monkeypatch.setenv("WORKER_DB_URL", f"postgresql://127.0.0.1:{free_port()}/ledger")
    assert database_check(tmp_path, capsys)["status"] == "SKIP"


@pytest.mark.postgres
def test_database_postgres_schema_versions(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if not POSTGRES_URL:
        pytest.fail('WORKER_TEST_POSTGRES_URL is not set: run `eval "$(bash tests/services/postgres.sh)"` first')
    schema = f"doctor_test_{uuid.uuid4().hex[:12]}"

    async def execute(*statements: str) -> None:
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(execute(f"CREATE SCHEMA {schema}"))
    try:
        monkeypatch.setenv("WORKER_DB_URL", f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}search_path={schema}")
        check = database_check(tmp_path, capsys)
        assert check["status"] == "PASS" and "creates it" in check["message"], check
        asyncio.run(execute(f"CREATE TABLE {schema}.schema_version (version INTEGER PRIMARY KEY, "
                            "description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)",
                            f"INSERT INTO {schema}.schema_version VALUES ({LATEST_VERSION}, 'test', 0)"))
        check = database_check(tmp_path, capsys)
        assert check["status"] == "PASS" and check["detail"]["schema_version"] == LATEST_VERSION, check
        asyncio.run(execute(f"INSERT INTO {schema}.schema_version VALUES ({LATEST_VERSION + 1}, 'test', 0)"))
        assert database_check(tmp_path, capsys)["status"] == "FAIL"
    finally:
        asyncio.run(execute(f"DROP SCHEMA {schema} CASCADE"))


# -- tokens ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "check_name", "status", "phrase"),
    [
        ({}, "admin_token", "PASS", "set (38 characters)"),
        ({"WORKER_ADMIN_TOKEN": None}, "admin_token", "FAIL", "unset"),
        ({"WORKER_ADMIN_TOKEN": None, "WORKER_AUTH": "false"}, "admin_token", "WARN", "unset"),
        ({}, "metrics_token", "PASS", "set (40 characters)"),
        ({"WORKER_METRICS_TOKEN": None}, "metrics_token", "WARN", "open to anyone"),
        ({"WORKER_METRICS_TOKEN": ADMIN_TOKEN}, "metrics_token", "FAIL", "equals WORKER_ADMIN_TOKEN"),
    ],
)
def test_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                env: dict[str, str | None], check_name: str, status: str, phrase: str) -> None:
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    exit_status = run_doctor(write_config(tmp_path, mock_model()), probes(no_driver()), "--json")
    check = checks_of(capsys)[check_name]
    assert check["status"] == status and phrase in check["message"], check
    assert exit_status == (1 if status == "FAIL" else 0)
    assert ADMIN_TOKEN not in check["message"] and METRICS_TOKEN not in check["message"]


@pytest.mark.parametrize("name", ["WORKER_ADMIN_TOKEN", "WORKER_METRICS_TOKEN"])
def test_an_environment_the_worker_would_refuse_is_one_failed_check(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "short-token")
    assert run_doctor(write_config(tmp_path, mock_model()), probes(no_driver()), "--json") == 1
    checks = checks_of(capsys)
    assert list(checks) == ["python", "environment"]
    assert checks["environment"]["status"] == "FAIL"
    assert f"{name}: Value error, must be at least 32 characters" in checks["environment"]["message"]
    assert "short-token" not in checks["environment"]["message"]
