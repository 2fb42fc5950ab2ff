"""How far an engine has got loading its model, read from the progress lines it prints.

vLLM prints its progress bars with one format (`{desc}: {percentage}% Completed | {n}/{total} [...]`),
one line per update, prefixed with the process that printed it (`(Worker pid=7) `) or a carriage
return. The weights download that runs before it (`worker.engines.hf_download`) prints the same shape.
Pure functions: tested on recorded lines.
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class LoadPhase(StrEnum):
    downloading = "downloading"  # weights copied from the hub to local disk
    loading_weights = "loading_weights"  # checkpoint read (from disk or streamed from object storage) into memory


class LoadUnit(StrEnum):
    bytes = "bytes"
    shards = "shards"  # checkpoint files
    tensors = "tensors"  # the Run:ai Model Streamer counts tensors


class LoadProgress(BaseModel):
    model_config = ConfigDict(frozen=True)

    phase: LoadPhase
    done: int
    total: int | None  # None while the total is not known yet
    unit: LoadUnit

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(self.done / self.total, 1.0)


# The bar descriptions this worker understands, and what each one counts.
_BARS: tuple[tuple[re.Pattern[str], LoadPhase, LoadUnit], ...] = (
    (re.compile(r"Loading safetensors using Runai Model Streamer"), LoadPhase.loading_weights, LoadUnit.tensors),
    (re.compile(r"Loading (?:safetensors|pt|np_cache) checkpoint shards(?: \(eager\))?"
                r"|Multi-thread loading (?:pt checkpoint )?shards"), LoadPhase.loading_weights, LoadUnit.shards),
    (re.compile(r"Downloading weights"), LoadPhase.downloading, LoadUnit.bytes),
)
_COUNTS = re.compile(r":\s+\d+% Completed \| (?P<done>\d+)/(?P<total>\d+|\?)")


def parse_load_progress(line: str) -> LoadProgress | None:
    """The progress a line of engine output reports, or None when it reports none."""
    counts = _COUNTS.search(line)
    if counts is None:
        return None
    description = line[: counts.start()]
    for pattern, phase, unit in _BARS:
        if pattern.search(description):
            total = counts["total"]
            return LoadProgress(phase=phase, done=int(counts["done"]),
                                total=None if total == "?" else int(total), unit=unit)
    return None


def progress_line(description: str, done: int, total: int | None) -> str:
    """A progress line in vLLM's bar format, which `parse_load_progress` reads back."""
    percent = 100 * done // total if total else 0
    return f"{description}: {percent:3d}% Completed | {done}/{total if total else '?'}"
