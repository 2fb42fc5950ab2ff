"""GuideLLM, vLLM's benchmark client, runs against the worker unchanged: its /health check on, synthetic
prompts counted with a tokenizer made here, and no model hub."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support.worker_process import WorkerProcess, fast_mock_model, ready_or_stopped, start_worker

CHAT = "acme/chat"
ADMIN_TOKEN = "guidellm-admin-token-0123456789abcdef"
REQUESTS = 8


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    config = {"worker": {"id": "guidellm-worker"}, "models": [fast_mock_model(CHAT)]}
    proc = ready_or_stopped(start_worker(tmp_path_factory.mktemp("guidellm"), config,
                                         env={"WORKER_ADMIN_TOKEN": ADMIN_TOKEN}))
    try:
        yield proc
    finally:
        proc.stop()


def test_health_follows_readiness(worker: WorkerProcess) -> None:
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(f"{worker.base_url}/health").status_code == 200
    assert httpx.post(f"{worker.base_url}/admin/drain", headers=admin).status_code == 200
    try:
        assert httpx.get(f"{worker.base_url}/health").status_code == 503
    finally:
        assert httpx.post(f"{worker.base_url}/admin/undrain", headers=admin).status_code == 200
    assert httpx.get(f"{worker.base_url}/health").status_code == 200


def test_guidellm_benchmarks_the_worker_without_errors(worker: WorkerProcess, tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    report = tmp_path / "guidellm.json"
    # Offline: the tokenizer comes from the local directory; nothing may be fetched from a hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [
        sys.executable, "-m", "guidellm", "run",
        # validate_backend is on by default: GuideLLM first checks GET /health.
        "--backend", f"kind=openai_http,target={worker.base_url},model={CHAT}",
        "--profile", "kind=concurrent,streams=4",
        "--constraint", f"kind=max_requests,count={REQUESTS}",
        "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
        "--tokenizer", f"kind=huggingface_auto,model={tiny_model_dir}",
        "--output", f"kind=json,path={report}",
        "--disable-console-interactive",
    ]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    [benchmark] = orjson.loads(report.read_bytes())["benchmarks"]
    state = benchmark["scheduler_state"]
    assert (state["successful_requests"], state["errored_requests"], state["cancelled_requests"]) == (REQUESTS, 0, 0)
    # The requests reached the worker and were served there, streamed.
    metrics = httpx.get(f"{worker.base_url}/metrics").text
    served = f'worker_requests_total{{endpoint="chat.completions",model="{CHAT}",status="200"}}'
    [line] = [line for line in metrics.splitlines() if line.startswith(served)]
    assert float(line.split()[-1]) >= REQUESTS
