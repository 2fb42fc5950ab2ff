"""docs/fleet.md is rewritten by bench/fleet.py: its hand-written part lives in the script."""

from __future__ import annotations

import re
from pathlib import Path

from bench.fleet import EXPLANATION

REPO = Path(__file__).resolve().parents[2]


def test_fleet_page_ends_with_the_text_the_benchmark_writes() -> None:
    page = (REPO / "docs" / "fleet.md").read_text(encoding="utf-8")
    assert page.endswith(EXPLANATION), "edit bench/fleet.py's EXPLANATION, then docs/fleet.md alike"
    assert "\n## Which router above the workers\n" in EXPLANATION
    assert "(fleet.md#which-router-above-the-workers)" in (REPO / "docs" / "deploy.md").read_text(
        encoding="utf-8"
    )


def test_fleet_page_points_at_files_that_exist() -> None:
    for path in re.findall(r"`((?:deploy|docs)/[\w./-]+)`", EXPLANATION):
        assert (REPO / path).exists(), path
