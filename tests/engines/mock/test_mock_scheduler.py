"""The continuous-batching scheduler, stepped by hand: admission, chunked prefill, KV budget, preemption."""

from __future__ import annotations

import asyncio

from tests.engines.mock.mock_engine_support import metric_value
from worker.engines.mock.faults import FaultState
from worker.engines.mock.latency import LatencyModel
from worker.engines.mock.metrics import EngineMetrics
from worker.engines.mock.scheduler import EngineLimits, Scheduler
from worker.engines.mock.sequence import Sequence, StopMatcher
from worker.engines.mock.tokens import TokenSampler


def make_scheduler(*, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, max_model_len: int = 256,
                   num_kv_blocks: int = 1024, block_size: int = 4) -> Scheduler:
    limits = EngineLimits(max_num_seqs, max_num_batched_tokens, max_model_len, num_kv_blocks, block_size)
    return Scheduler(limits, LatencyModel(0.0, 0.0, 0.0), EngineMetrics("m", block_size, num_kv_blocks),
                     FaultState())


def make_sequence(name: str, prompt_tokens: int, max_tokens: int, stops: tuple[str, ...] = ()) -> Sequence:
    return Sequence(request_id=name, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                    sampler=TokenSampler(0, None, name, 0), stop=StopMatcher(stops, False) if stops else None,
                    notify=asyncio.Event(), arrival=0.0)


def step(scheduler: Scheduler) -> list[tuple[Sequence, int]]:
    plan, _ = scheduler.schedule(0.0)
    scheduler.complete(plan, 0.0)
    return plan


def run_to_completion(scheduler: Scheduler, sequences: list[Sequence], max_steps: int = 10_000) -> int:
    for steps in range(1, max_steps):
        step(scheduler)
        assert len(scheduler.running) <= scheduler.limits.max_num_seqs
        assert 0 <= scheduler.free_blocks <= scheduler.limits.num_kv_blocks
        if all(sequence.finished for sequence in sequences):
            return steps
    raise AssertionError("sequences never finished")


def outputs(sequences: list[Sequence]) -> list[str]:
    return [sequence.take_output()[0] for sequence in sequences]


def test_admits_at_most_max_num_seqs_and_queues_the_rest() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    sequences = [make_sequence(f"r{i}", 4, 3) for i in range(5)]
    for sequence in sequences:
        scheduler.add(sequence)

    step(scheduler)

    assert scheduler.running == sequences[:2]
    assert list(scheduler.waiting) == sequences[2:]
    text = scheduler._metrics.render().decode()
    assert metric_value(text, "vllm:num_requests_running") == 2
    assert metric_value(text, "vllm:num_requests_waiting") == 3
    run_to_completion(scheduler, sequences)
    assert [s.output_tokens for s in sequences] == [3] * 5
    assert all(s.finish_reason == "length" for s in sequences)
    assert scheduler.free_blocks == scheduler.limits.num_kv_blocks


def test_queued_requests_are_admitted_first_come_first_served() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    sequences = [make_sequence(f"r{i}", 4, 2) for i in range(3)]
    for sequence in sequences:
        scheduler.add(sequence)
    finish_order = []
    while len(finish_order) < 3:
        step(scheduler)
        finish_order.extend(s for s in sequences if s.finished and s not in finish_order)
    assert finish_order == sequences


def test_long_prompt_is_prefilled_in_chunks_of_the_token_budget() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    sequence = make_sequence("long", 20, 2)
    scheduler.add(sequence)

    planned = [{s.request_id: n for s, n in step(scheduler)} for _ in range(3)]

    assert planned == [{"long": 8}, {"long": 8}, {"long": 4}]
    assert sequence.output_tokens == 1  # the step that finishes the prompt samples the first token
    assert step(scheduler) == [(sequence, 1)]  # then one token per step


def test_decodes_and_a_new_prefill_share_a_step() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=10)
    first = make_sequence("first", 4, 50)
    scheduler.add(first)
    step(scheduler)
    second = make_sequence("second", 30, 5)
    scheduler.add(second)

    plan, prefill_tokens = scheduler.schedule(0.0)

    assert plan == [(first, 1), (second, 9)]
    assert prefill_tokens == 9


def test_kv_cache_budget_limits_admission() -> None:
    # 6 blocks of 4 tokens: two 10-token prompts (3 blocks each) fill the cache.
    scheduler = make_scheduler(num_kv_blocks=6, block_size=4, max_model_len=24)
    sequences = [make_sequence(f"r{i}", 10, 8) for i in range(3)]
    for sequence in sequences:
        scheduler.add(sequence)

    step(scheduler)

    assert scheduler.running == sequences[:2]
    assert list(scheduler.waiting) == sequences[2:]
    assert scheduler.free_blocks == 0
    assert metric_value(scheduler._metrics.render().decode(), "vllm:kv_cache_usage_perc") == 1.0


def test_newest_sequence_is_preempted_when_blocks_run_out_and_output_is_unchanged() -> None:
    tight = make_scheduler(num_kv_blocks=6, block_size=4, max_model_len=24)
    roomy = make_scheduler(num_kv_blocks=100, block_size=4, max_model_len=24)
    tight_sequences = [make_sequence(f"r{i}", 10, 8) for i in range(3)]
    roomy_sequences = [make_sequence(f"r{i}", 10, 8) for i in range(3)]
    for sequence in tight_sequences:
        tight.add(sequence)
    for sequence in roomy_sequences:
        roomy.add(sequence)

    for _ in range(3):  # tokens 1-12 of each running sequence fit in its 3 blocks
        step(tight)
    assert tight.running == tight_sequences[:2]
    step(tight)  # the 13th token needs a 4th block: the newer sequence makes room
    assert tight.running == tight_sequences[:1]
    assert list(tight.waiting) == [tight_sequences[1], tight_sequences[2]]  # preempted one goes first

    run_to_completion(tight, tight_sequences)
    run_to_completion(roomy, roomy_sequences)
    assert metric_value(tight._metrics.render().decode(), "vllm:num_preemptions_total") >= 1
    assert metric_value(roomy._metrics.render().decode(), "vllm:num_preemptions_total") == 0
    # Recompute-style preemption loses no tokens and changes nothing in the output.
    assert outputs(tight_sequences) == outputs(roomy_sequences)
    assert tight.free_blocks == 6


def test_abort_frees_blocks_and_lets_the_queue_move() -> None:
    scheduler = make_scheduler(num_kv_blocks=6, block_size=4, max_model_len=24)
    sequences = [make_sequence(f"r{i}", 10, 8) for i in range(3)]
    for sequence in sequences:
        scheduler.add(sequence)
    step(scheduler)

    scheduler.abort(sequences[0])
    scheduler.abort(sequences[2])  # a waiting one

    assert sequences[0].finish_reason == "abort" and sequences[0].finished
    assert scheduler.free_blocks == 3
    assert scheduler.running == [sequences[1]] and not scheduler.waiting
    text = scheduler._metrics.render().decode()
    assert metric_value(text, "vllm:request_success_total", finished_reason="abort") == 2


def test_stop_string_across_tokens_ends_the_sequence_without_the_stop_text() -> None:
    free_run = make_sequence("s", 4, 12)
    scheduler = make_scheduler()
    scheduler.add(free_run)
    run_to_completion(scheduler, [free_run])
    full_text = free_run.take_output()[0]
    # A stop string made of the end of one word, the space and the start of the next.
    words = full_text.split(" ")
    stop = words[2][-2:] + " " + words[3][:2]
    expected = full_text[: full_text.index(stop)]

    stopped = make_sequence("s", 4, 12, stops=(stop,))
    scheduler.add(stopped)
    run_to_completion(scheduler, [stopped])

    assert stopped.take_output()[0] == expected
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    assert stopped.output_tokens < 12


def test_latency_model_is_linear_in_batch_and_prefill_and_scaled_by_slowdown() -> None:
    model = LatencyModel(base_s=0.008, per_seq_s=0.001, per_prefill_token_s=0.0001)
    assert model.step_seconds(0, 0) == 0.008
    assert abs(model.step_seconds(4, 100) - (0.008 + 0.004 + 0.01)) < 1e-12
    assert abs(model.step_seconds(4, 100, slowdown=10.0) - 0.22) < 1e-12
    assert LatencyModel(0.0, 0.0, 0.0).step_seconds(256, 4096) == 0.0
