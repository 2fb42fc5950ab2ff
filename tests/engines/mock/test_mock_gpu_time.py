"""The mock's GPU time per request: each step's measured time split among its sequences by the latency
model's terms, reported as `usage.gpu_seconds`, summing to the engine's busy seconds."""

from __future__ import annotations

import asyncio

import pytest

from tests.engines.mock.mock_engine_support import asgi_client, make_model, metric_value, sse_json
from tests.engines.mock.test_mock_scheduler import make_sequence
from worker.engines.mock.faults import FaultState
from worker.engines.mock.latency import LatencyModel
from worker.engines.mock.metrics import EngineMetrics
from worker.engines.mock.scheduler import EngineLimits, Scheduler
from worker.engines.mock.sequence import Sequence


def test_a_step_is_split_by_the_latency_models_terms() -> None:
    model = LatencyModel(base_s=0.004, per_seq_s=0.001, per_prefill_token_s=0.0001)
    # Two decodes and a 100-token prefill chunk: nominal 0.004/3 + 0.001 each, plus 0.01 for the prefill.
    nominal = [0.004 / 3 + 0.001, 0.004 / 3 + 0.001, 0.004 / 3 + 0.001 + 0.01]
    measured = 0.034  # the step took twice its nominal 0.017 s
    shares = model.shares([0, 0, 100], measured)
    assert shares == pytest.approx([share * 2 for share in nominal])
    assert sum(shares) == pytest.approx(measured, rel=1e-12)


def test_with_no_cost_terms_a_step_is_split_equally() -> None:
    assert LatencyModel(0.0, 0.0, 0.0).shares([0, 7, 300], 0.003) == pytest.approx([0.001] * 3)
    assert LatencyModel(0.0, 0.0, 0.0).shares([], 1.0) == []


def test_stepped_scheduler_charges_prefill_and_decode_and_conserves_busy_time() -> None:
    limits = EngineLimits(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, num_kv_blocks=256,
                          block_size=4)
    metrics = EngineMetrics("m", 4, 256)
    scheduler = Scheduler(limits, LatencyModel(0.0, 0.001, 0.0001), metrics, FaultState())
    long, short = make_sequence("long", 100, 3), make_sequence("short", 4, 6)
    scheduler.add(long)
    scheduler.add(short)
    for _ in range(20):
        plan, prefills = scheduler._schedule(0.0)
        if not plan:
            break
        # Each step takes exactly the model's time.
        scheduler.account(plan, prefills, scheduler._latency.step_seconds(len(plan), sum(prefills)))
        scheduler.complete(plan, 0.0)
    assert long.finished and short.finished
    # Long: 4 steps (prefill chunks of 64 and 36 tokens, then two decodes); short: its 4-token prefill
    # and 5 decodes.
    assert long.gpu_seconds == pytest.approx(4 * 0.001 + 100 * 0.0001)
    assert short.gpu_seconds == pytest.approx(6 * 0.001 + 4 * 0.0001)
    assert long.gpu_seconds + short.gpu_seconds == pytest.approx(scheduler.busy_seconds, rel=1e-12)
    assert metric_value(metrics.render().decode(), "mock:engine_busy_seconds_total") == pytest.approx(
        scheduler.busy_seconds)


def test_an_aborted_sequence_keeps_what_it_used() -> None:
    limits = EngineLimits(8, 64, 256, 256, 4)
    scheduler = Scheduler(limits, LatencyModel(0.0, 0.001, 0.0), EngineMetrics("m", 4, 256), FaultState())
    kept, dropped = make_sequence("kept", 8, 50), make_sequence("dropped", 8, 50)
    scheduler.add(kept)
    scheduler.add(dropped)
    plan, prefills = scheduler._schedule(0.0)
    scheduler.abort(dropped)  # its client left while the step ran
    scheduler.account(plan, prefills, 0.004)
    scheduler.complete(plan, 0.0)
    assert dropped.gpu_seconds == pytest.approx(0.002)
    assert kept.gpu_seconds == pytest.approx(0.002)


async def test_usage_reports_each_requests_share_and_they_sum_to_the_busy_seconds() -> None:
    model = make_model(step_base_ms=1.0, step_per_seq_ms=0.2, prefill_per_token_ms=0.02)
    async with asgi_client(model) as (client, _):
        prompts = ["word " * 150, "short prompt", "word " * 150 + "different tail", "x " * 40]

        async def plain(index: int, prompt: str, n: int = 1) -> tuple[str, float]:
            response = await client.post("/v1/completions", headers={"x-request-id": f"plain-{index}"},
                                         json={"prompt": prompt, "max_tokens": 12, "n": n})
            body = response.json()
            return body["id"], body["usage"]["gpu_seconds"]

        async def streamed(index: int, prompt: str) -> tuple[str, float]:
            response = await client.post("/v1/chat/completions", headers={"x-request-id": f"stream-{index}"},
                                         json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 9,
                                               "stream": True, "stream_options": {"include_usage": True}})
            last = sse_json(response.text)[-1]
            return last["id"], last["usage"]["gpu_seconds"]

        results = await asyncio.gather(
            plain(0, prompts[0]), plain(1, prompts[1], n=2), plain(2, prompts[2]),
            streamed(0, prompts[3]), streamed(1, prompts[0]))
        accounting = (await client.get("/mock/accounting")).json()
    reported = dict(results)
    assert all(seconds > 0 for seconds in reported.values())
    for response_id, seconds in reported.items():
        assert accounting["requests"][response_id] == pytest.approx(seconds, rel=1e-12)
    # Every step's time went to some request of these: conservation.
    assert sum(reported.values()) == pytest.approx(accounting["busy_seconds"], rel=1e-9)


def test_preempted_sequences_keep_what_they_used_and_pay_for_their_recompute() -> None:
    def run(num_kv_blocks: int) -> tuple[Scheduler, list[Sequence]]:
        limits = EngineLimits(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=24,
                              num_kv_blocks=num_kv_blocks, block_size=4)
        scheduler = Scheduler(limits, LatencyModel(0.001, 0.001, 0.0001), EngineMetrics("m", 4, num_kv_blocks),
                              FaultState())
        sequences = [make_sequence(f"r{i}", 10, 8) for i in range(3)]
        for sequence in sequences:
            scheduler.add(sequence)
        while not all(sequence.finished for sequence in sequences):
            plan, prefills = scheduler._schedule(0.0)
            scheduler.account(plan, prefills, scheduler._latency.step_seconds(len(plan), sum(prefills)))
            scheduler.complete(plan, 0.0)
        return scheduler, sequences

    tight, preempted = run(num_kv_blocks=6)
    _, unhindered = run(num_kv_blocks=100)
    assert metric_value(tight._metrics.render().decode(), "vllm:num_preemptions_total") >= 1
    assert sum(s.gpu_seconds for s in preempted) == pytest.approx(tight.busy_seconds, rel=1e-12)
    # Recomputing a preempted prompt (and its output so far) costs prefill again.
    assert sum(s.gpu_seconds for s in preempted) > sum(s.gpu_seconds for s in unhindered)
