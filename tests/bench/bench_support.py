"""Canned `vllm bench serve` results and a reader for the Markdown tables the benchmarks write."""

from __future__ import annotations

from typing import Any


def canned_result(tok_s: float, ttft_ms: float, *, completed: int = 4, failed: int = 0,
                  output_len: int = 128) -> dict[str, Any]:
    """What `vllm.benchmarks.serve.main` returns for one run (the fields the benchmarks read)."""
    tokens = completed * output_len
    return {
        "num_prompts": completed + failed,
        "output_throughput": tok_s,
        "total_output_tokens": tokens,
        "duration": tokens / tok_s,
        "completed": completed,
        "failed": failed,
        "errors": [""] * completed + ["429 Too Many Requests"] * failed,
        "ttfts": [ttft_ms / 1000] * completed + [0.0] * failed,
        "itls": [[0.001] * (output_len - 1)] * completed + [[]] * failed,
    }


def table(markdown: str, section: str | None = None) -> list[dict[str, str]]:
    """The rows of the first table (under `## section` where given), as {column header: cell}."""
    lines = (markdown.split(f"## {section}\n", 1)[1] if section else markdown).splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, _separator, *body = rows
    return [dict(zip(header, row, strict=True)) for row in body]
