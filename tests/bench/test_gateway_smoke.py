"""One real, tiny run of the gateway benchmark: the mock engine, its worker with auth on, LiteLLM's proxy."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import psutil

from tests.bench.bench_support import table

REPO = Path(__file__).resolve().parents[2]


def run_to_the_end(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run the benchmark; should it hang, stop it and every server it started (found before it is stopped)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        started = psutil.Process(process.pid).children(recursive=True)
        process.kill()
        for child in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_a_tiny_run_sends_the_load_down_all_three_paths_and_writes_the_page_and_plot(tmp_path: Path) -> None:
    doc, plot = tmp_path / "benchmarks.md", tmp_path / "benchmarks.png"
    run = run_to_the_end(
        [sys.executable, "-m", "bench.gateway", "--engines", "mock", "--concurrency", "2", "--rounds", "1",
         "--scale", "0.1", "--input-len", "16", "--output-len", "16", "--doc", str(doc), "--plot", str(plot),
         "--result-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work")],
        timeout_s=240,
    )
    assert run.returncode == 0, run.stderr[-5000:]

    figures = {r["path"]: r for r in table(doc.read_text(), "All figures")}
    assert set(figures) == {"direct", "worker", "LiteLLM"}
    for path, shown in figures.items():
        # Every request streamed its 16 tokens: the worker took the issued key, LiteLLM its master key.
        assert (shown["failed"], shown["output tokens per request"]) == ("0", "16.0"), path
        assert shown["requests per run"] == "2", path
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "results" / "summary.json").is_file()
