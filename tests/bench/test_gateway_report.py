"""The gateway benchmark's page and plot, rendered from canned results (no load is sent)."""

from __future__ import annotations

import datetime
from pathlib import Path

from bench.common import ENGINES, CpuPerRequest, LoadShape
from bench.gateway import litellm_prompts
from bench.gateway_report import EngineRun, GatewayRow, Plan, render_plot, render_report
from tests.bench.bench_support import canned_result, table

PLAN = Plan(concurrencies=[1, 8, 32], shape=LoadShape(128, 128, rounds=2, scale=1.0), litellm_share=0.25,
            command=".venv/bin/pip install -e '.[bench]' && .venv/bin/python -m bench.gateway --rounds 2")
STARTED = datetime.datetime(2026, 11, 27, 3, 0, tzinfo=datetime.UTC)


def row(engine: str, concurrency: int, tok_s: dict[str, list[float]], ttft_ms: dict[str, float],
        failed: dict[str, int] | None = None) -> GatewayRow:
    """A row with one run per round and path: tok_s[path][round]."""
    gateway_row = GatewayRow(engine, concurrency)
    for path, per_round in tok_s.items():
        for tok_s_of_round in per_round:
            gateway_row.paths[path].add(canned_result(tok_s_of_round, ttft_ms[path],
                                                      failed=(failed or {}).get(path, 0)))
    gateway_row.gateway_cpu.update(worker=CpuPerRequest(0.8, 400), litellm=CpuPerRequest(4.0, 100))
    return gateway_row


def canned_runs() -> list[EngineRun]:
    mock = EngineRun(ENGINES["mock"], [
        row("mock", 1, {"direct": [10_000, 10_000], "worker": [9_000, 9_000], "litellm": [500, 500]},
            {"direct": 2.0, "worker": 2.5, "litellm": 20.0}),
        row("mock", 32, {"direct": [60_000, 40_000], "worker": [57_000, 38_000], "litellm": [3_000, 2_000]},
            {"direct": 10.0, "worker": 12.0, "litellm": 300.0}, failed={"worker": 1}),
    ], (0.5, 1.5))
    vllm = EngineRun(ENGINES["vllm"], [
        row("vllm", 1, {"direct": [500, 500], "worker": [490, 490], "litellm": [400, 400]},
            {"direct": 8.0, "worker": 9.0, "litellm": 30.0}),
        # One lucky round lifts the pooled ratio over the goal; the paired median (0.90) says otherwise.
        row("vllm", 8, {"direct": [1_000, 1_000, 1_000], "worker": [3_000, 900, 900], "litellm": [500, 500, 500]},
            {"direct": 20.0, "worker": 21.0, "litellm": 80.0}),
        row("vllm", 32, {"direct": [6_000, 6_000], "worker": [5_000, 5_000], "litellm": [1_000, 1_000]},
            {"direct": 50.0, "worker": 60.0, "litellm": 900.0}),
    ], (1.0, 2.0))
    return [mock, vllm]


def render(tmp_path: Path) -> str:
    return render_report(canned_runs(), PLAN, STARTED, elapsed_s=600.0, plot_link="benchmarks.png")


def test_the_header_states_the_command_versions_and_load(tmp_path: Path) -> None:
    page = render(tmp_path)
    assert PLAN.command in page
    assert "LiteLLM 1.110.2" in page
    assert "vLLM 0.32.0" in page
    assert "2 runs per path and concurrency" in page
    assert "carry 25% of the other paths' requests" in page
    assert "![Output tokens/s and median TTFT per path and concurrency](benchmarks.png)" in page


def test_ratios_compare_each_gateway_with_direct_and_the_worker_with_litellm(tmp_path: Path) -> None:
    ratios = {(r["engine"], r["streams"]): r for r in table(render(tmp_path), "Ratios")}
    mock_32 = ratios[("mock", "32")]
    # Pooled: all tokens over all run time (45,600 vs 48,000 tok/s); paired: the median of 0.95 and 0.95.
    assert mock_32["worker / direct tok/s"] == "0.950"
    assert mock_32["worker / direct, paired"] == "0.950"
    assert mock_32["LiteLLM / direct tok/s"] == "0.050"
    assert mock_32["worker / LiteLLM tok/s"] == "19.0"
    assert mock_32["worker / LiteLLM, paired"] == "19.0"
    assert mock_32["added TTFT p50 worker"] == "2.00"
    assert mock_32["added TTFT p50 LiteLLM"] == "290.00"
    assert mock_32["failed direct / worker / LiteLLM"] == "0 / 2 / 0"
    assert ratios[("vllm", "32")]["worker / direct tok/s"] == "0.833"


def test_goals_say_which_were_met(tmp_path: Path) -> None:
    goals = {(g["engine"], g["streams"], g["goal"]): g for g in table(render(tmp_path), "Goals")}
    assert goals[("mock", "32", "worker reaches >= 0.90 of direct output tok/s")]["met"] == "yes"
    assert goals[("mock", "32", "worker reaches >= 12x LiteLLM's output tok/s")]["measured"].startswith("19.0x")
    single_stream = goals[("mock", "1", "single-stream median TTFT adds <= 1 ms over direct")]
    assert (single_stream["measured"], single_stream["met"]) == ("0.50 ms", "yes")
    assert goals[("vllm", "1", "worker within 3% of direct output tok/s")]["met"] == "yes"
    assert goals[("vllm", "32", "worker within 3% of direct output tok/s")]["met"] == "**no**"
    lucky = goals[("vllm", "8", "worker within 3% of direct output tok/s")]
    assert lucky["measured"] == "1.174 (paired 0.900)"
    assert lucky["met"] == "**no**"


def test_every_path_has_its_figures(tmp_path: Path) -> None:
    details = table(render(tmp_path), "All figures")
    assert len(details) == 5 * 3
    litellm = next(r for r in details if (r["engine"], r["streams"], r["path"]) == ("mock", "32", "LiteLLM"))
    assert litellm["output tok/s"] == "2,400"  # equal runs of 3,000 and 2,000 tok/s
    assert litellm["output tokens per request"] == "128.0"
    assert litellm["TTFT p50"] == "300.0"
    assert litellm["gateway CPU ms per request"] == "40.00"
    direct = next(r for r in details if (r["engine"], r["streams"], r["path"]) == ("mock", "32", "direct"))
    assert (direct["tok/s / direct"], direct["gateway CPU ms per request"]) == ("1", "n/a")
    worker = next(r for r in details if (r["engine"], r["streams"], r["path"]) == ("mock", "32", "worker"))
    assert (worker["requests per run"], worker["failed"]) == ("5", "2")


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    plot = tmp_path / "benchmarks.png"
    render_plot(canned_runs(), plot)
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_litellm_runs_carry_a_share_of_the_requests_but_one_per_stream() -> None:
    mock = ENGINES["mock"]
    assert litellm_prompts(mock, 128, PLAN) == round(0.25 * mock.num_prompts(128, 1.0))
    assert litellm_prompts(mock, 1, PLAN) == 6  # a quarter of the minimum of 24
    assert litellm_prompts(ENGINES["vllm"], 128, PLAN) == 128  # a quarter would leave streams idle


def test_the_rerun_command_leaves_out_where_work_files_went() -> None:
    from bench.common import command_line

    argv = ["--engines", "mock", "--work-dir", "/tmp/w", "--result-dir=/tmp/r", "--rounds", "3"]
    assert command_line("bench.gateway", argv) == ".venv/bin/python -m bench.gateway --engines mock --rounds 3"
    assert command_line("bench.processes", []) == ".venv/bin/python -m bench.processes"
