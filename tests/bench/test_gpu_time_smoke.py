"""One real, small run of the GPU time estimate benchmark: two light loads on the mock engine, every model's
errors on the page, the shipped model's offline replay equal to the live meters; then the page again from the
run's summary.json."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.bench.bench_support import table
from tests.bench.test_gateway_smoke import run_to_the_end


def percent(cell: str) -> float:
    return float(cell.rstrip("%")) / 100


def test_a_quick_run_writes_the_gpu_time_page(tmp_path: Path) -> None:
    doc, work = tmp_path / "gpu-time.md", tmp_path / "work"
    run = run_to_the_end([sys.executable, "-m", "bench.gpu_time", "--quick", "--doc", str(doc),
                          "--work-dir", str(work)], timeout_s=180)
    assert run.returncode == 0, run.stderr[-5000:]

    page = doc.read_text()
    rows = table(page, "Results")
    models = ["shipped (prefill weight 1 + prompt tokens / 256)", "phase weight 2, prompt size ignored",
              "prefill weight 1", "prefill weight 4", "prefill weight 8", "equal split (weight 1, sequences ignored)"]
    assert [(row["requests in flight"], row["model"]) for row in rows] == [
        (load, model) for load in ("2", "4") for model in models]
    for row in rows:
        assert 0 <= percent(row["median error"]) <= percent(row["p90 error"]) <= percent(row["worst error"]), row
    for load in ("2", "4"):
        # Every model splits the same worker-seen busy time: their totals are one figure, and the worker sees
        # a request from its lease to its end, so at least the engine's own busy time.
        totals = {row["estimate total / engine busy"] for row in rows if row["requests in flight"] == load}
        assert len(totals) == 1 and float(totals.pop()) >= 0.99, load

    for check in table(page, "Runs"):
        assert check["requests"] == "12" and check["failed"] == "0", check
        assert check["exact sum / engine busy"] == "1.000", check  # the mock's shares sum to its busy time
        assert float(check["shipped replay vs live meters, max s"]) < 1e-9, check

    again = tmp_path / "again" / "gpu-time.md"
    rendered = run_to_the_end([sys.executable, "-m", "bench.gpu_time", "--render", str(work / "summary.json"),
                               "--doc", str(again)], timeout_s=60)
    assert rendered.returncode == 0, rendered.stderr[-5000:]
    assert again.read_text() == page
