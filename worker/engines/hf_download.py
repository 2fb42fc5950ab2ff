"""Download a Hugging Face model's weights with progress lines, then become the engine (exec).

vLLM downloads hub weights with its progress bars switched off, so a node pulling 140 GB says nothing
for minutes. This runs first, in the engine's place under its guard:

    python -m worker.engines.hf_download --repo ORG/NAME [--revision R] [--cache-dir D] -- ENGINE ARGV...

It fetches what vLLM would (config and tokenizer files, the safetensors the index names) into the same
cache with huggingface_hub, Xet transfers included, printing `Downloading weights: N% Completed |
done/total` (bytes, read from the cache's blob files every few seconds) for `worker.engines.loading` to
parse, then execs the engine, which finds everything cached. Any failure is printed and the engine is
started anyway: it downloads by itself, as it would without this step, and reports its own error.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.engines.loading import progress_line

PROGRESS_DESCRIPTION = "Downloading weights"
PROGRESS_INTERVAL_S = 2.0
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Besides the weights, what vLLM and its tokenizer read: configs, tokenizers, chat templates.
SMALL_FILE_PATTERNS = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py")


@dataclass(frozen=True)
class PlannedFile:
    name: str  # path in the repository
    size: int
    blob: str | None  # the cache's blob file name (the LFS sha256, else the git blob id)


def plan_download(siblings: Iterable[Any], index_weight_map: dict[str, str] | None) -> list[PlannedFile]:
    """The repository files to fetch: small files by pattern, and the safetensors the index names (all
    top-level ones when there is no index; a repository may also hold a consolidated copy vLLM skips)."""
    wanted_weights = set(index_weight_map.values()) if index_weight_map else None
    planned = []
    for sibling in siblings:
        name: str = sibling.rfilename
        if name.endswith(".safetensors"):
            keep = name in wanted_weights if wanted_weights is not None else "/" not in name
        else:
            keep = "/" not in name and any(fnmatch.fnmatch(name, pattern) for pattern in SMALL_FILE_PATTERNS)
        if keep:
            lfs = sibling.lfs
            size = (lfs.size if lfs else sibling.size) or 0
            planned.append(PlannedFile(name, size, lfs.sha256 if lfs else sibling.blob_id))
    return planned


def bytes_in_cache(blobs_dir: Path, planned: Sequence[PlannedFile]) -> int:
    """Bytes of the planned files already in the cache, whole or being written (`<blob>.incomplete`)."""
    done = 0
    for file in planned:
        if file.blob is None:
            continue
        for candidate in (blobs_dir / file.blob, blobs_dir / f"{file.blob}.incomplete"):
            try:
                done += min(candidate.stat().st_size, file.size)
                break
            except OSError:
                continue
    return done


def _print(line: str) -> None:
    print(line, flush=True)


def _report_progress(blobs_dir: Path, planned: Sequence[PlannedFile], stop: threading.Event) -> None:
    total = sum(file.size for file in planned)
    while not stop.wait(PROGRESS_INTERVAL_S):
        _print(progress_line(PROGRESS_DESCRIPTION, bytes_in_cache(blobs_dir, planned), total))


def download(repo: str, revision: str | None, cache_dir: str | None) -> None:
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils.tqdm import disable_progress_bars

    # Its own bars redraw up to ten times a second, each a log line here; the lines above replace them.
    disable_progress_bars()
    api = HfApi()
    info = api.model_info(repo, revision=revision, files_metadata=True)
    siblings = info.siblings or []
    weight_map = None
    if any(sibling.rfilename == SAFETENSORS_INDEX for sibling in siblings):
        index_path = hf_hub_download(repo, SAFETENSORS_INDEX, revision=info.sha, cache_dir=cache_dir)
        weight_map = json.loads(Path(index_path).read_text(encoding="utf-8")).get("weight_map") or {}
    planned = plan_download(siblings, weight_map)
    total = sum(file.size for file in planned)
    blobs_dir = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "blobs"
    _print(progress_line(PROGRESS_DESCRIPTION, bytes_in_cache(blobs_dir, planned), total))
    stop = threading.Event()
    reporter = threading.Thread(target=_report_progress, args=(blobs_dir, planned, stop), daemon=True)
    reporter.start()
    try:
        snapshot_download(repo, revision=info.sha, cache_dir=cache_dir, allow_patterns=[f.name for f in planned])
    finally:
        stop.set()
        reporter.join()
    _print(progress_line(PROGRESS_DESCRIPTION, bytes_in_cache(blobs_dir, planned), total))


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        raise SystemExit("usage: python -m worker.engines.hf_download --repo ID [...] -- ENGINE ARGV...")
    split = args.index("--")
    engine = args[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m worker.engines.hf_download")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision")
    parser.add_argument("--cache-dir")
    options = parser.parse_args(args[:split])
    if not engine:
        raise SystemExit("no engine command after --")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        try:
            download(options.repo, options.revision, options.cache_dir)
        except Exception as error:  # noqa: BLE001  the engine downloads by itself and reports its own error
            _print(f"weights download failed, the engine will try itself: {type(error).__name__}: {error}")
    os.execvp(engine[0], engine)


if __name__ == "__main__":
    main()
