"""LiteLLM's proxy server (`litellm --config ...`) in front of one OpenAI-compatible engine, for comparison.

As shipped, one uvicorn process, with a master key (its auth on, like the worker's) and no database, so
without virtual keys and spend logs; `openai/<model>` provider at the engine's own port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml

from bench.common import Target, process_cpu_s
from tests.support.worker_process import free_port

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class LiteLLMProxy:
    process: subprocess.Popen[bytes]
    port: int
    master_key: str
    log_path: Path

    @property
    def target(self) -> Target:
        return Target(f"http://127.0.0.1:{self.port}", {"Authorization": f"Bearer {self.master_key}"})

    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid)


def proxy_config(model_id: str, engine_base_url: str, master_key: str) -> dict[str, object]:
    return {
        "model_list": [{
            "model_name": model_id,
            "litellm_params": {"model": f"openai/{model_id}", "api_base": f"{engine_base_url}/v1", "api_key": "none"},
        }],
        "general_settings": {"master_key": master_key},
    }


def _litellm_command() -> list[str]:
    # The console script beside this interpreter (the virtualenv's), as an operator would start it.
    return [str(Path(sys.executable).with_name("litellm"))]


@contextlib.contextmanager
def running_litellm_proxy(model_id: str, engine: Target, work_dir: Path) -> Iterator[LiteLLMProxy]:
    work_dir.mkdir(parents=True, exist_ok=True)
    master_key = f"sk-{secrets.token_hex(16)}"
    config_path = work_dir / "litellm.yaml"
    config_path.write_text(yaml.safe_dump(proxy_config(model_id, engine.base_url, master_key), sort_keys=False))
    port = free_port()
    log_path = work_dir / "litellm.log"
    # Offline: no download of LiteLLM's model price map at start (this machine reaches no such host).
    env = {**os.environ, "LITELLM_OFFLINE_MODE": "true", "LITELLM_LOCAL_MODEL_COST_MAP": "true"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*_litellm_command(), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work_dir,
        )
    proxy = LiteLLMProxy(process, port, master_key, log_path)
    try:
        _wait_ready(proxy)
        yield proxy
    finally:
        _stop(process)


def _wait_ready(proxy: LiteLLMProxy) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    url = f"http://127.0.0.1:{proxy.port}/health/liveliness"
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            raise RuntimeError(f"litellm exited with {proxy.process.returncode}:\n"
                               f"{proxy.log_path.read_text(errors='replace')[-5000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"litellm not ready after {START_TIMEOUT_S}s:\n"
                       f"{proxy.log_path.read_text(errors='replace')[-5000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    # Any server processes it forked are its children: stop them by id too.
    children: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        children = psutil.Process(process.pid).children(recursive=True)
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
