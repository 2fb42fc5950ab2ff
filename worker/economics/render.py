"""The report as JSON (the admin API's body too), CSV (one row per model, then the node) or a table for people
(one column per model, then the node)."""

from __future__ import annotations

import csv
import io
from typing import Any

from worker.economics.compute import Economics, EconomicsReport

COLUMNS = tuple(Economics.model_fields)


def as_json(report: EconomicsReport) -> dict[str, Any]:
    return report.model_dump(mode="json")


def as_csv(report: EconomicsReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in (*report.models, report.node):
        writer.writerow(["" if value is None else value for value in row.model_dump().values()])
    return buffer.getvalue()


def as_table(report: EconomicsReport) -> str:
    rows = [*report.models, report.node]
    header = ["", *(row.model for row in report.models), "node"]
    lines = [header]
    for field in COLUMNS[1:]:
        if field.startswith("target_") and report.target_margin is None:
            continue
        lines.append([field, *("-" if (value := getattr(row, field)) is None else str(value) for row in rows)])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = [f"{report.since:%Y-%m-%d %H:%M:%S} to {report.until:%Y-%m-%d %H:%M:%S} UTC"
            + (f", worker {report.worker_id}" if report.worker_id is not None else "")
            + (f", target margin {report.target_margin}" if report.target_margin is not None else "")]
    for line in lines:
        cells = [line[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(line[1:], widths[1:],
                                                                                      strict=True))]
        text.append("  ".join(cells).rstrip())
    return "\n".join(text) + "\n"
