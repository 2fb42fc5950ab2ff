"""The GPU-time estimator (worker/capacity/gpu_time.py), fed explicit event sequences: a replica's busy time
split among its requests in flight by phase weight (a stream's, before its first byte, growing with its body's
size), conserved exactly, idle time attributed to nobody."""

from __future__ import annotations

import orjson
import pytest

from tests.engines.mock.mock_engine_support import make_model
from worker.capacity.gpu_time import (
    PREFILL_TOKENS_PER_DECODE,
    GpuTimeMeters,
    GpuTimeShare,
    ReplicaGpuMeter,
    prefill_weight,
    sequences_of,
)
from worker.config import EngineKind
from worker.gateway.context import RequestContext
from worker.gateway.pipeline import HookChain, settle_gpu_seconds
from worker.gateway.relay import SseRelay


def share(meter: ReplicaGpuMeter, at: float, *, stream: bool = True, prefill_weight: float = 4.0,
          sequences: int = 1) -> GpuTimeShare:
    started = GpuTimeShare(prefill_weight, sequences)
    started.start(meter, stream, at)
    return started


def test_one_request_alone_gets_all_the_time_it_was_in_flight() -> None:
    meter = ReplicaGpuMeter()
    only = share(meter, 10.0)
    only.first_byte(10.5)
    assert only.settle(13.0) == pytest.approx(3.0)
    assert meter.busy_seconds() == pytest.approx(3.0)


def test_overlapping_requests_split_by_phase_weight() -> None:
    meter = ReplicaGpuMeter()
    a = share(meter, 0.0)  # prefill weight 4
    a.first_byte(1.0)  # [0, 1): a alone
    b = share(meter, 1.0)  # [1, 2): a decodes (1), b prefills (4)
    b.first_byte(2.0)  # [2, 4): both decode
    assert a.settle(4.0) == pytest.approx(1.0 + 1.0 / 5 + 1.0)
    assert b.settle(5.0) == pytest.approx(4.0 / 5 + 1.0 + 1.0)  # [4, 5): b alone
    assert meter.busy_seconds() == pytest.approx(5.0)


def test_non_streamed_requests_weigh_as_decoding_throughout() -> None:
    meter = ReplicaGpuMeter()
    plain = share(meter, 0.0, stream=False)
    streamed = share(meter, 0.0)
    streamed.first_byte(1.0)  # [0, 1): 1 vs 4
    plain.first_byte(1.0)  # a non-streamed request's first byte is its end: no change of weight
    assert plain.settle(2.0) == pytest.approx(0.2 + 0.5)
    assert streamed.settle(2.0) == pytest.approx(0.8 + 0.5)


def test_idle_time_between_requests_is_not_attributed() -> None:
    meter = ReplicaGpuMeter()
    first = share(meter, 0.0)
    assert first.settle(2.0) == pytest.approx(2.0)
    second = share(meter, 50.0)  # idle from 2 to 50
    assert meter.busy_seconds(51.0) == pytest.approx(3.0)
    assert second.settle(53.0) == pytest.approx(3.0)
    assert meter.busy_seconds(100.0) == pytest.approx(5.0)


def test_shares_sum_to_the_busy_time_exactly_however_requests_overlap() -> None:
    meter = ReplicaGpuMeter()
    # A deterministic but irregular schedule: starts, first bytes and ends interleaved, with idle gaps.
    events: list[tuple[float, str, int]] = []
    for index in range(200):
        start = (index * 7919 % 1000) / 10.0
        events += [(start, "start", index), (start + (index % 7) / 10.0, "first", index),
                   (start + 0.5 + (index % 13) / 4.0, "end", index)]
    rank = {"start": 0, "first": 1, "end": 2}
    events.sort(key=lambda event: (event[0], rank[event[1]]))
    shares: dict[int, GpuTimeShare] = {}
    seconds = {}
    intervals = []
    for at, kind, index in events:
        if kind == "start":
            shares[index] = share(meter, at, stream=index % 3 != 0, prefill_weight=6.0)
        elif kind == "first":
            shares[index].first_byte(at)
        else:
            seconds[index] = shares[index].settle(at)
    for at, kind, index in events:
        if kind == "start":
            intervals.append((at, next(t for t, k, i in events if i == index and k == "end")))
    # The union of the requests' [start, end] intervals, measured independently.
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    assert meter.in_flight == 0
    assert sum(seconds.values()) == pytest.approx(busy, rel=1e-9)
    assert meter.busy_seconds() == pytest.approx(busy, rel=1e-9)


def test_late_events_apply_at_the_replicas_latest_event() -> None:
    meter = ReplicaGpuMeter()
    a = share(meter, 0.0)
    b = share(meter, 2.0)
    a.first_byte(1.0)  # reported late (a relay process's message): applies at 2.0
    assert a.settle(3.0) + b.settle(3.0) == pytest.approx(3.0)
    assert meter.busy_seconds() == pytest.approx(3.0)


def test_a_request_moved_to_a_sibling_keeps_what_it_used() -> None:
    meters = GpuTimeMeters(prefill_tokens_per_decode=100.0)
    ctx = RequestContext(request_id="r", endpoint="chat.completions", model=make_model(), body={}, stream=True,
                         client_wants_usage=False, headers={}, body_bytes=400)  # 100 tokens: weight 2
    first = meters.started(ctx, "m-0", 0.0)
    first.settle(1.0)  # its lease on m-0 released (that replica failed it)
    again = meters.started(ctx, "m-1", 1.5)
    assert again is first is ctx.gpu_timer
    again.first_byte(2.0)
    assert again.settle(4.0) == pytest.approx(1.0 + 2.5)
    assert meters.busy_seconds(10.0) == {"m-0": pytest.approx(1.0), "m-1": pytest.approx(2.5)}


def test_settled_figure_prefers_the_engines_then_the_estimate_and_multiplies_by_gpus() -> None:
    model = make_model().model_copy(update={"gpus_per_replica": 2})

    def context() -> RequestContext:
        return RequestContext(request_id="r", endpoint="completions", model=model, body={}, stream=False,
                              client_wants_usage=False, headers={})

    meters = GpuTimeMeters()
    estimated = context()
    meters.started(estimated, "m-0", 0.0)
    settle_gpu_seconds(estimated, 3.0)
    assert (estimated.gpu_seconds, estimated.gpu_seconds_source) == (pytest.approx(6.0), "estimate")

    reported = context()
    meters.started(reported, "m-0", 5.0)
    reported.gpu_seconds = 0.25  # already x gpus_per_replica, as the relay sets it
    settle_gpu_seconds(reported, 6.0)
    assert (reported.gpu_seconds, reported.gpu_seconds_source) == (0.25, "engine")
    assert meters.meter("m-0").in_flight == 0  # settled on the meter all the same

    never_leased = context()
    settle_gpu_seconds(never_leased, 1.0)
    assert (never_leased.gpu_seconds, never_leased.gpu_seconds_source) == (0.0, "none")

    external = RequestContext(request_id="r", endpoint="completions", body={}, stream=False,
                              client_wants_usage=False, headers={},
                              model=model.model_copy(update={"engine": EngineKind.external}))
    meters.started(external, "ext-0", 7.0)
    settle_gpu_seconds(external, 9.0)  # metered (its replica's busy time), but no GPU of the node's
    assert (external.gpu_seconds, external.gpu_seconds_source) == (0.0, "none")
    assert meters.meter("ext-0").busy_seconds() == pytest.approx(2.0)


def test_prefill_tokens_per_decode_must_be_positive() -> None:
    with pytest.raises(ValueError, match="prefill_tokens_per_decode"):
        GpuTimeMeters(prefill_tokens_per_decode=0.0)


def test_a_stream_weighs_by_its_prompts_size_before_its_first_byte_and_as_any_other_after() -> None:
    """Two n=2 streams in flight together, one with a body four times the other's: before their first bytes
    they split the time by 2 x (1 + body bytes / 4 / 256); after them, evenly."""
    meters = GpuTimeMeters()

    def stream(body_bytes: int) -> RequestContext:
        return RequestContext(request_id="r", endpoint="chat.completions", model=make_model(), body={"n": 2},
                              stream=True, client_wants_usage=False, headers={}, body_bytes=body_bytes)

    short, long = stream(1024), stream(4096)  # 256 and 1,024 prompt tokens
    assert prefill_weight(1024) == 2.0 and prefill_weight(4096) == 1.0 + 1024 / PREFILL_TOKENS_PER_DECODE == 5.0
    small, large = meters.started(short, "m-0", 0.0), meters.started(long, "m-0", 0.0)
    assert (small.weight, large.weight) == (4.0, 10.0)
    small.first_byte(7.0)  # [0, 7): 4 vs 10
    large.first_byte(7.0)
    assert (small.weight, large.weight) == (2.0, 2.0)
    assert small.settle(9.0) == pytest.approx(2.0 + 1.0)  # [7, 9): evenly
    assert large.settle(9.0) == pytest.approx(5.0 + 1.0)
    assert meters.meter("m-0").busy_seconds() == pytest.approx(9.0)


def test_a_non_streamed_request_weighs_one_per_sequence_whatever_its_size() -> None:
    meters = GpuTimeMeters()
    ctx = RequestContext(request_id="r", endpoint="completions", model=make_model(), body={"prompt": ["a", "b"]},
                         stream=False, client_wants_usage=False, headers={}, body_bytes=1 << 20)
    assert meters.started(ctx, "m-0", 0.0).weight == 2.0


def test_each_sequence_of_a_request_weighs_as_one() -> None:
    meter = ReplicaGpuMeter()
    pair = share(meter, 0.0, stream=False, sequences=2)  # n=2: two sequences in every step
    single = share(meter, 0.0, stream=False)
    assert pair.settle(3.0) == pytest.approx(2.0)
    assert single.settle(3.0) == pytest.approx(1.0)


@pytest.mark.parametrize(("body", "sequences"), [
    ({"messages": []}, 1),
    ({"messages": [], "n": 3}, 3),
    ({"prompt": "one"}, 1),
    ({"prompt": [1, 2, 3]}, 1),  # token ids: one prompt
    ({"prompt": ["one", "two"], "n": 2}, 4),
    ({"prompt": [[1, 2], [3]]}, 2),
    ({"input": ["a", "b", "c"]}, 3),
    ({"n": None}, 1),
])
def test_sequences_of_a_request(body: dict[str, object], sequences: int) -> None:
    assert sequences_of(body) == sequences


@pytest.mark.parametrize("wants_usage", [True, False])
async def test_the_engines_figure_is_read_from_the_usage_chunk_and_never_shown(wants_usage: bool) -> None:
    model = make_model().model_copy(update={"gpus_per_replica": 4})
    ctx = RequestContext(request_id="r", endpoint="chat.completions", model=model, body={}, stream=True,
                         client_wants_usage=wants_usage, headers={})
    chain = HookChain(ctx, [])
    relay = SseRelay(ctx, chain)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "gpu_seconds": 0.125}
    out = relay.process(b"data: " + orjson.dumps({"id": "c", "choices": [], "usage": usage}) + b"\n\n"
                        + b"data: [DONE]\n\n")
    await chain()
    assert (ctx.gpu_seconds, ctx.gpu_seconds_source) == (0.5, "engine")
    assert b"gpu_seconds" not in out
    if wants_usage:
        assert orjson.loads(out[len(b"data: "):])["usage"] == {"prompt_tokens": 3, "completion_tokens": 2,
                                                              "total_tokens": 5}
    else:
        assert out == b""
