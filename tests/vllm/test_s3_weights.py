"""A real vLLM engine on the CPU loads the tiny model from S3-compatible storage with the Run:ai Model Streamer.

moto's S3 server runs on 127.0.0.1; the tiny model's files are uploaded to a bucket with boto3 and the worker
is given `source: s3://bucket/prefix` and WORKER_S3_ENDPOINT_URL. While the engine starts, `/capacity` is
polled: the replica must say `loading`, with the streamer's progress once it has streamed the weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.s3_server import s3_server
from tests.support.worker_process import WorkerProcess, start_worker
from worker.engines.loading import LoadPhase, LoadUnit, parse_load_progress

pytestmark = pytest.mark.vllm

MODEL_ID = "tiny-chat-s3"
# Under pytest-timeout's 300 s per test, so a slow start fails with the worker's log.
ENGINE_START_TIMEOUT_S = 240.0


@dataclass
class Started:
    worker: WorkerProcess
    capacity_seen: list[dict]  # the replica's entry of every /capacity document read while it started
    assets_cache: Path


def _replica_entry(worker: WorkerProcess) -> dict | None:
    try:
        response = httpx.get(f"{worker.base_url}/capacity", timeout=2)
    except httpx.HTTPError:
        return None
    return response.json()["models"][0]["replicas"][0] if response.status_code == 200 else None


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Started]:
    assert any(tiny_model_dir.glob("*.safetensors")), "the streamer reads safetensors only"
    work = tmp_path_factory.mktemp("s3-weights")
    with s3_server(work / "moto.log") as store:
        source = store.upload_directory(tiny_model_dir, "models", "tiny-chat")
        # vLLM pulls config and tokenizer files from the bucket into this cache; a fresh one per run.
        assets_cache = work / "vllm-assets"
        config = {
            "worker": {"id": "s3-weights-worker", "engine_start_timeout_s": ENGINE_START_TIMEOUT_S},
            "models": [{"id": MODEL_ID, "engine": "vllm", "source": source,
                        "engine_args": {"dtype": "bfloat16", "max_model_len": 512, "enforce_eager": True,
                                        "max_num_seqs": 8},
                        "pricing": {"prompt_per_mtok": "1.00", "completion_per_mtok": "2.00"}}],
        }
        worker = start_worker(work, config, engine="config",
                              env={**store.worker_env(), "VLLM_ASSETS_CACHE": str(assets_cache)})
        seen: list[dict] = []
        try:
            deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
            while time.monotonic() < deadline and worker.process.poll() is None:
                entry = _replica_entry(worker)
                if entry is not None:
                    seen.append(entry)
                    if entry["state"] == "ready":
                        break
                time.sleep(0.1)
            worker.wait_ready(timeout_s=5)
            yield Started(worker, seen, assets_cache)
        finally:
            worker.stop()


def test_the_replica_said_loading_then_showed_the_streamers_progress(started: Started) -> None:
    states = [entry["state"] for entry in started.capacity_seen]
    assert "loading" in states, states
    assert states.index("loading") < states.index("ready")
    progress = [entry["loading"] for entry in started.capacity_seen
                if entry["state"] == "loading" and entry["loading"].get("phase")]
    assert progress, "no loading progress was shown while the replica loaded"
    last = progress[-1]
    assert (last["phase"], last["unit"]) == ("loading_weights", "tensors")
    assert last["done"] == last["total"] > 0 and last["fraction"] == 1.0


def test_the_engine_streamed_the_weights_from_the_bucket(started: Started) -> None:
    engine_lines = [str(record["msg"]) for record in _json_lines(started.worker.log())
                    if record.get("source") == "engine"]
    parsed = [p for p in map(parse_load_progress, engine_lines) if p is not None]
    assert parsed and all((p.phase, p.unit) == (LoadPhase.loading_weights, LoadUnit.tensors) for p in parsed)
    # Only config and tokenizer files were copied to local disk; the weights went straight to memory.
    pulled = {path.name for path in started.assets_cache.rglob("*") if path.is_file()}
    assert "config.json" in pulled and "tokenizer.json" in pulled
    assert not any(name.endswith(".safetensors") for name in pulled), pulled


def test_the_model_from_the_bucket_serves_a_chat_completion(started: Started) -> None:
    client = openai.OpenAI(base_url=f"{started.worker.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    completion = client.chat.completions.create(model=MODEL_ID, max_tokens=4,
                                                messages=[{"role": "user", "content": "hello"}])
    assert completion.model == MODEL_ID
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert completion.choices[0].finish_reason in ("length", "stop")


def _json_lines(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a child's output printed before logging was set up
    return records
