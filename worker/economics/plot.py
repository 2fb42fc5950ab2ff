"""The report as a picture: the node's revenue against its GPU cost, and each model's utilisation, over time."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from itertools import accumulate
from pathlib import Path

from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from worker.billing.store.records import from_epoch
from worker.economics.timeline import Point


def build_figure(models: Sequence[str], points: Sequence[Point], since: datetime, until: datetime) -> Figure:
    """Two panels: cumulative revenue and GPU cost (USD), and utilisation per model (attributed GPU time over
    provisioned GPU time in each bucket; gaps where a model had no GPUs up)."""
    figure = Figure(figsize=(11, 7.5), layout="constrained")  # no pyplot: no global state, no display needed
    money, usage = figure.subplots(2, 1, sharex=True)
    # Money accumulates through each bucket: from 0 at the window's start to each bucket's end.
    ends = [since, *(from_epoch(point.end) for point in points)]
    marker = "." if len(points) < 60 else None  # a short window's few points stay visible
    for values, label, color in (([p.revenue_usd for p in points], "revenue", "tab:green"),
                                 ([p.gpu_cost_usd for p in points], "GPU cost", "tab:red")):
        money.plot(ends, [0.0, *accumulate(values)], label=label, color=color, marker=marker)
    money.set_ylabel("cumulative USD")
    money.set_title("Revenue against GPU cost (cumulative)")
    money.legend(loc="upper left")
    money.grid(alpha=0.3)
    # Utilisation holds over each bucket: a step from its start, the last one drawn to the window's end.
    starts = [*(from_epoch(point.start) for point in points), until]
    for model in models:
        shares = [float("nan") if (u := p.utilization.get(model)) is None else u for p in points]
        usage.plot(starts, [*shares, shares[-1] if shares else float("nan")], label=model, drawstyle="steps-post")
    usage.set_ylabel("GPU utilisation")
    usage.yaxis.set_major_formatter(PercentFormatter(1.0))
    usage.set_ylim(bottom=0)
    usage.set_title("Utilisation per model: attributed / provisioned GPU time")
    usage.set_xlabel("time (UTC)")
    usage.legend(loc="upper left", fontsize="small")
    usage.grid(alpha=0.3)
    usage.set_xlim(since, until)
    locator = AutoDateLocator()  # type: ignore[no-untyped-call]  # matplotlib leaves these two unannotated
    usage.xaxis.set_major_locator(locator)
    usage.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    figure.suptitle(f"Workload economics {since:%Y-%m-%d %H:%M:%S} to {until:%Y-%m-%d %H:%M:%S} UTC")
    return figure


def save_png(figure: Figure, path: Path) -> None:
    figure.savefig(path, format="png", dpi=110)
