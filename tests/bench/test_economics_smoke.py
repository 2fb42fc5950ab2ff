"""One real, small run of the economics benchmark: the mock engine at saturation and two lighter loads, each
step read back with `worker economics`, the page and both figures written; then the page again from the
run's summary.json."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.bench.bench_support import table
from tests.bench.test_gateway_smoke import run_to_the_end


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_a_quick_run_writes_the_economics_page_and_its_figures(tmp_path: Path) -> None:
    doc, work = tmp_path / "economics.md", tmp_path / "work"
    run = run_to_the_end([sys.executable, "-m", "bench.economics", "--quick", "--doc", str(doc),
                          "--work-dir", str(work)], timeout_s=240)
    assert run.returncode == 0, run.stderr[-5000:]

    page = doc.read_text()
    rows = table(page, "Results")
    assert [row["load"] for row in rows] == ["0.25x", "0.75x", "saturation"]
    for row in rows:
        assert row["failed"] == "0", row
        assert 0 < number(row["utilisation"]) <= 1, row
        assert number(row["GPU s per 1k output tokens"]) > 0, row
        # Revenue less GPU cost, to the micro-dollar the page prints.
        assert abs(number(row["revenue $"]) - number(row["GPU cost $"]) - number(row["margin $"])) < 2e-6, row
        assert number(row["break-even $/Mtok"]) > 0, row
    # Idle GPUs cost as much as busy ones: the lightest load has the lowest utilisation and needs the highest
    # price to break even.
    assert number(rows[0]["utilisation"]) < number(rows[-1]["utilisation"])
    assert number(rows[0]["break-even $/Mtok"]) > number(rows[-1]["break-even $/Mtok"])
    assert "At full load: over the whole run" in page and "tokens per provisioned GPU-hour" in page

    for check in table(page, "Checks"):
        # The ledger charged exactly what the clients were told, and the live counter saw the same.
        assert check["ledger revenue $"] == check["clients' usage.cost $"] == check["revenue counter $"], check
        # Printed to 3 decimals from figures that agree to 1e-6.
        assert abs(number(check["attributed GPU s (ledger)"]) - number(check["attributed GPU s (counter)"])) <= 0.0011
        assert 0 < number(check["attributed / busy"]) <= 1.01, check  # the engine computes only while busy

    for figure in (doc.with_suffix(".png"), tmp_path / "economics-break-even.png"):
        assert figure.read_bytes().startswith(b"\x89PNG"), figure

    again = tmp_path / "again" / "economics.md"
    rendered = run_to_the_end([sys.executable, "-m", "bench.economics", "--render", str(work / "summary.json"),
                               "--doc", str(again)], timeout_s=60)
    assert rendered.returncode == 0, rendered.stderr[-5000:]
    assert table(again.read_text(), "Results") == rows
