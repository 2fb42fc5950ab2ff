"""LiteLLM's Router moves traffic off a worker that is saturated or draining, and back once it recovers.

Three `worker serve` processes on the mock engine: `first` (order 1, small: two sequences, slow steps),
`second` (order 2, roomy) and `reserve` (a separate model group, LiteLLM's cross-group fallback). Every
worker refuses before the first byte (429 or 503 with Retry-After), which is what lets the router move
streaming requests as well as plain ones. No request in these tests may fail as the client sees it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from litellm import Router

from tests.fleet.fleet_support import (
    ADMIN_TOKEN,
    MODEL,
    QUIET_LITELLM,
    admin,
    ask,
    ask_mixed,
    ask_until_served_by,
    fleet_router,
    refusals,
    served_by,
    served_count,
    worker_config,
)
from tests.support.worker_process import WorkerProcess, eventually, start_worker

pytestmark = QUIET_LITELLM

FIRST, SECOND, RESERVE = "worker-first", "worker-second", "worker-reserve"


@dataclass(frozen=True)
class Fleet:
    first: WorkerProcess
    second: WorkerProcess
    reserve: WorkerProcess

    def router(self) -> Router:
        return fleet_router([self.first.base_url, self.second.base_url], reserve=self.reserve.base_url)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # step ms, max_num_seqs, first-token objective: `first` can start little more than one batch in time.
    specs = {FIRST: (30.0, 2, 1.0), SECOND: (2.0, 32, 10.0), RESERVE: (2.0, 32, 10.0)}
    workers: dict[str, WorkerProcess] = {}
    try:
        for worker_id, (step_ms, max_num_seqs, objective_s) in specs.items():
            config = worker_config(worker_id, step_ms=step_ms, max_num_seqs=max_num_seqs,
                                   ttft_objective_s=objective_s)
            workers[worker_id] = start_worker(tmp_path_factory.mktemp(worker_id), config,
                                              env={"WORKER_ADMIN_TOKEN": ADMIN_TOKEN})
        for worker in workers.values():
            worker.wait_ready()
        yield Fleet(workers[FIRST], workers[SECOND], workers[RESERVE])
    finally:
        for worker in workers.values():  # all of them drain at once ...
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in workers.values():  # ... and are killed if one does not exit
            worker.stop()


async def test_saturated_first_worker_sheds_the_overflow_and_takes_traffic_back(fleet: Fleet) -> None:
    router = fleet.router()
    served_at_start = {w.base_url: await served_count(w.base_url) for w in (fleet.first, fleet.second)}
    before = await ask_mixed(router, 3)
    assert served_by(before) == {FIRST}
    refused_before = await refusals(fleet.first.base_url)

    # Ten requests at once, each 40 steps of 30 ms (1.2 s): `first` batches two, queues what it can start
    # within its 1 s objective and refuses the rest with 429, which the router sends to `second`.
    burst = await asyncio.gather(*(ask(router, stream=index % 2 == 0, max_tokens=40) for index in range(10)))

    assert all(answer.complete for answer in burst), burst
    assert SECOND in served_by(burst) and served_by(burst) <= {FIRST, SECOND}
    assert await refusals(fleet.first.base_url) > refused_before
    # The workers' own request counters agree with the x-worker-id headers the client got back.
    for worker, worker_id in ((fleet.first, FIRST), (fleet.second, SECOND)):
        expected = served_at_start[worker.base_url] + sum(a.worker_id == worker_id for a in [*before, *burst])
        assert await eventually(lambda w=worker, n=expected: _served_equals(w.base_url, n))

    # Once the burst is over (and its Retry-After has passed) the first worker is preferred again.
    back = await ask_until_served_by(router, FIRST)
    assert all(answer.complete for answer in back)
    assert served_by(await ask_mixed(router, 3)) == {FIRST}


async def test_draining_first_worker_hands_over_plain_and_streaming_requests(fleet: Fleet) -> None:
    router = fleet.router()
    assert served_by(await ask_mixed(router, 2)) == {FIRST}
    draining_refusals = await refusals(fleet.first.base_url, "draining")

    await admin(fleet.first.base_url, "drain")
    try:
        # The worker refuses a stream before sending a byte of it: an error status, not an SSE body.
        async with httpx.AsyncClient(base_url=fleet.first.base_url, timeout=10) as client:
            refused = await client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.headers["content-type"].startswith("application/json")

        during = await ask_mixed(router, 6)
        assert all(answer.complete for answer in during), during
        assert served_by(during) == {SECOND}
        assert await refusals(fleet.first.base_url, "draining") >= draining_refusals + 2  # ours and the router's
    finally:
        await admin(fleet.first.base_url, "undrain")

    back = await ask_until_served_by(router, FIRST)
    assert all(answer.complete for answer in back)
    assert served_by(await ask_mixed(router, 3)) == {FIRST}


async def test_whole_model_group_draining_falls_back_to_the_reserve_group(fleet: Fleet) -> None:
    router = fleet.router()
    await admin(fleet.first.base_url, "drain")
    await admin(fleet.second.base_url, "drain")
    try:
        during = await ask_mixed(router, 4)
        assert all(answer.complete for answer in during), during
        assert served_by(during) == {RESERVE}
        assert all(answer.fallbacks >= 1 for answer in during)
    finally:
        await admin(fleet.first.base_url, "undrain")
        await admin(fleet.second.base_url, "undrain")

    back = await ask_until_served_by(router, FIRST)
    assert all(answer.complete for answer in back)
    assert served_by(await ask_mixed(router, 2)) == {FIRST}


async def _served_equals(base_url: str, expected: float) -> bool:
    return await served_count(base_url) == expected
