"""One real, small run of the scheduler benchmark's placement part: every policy on the mock engine, each
phase measured, the page and the plot written. (tests/gateway/test_guidellm.py runs GuideLLM against the
worker; the benchmark's GuideLLM part adds ~80 s and is left out here.)"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.bench.bench_support import table
from tests.bench.test_gateway_smoke import run_to_the_end


def test_a_quick_run_measures_every_policy_and_writes_the_page_and_plot(tmp_path: Path) -> None:
    doc = tmp_path / "scheduler.md"
    run = run_to_the_end(
        [sys.executable, "-m", "bench.scheduler", "--quick", "--skip-guidellm", "--doc", str(doc),
         "--work-dir", str(tmp_path / "work")],
        timeout_s=180,
    )
    assert run.returncode == 0, run.stderr[-5000:]

    page = doc.read_text()
    rows = table(page, "Results (mock engine)")
    assert {(row["policy"], row["phase"]) for row in rows} == {
        (policy, phase)
        for policy in ("least_loaded", "round_robin", "cache_aware", "cache_aware, queue_allowance 8")
        for phase in ("saturation", "0.8x", "no shared prefix")
    }
    for row in rows:
        # Every phase served turns without a failure, and the engines' prefix-cache counters were read.
        assert int(row["requests"]) > 0 and row["failed"] == "0", row
        assert float(row["output tok/s"].replace(",", "")) > 0, row
        assert 0 <= float(row["prefix-cache hit rate"]) <= 1, row
    unique = [row for row in rows if row["phase"] == "no shared prefix"]
    # Prompts that share nothing are never found in a cache (only whole blocks of a prompt count).
    assert all(float(row["prefix-cache hit rate"]) < 0.05 for row in unique), unique

    assert "## GuideLLM" not in page
    assert "## Against the goals" in page
    assert doc.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
