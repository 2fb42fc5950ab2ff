"""Parsing an engine's /metrics page and keeping rates, staleness and progress from successive scrapes."""

from __future__ import annotations

import pytest

from worker.capacity import EngineLoad, EngineStats
from worker.engines.mock.metrics import EngineMetrics

VLLM_TWO_ENGINES = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
vllm:generation_tokens_total{engine="0",model_name="m"} 1000.0
vllm:generation_tokens_total{engine="1",model_name="m"} 500.0
vllm:prompt_tokens_total{engine="0",model_name="m"} 42.0
vllm:num_preemptions_total{engine="0",model_name="m"} 7.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 10.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 5.0
vllm:request_success_created{engine="0",finished_reason="stop",model_name="m"} 1.7e9
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 3.0
python_gc_objects_collected_total{generation="0"} 123.0
"""


def _stats(at: float, generated: float, finished: float = 0, running: int = 1, waiting: int = 0,
           prompt: float = 0) -> EngineStats:
    return EngineStats(running=running, waiting=waiting, kv_cache_usage=0.1, generation_tokens_total=generated,
                       prompt_tokens_total=prompt, num_preemptions=0, requests_finished_total=finished,
                       scraped_at=at)


def test_parses_and_sums_engines() -> None:
    stats = EngineStats.from_vllm_scrape(VLLM_TWO_ENGINES, scraped_at=5.0)
    assert (stats.running, stats.waiting) == (5, 4)
    assert stats.kv_cache_usage == 0.75  # the fullest engine decides
    assert stats.generation_tokens_total == 1500
    assert stats.prompt_tokens_total == 42
    assert stats.num_preemptions == 7
    assert stats.requests_finished_total == 15  # all finish reasons, not the _created gauge
    assert stats.scraped_at == 5.0


def test_parses_the_mock_engines_real_output() -> None:
    metrics = EngineMetrics("acme/m", block_size=16, num_gpu_blocks=100)
    metrics.set_load(running=2, waiting=1, kv_usage=0.5)
    metrics.generated(9)
    metrics.prompt_done(4, 0.01)
    metrics.finished("stop", 0.2)
    stats = EngineStats.from_vllm_scrape(metrics.render().decode())
    assert (stats.running, stats.waiting, stats.kv_cache_usage) == (2, 1, 0.5)
    assert (stats.generation_tokens_total, stats.prompt_tokens_total, stats.requests_finished_total) == (9, 4, 1)


def test_old_kv_gauge_name_and_nan_are_understood() -> None:
    text = ("vllm:num_requests_running 0\nvllm:num_requests_waiting NaN\n"
            "vllm:gpu_cache_usage_perc{engine=\"0\"} 0.4 1700000000000\n")
    stats = EngineStats.from_vllm_scrape(text)
    assert (stats.running, stats.waiting, stats.kv_cache_usage) == (0, 0, 0.4)


@pytest.mark.parametrize("text", ["", "<html>502 Bad Gateway</html>", "python_gc_objects_collected_total 1\n"])
def test_a_page_that_is_not_an_engines_metrics_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        EngineStats.from_vllm_scrape(text)


def test_output_rate_and_drain_rate_from_counter_deltas() -> None:
    load = EngineLoad(now=0.0, rate_window_s=2.0)
    for second in range(5):
        load.record(_stats(at=float(second), generated=100.0 * second, finished=4.0 * second))
    assert load.output_tokens_per_s == pytest.approx(100.0)
    assert load.drain_rate_per_s == pytest.approx(4.0)
    assert load.seconds_until(8) == pytest.approx(2.0)


def test_the_drain_rate_leaves_out_idle_stretches() -> None:
    """An engine that finished 2 requests in a quiet window, then 8 a second while busy, drains 8 a second:
    the idle seconds must not dilute the rate a burst's predicted wait is computed from."""
    load = EngineLoad(now=0.0, rate_window_s=5.0)
    load.record(_stats(at=0.0, generated=0, finished=0, running=0))
    load.record(_stats(at=1.0, generated=10, finished=2, running=0))  # two short requests came and went
    assert load.drain_rate_per_s is None  # never seen busy: no rate yet
    load.record(_stats(at=2.0, generated=10, finished=2, running=0))
    load.record(_stats(at=3.0, generated=20, finished=2, running=8, waiting=4))  # a burst arrives
    load.record(_stats(at=4.0, generated=120, finished=10, running=8, waiting=4))
    assert load.finished_per_s == pytest.approx(10 / 4)  # over the whole window
    assert load.drain_rate_per_s == pytest.approx(8.0)  # over the busy second only
    assert load.seconds_until(16) == pytest.approx(2.0)


def test_queue_wait_estimate() -> None:
    load = EngineLoad(now=0.0)
    load.record(_stats(at=0.0, generated=0, finished=0, waiting=6))
    assert load.estimated_queue_wait_s() is None  # no drain rate seen yet
    load.record(_stats(at=1.0, generated=10, finished=3, waiting=6))
    assert load.estimated_queue_wait_s() == pytest.approx(2.0)


def test_counters_going_back_restart_the_window() -> None:
    load = EngineLoad(now=0.0)
    load.record(_stats(at=0.0, generated=1000))
    load.record(_stats(at=1.0, generated=1100))
    load.record(_stats(at=2.0, generated=5))  # the engine behind the port was restarted
    load.record(_stats(at=3.0, generated=55))
    assert load.output_tokens_per_s == pytest.approx(50.0)


def test_staleness() -> None:
    load = EngineLoad(now=0.0)
    assert not load.is_fresh(now=0.0, stale_after_s=0.6)
    load.record(_stats(at=10.0, generated=0))
    assert load.is_fresh(now=10.5, stale_after_s=0.6)
    assert not load.is_fresh(now=10.7, stale_after_s=0.6)
    assert load.age(now=10.7) == pytest.approx(0.7)


def test_busy_engine_whose_counters_stand_still_is_hung() -> None:
    load = EngineLoad(now=0.0)
    load.record(_stats(at=0.5, generated=10, running=2))
    load.record(_stats(at=1.0, generated=20, running=2))
    for at in (2.0, 3.0, 3.9):
        load.record(_stats(at=at, generated=20, running=2))
        assert load.hang_reason(now=at, hang_after_s=3.0) is None
    load.record(_stats(at=4.1, generated=20, running=2))
    reason = load.hang_reason(now=4.1, hang_after_s=3.0)
    assert reason is not None and "no token progress" in reason


def test_idle_engine_is_never_hung_by_counters() -> None:
    load = EngineLoad(now=0.0)
    for at in range(1, 20):
        load.record(_stats(at=float(at), generated=7, running=0, waiting=0))
    assert load.hang_reason(now=19.0, hang_after_s=3.0) is None


def test_prompt_tokens_count_as_progress() -> None:
    load = EngineLoad(now=0.0)
    for at in range(1, 10):
        load.record(_stats(at=float(at), generated=0, prompt=100.0 * at, running=1))
    assert load.hang_reason(now=9.0, hang_after_s=3.0) is None


def test_metrics_that_stop_answering_count_as_hung() -> None:
    load = EngineLoad(now=0.0)
    load.record(_stats(at=1.0, generated=0, running=0))
    assert load.hang_reason(now=3.0, hang_after_s=3.0) is None
    reason = load.hang_reason(now=4.5, hang_after_s=3.0)
    assert reason is not None and "/metrics" in reason
