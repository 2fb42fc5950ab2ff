"""The hub download step before a vLLM engine: what it fetches, how it counts progress, and that the engine
always starts after it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from worker.config import ModelConfig
from worker.engines.hf_download import PROGRESS_DESCRIPTION, PlannedFile, bytes_in_cache, plan_download
from worker.engines.loading import LoadPhase, parse_load_progress, progress_line
from worker.engines.vllm_args import (
    HF_DOWNLOAD_MODULE,
    VLLM_SERVER_MODULE,
    build_vllm_args,
    vllm_launch_command,
)

PRICING = {"prompt_per_mtok": "0.10", "completion_per_mtok": "0.40"}


def sibling(name: str, size: int, sha256: str | None = None) -> SimpleNamespace:
    """A repository file as `HfApi.model_info(files_metadata=True)` lists it."""
    lfs = SimpleNamespace(size=size, sha256=sha256) if sha256 else None
    return SimpleNamespace(rfilename=name, size=size, blob_id=f"git-{name}", lfs=lfs)


REPO_FILES = [
    sibling("config.json", 700),
    sibling("tokenizer.json", 9_000),
    sibling("tokenizer_config.json", 50_000),
    sibling("README.md", 4_000),
    sibling("model.safetensors.index.json", 24_000),
    sibling("model-00001-of-00002.safetensors", 4_900_000_000, "a" * 64),
    sibling("model-00002-of-00002.safetensors", 1_100_000_000, "b" * 64),
    sibling("consolidated.safetensors", 6_000_000_000, "c" * 64),  # a second copy vLLM does not read
    sibling("original/consolidated.00.pth", 6_000_000_000, "d" * 64),
    sibling("pytorch_model.bin", 6_000_000_000, "e" * 64),
]
INDEX = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
         "lm_head.weight": "model-00002-of-00002.safetensors"}


def test_the_index_names_the_weights_and_small_files_come_by_pattern() -> None:
    planned = plan_download(REPO_FILES, INDEX)
    assert [file.name for file in planned] == [
        "config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sum(file.size for file in planned) == 6_000_083_700
    assert planned[-1] == PlannedFile("model-00002-of-00002.safetensors", 1_100_000_000, "b" * 64)


def test_without_an_index_every_top_level_safetensors_is_fetched() -> None:
    planned = plan_download([f for f in REPO_FILES if f.rfilename != "model.safetensors.index.json"], None)
    assert {f.name for f in planned if f.name.endswith(".safetensors")} == {
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors"}


def test_progress_counts_whole_and_partly_written_blobs(tmp_path: Path) -> None:
    planned = [PlannedFile("a.safetensors", 1000, "a" * 64), PlannedFile("b.safetensors", 500, "b" * 64),
               PlannedFile("c.safetensors", 700, "c" * 64)]
    (tmp_path / ("a" * 64)).write_bytes(b"x" * 1000)
    (tmp_path / ("b" * 64 + ".incomplete")).write_bytes(b"x" * 200)
    assert bytes_in_cache(tmp_path, planned) == 1200
    assert bytes_in_cache(tmp_path / "missing", planned) == 0


def run_step(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    engine = [sys.executable, "-c", "import sys; print('engine started with', sys.argv[1:])", "--port", "8101"]
    return subprocess.run([sys.executable, "-m", HF_DOWNLOAD_MODULE, *args, "--", *engine], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120, check=True)


def test_offline_it_goes_straight_to_the_engine() -> None:
    done = run_step("--repo", "acme/chat-8b", env={"HF_HUB_OFFLINE": "1"})
    assert done.stdout.strip() == "engine started with ['--port', '8101']"


def test_a_failed_download_still_starts_the_engine_which_then_reports_its_own_error() -> None:
    # Nothing listens on port 9: the hub cannot be reached.
    done = run_step("--repo", "acme/chat-8b", env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
                                                   "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("weights download failed, the engine will try itself:")
    assert lines[-1] == "engine started with ['--port', '8101']"


def test_hub_sources_download_first_then_become_the_server() -> None:
    model = ModelConfig.model_validate({"id": "acme/chat-8b", "source": "acme/Chat-8B", "revision": "abc123",
                                        "engine_args": {"download_dir": "/models"}, "pricing": PRICING})
    command = vllm_launch_command("/opt/venv/bin/python", model, "127.0.0.1", 8101, download_first=True)
    split = command.index("--")
    assert command[:split] == ["/opt/venv/bin/python", "-m", HF_DOWNLOAD_MODULE, "--repo", "acme/Chat-8B",
                               "--revision", "abc123", "--cache-dir", "/models"]
    assert command[split + 1:] == ["/opt/venv/bin/python", "-m", VLLM_SERVER_MODULE,
                                   *build_vllm_args(model, "127.0.0.1", 8101)]


def test_its_progress_lines_are_read_as_the_download_phase() -> None:
    progress = parse_load_progress(progress_line(PROGRESS_DESCRIPTION, 3_000_000_000, 6_000_000_000))
    assert progress is not None and progress.phase is LoadPhase.downloading and progress.fraction == 0.5


def test_it_downloads_into_the_cache_with_progress_then_starts_the_engine(tmp_path: Path) -> None:
    import json

    from tests.engines.hub_files import serve_hub_files

    weights = os.urandom(3_000_000)
    files = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "README.md": b"# not fetched",
             "model.safetensors": weights, "original/consolidated.00.pth": b"not fetched either"}
    cache = tmp_path / "hub"
    with serve_hub_files("acme/tiny", files, lfs=frozenset({"model.safetensors", "original/consolidated.00.pth"})) \
            as endpoint:
        done = run_step("--repo", "acme/tiny", "--cache-dir", str(cache),
                        env={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": ""})
    lines = done.stdout.strip().splitlines()
    progress = [p for p in map(parse_load_progress, lines) if p is not None]
    total = len(weights) + len(files["config.json"]) + len(files["tokenizer.json"])
    assert progress[0].phase is LoadPhase.downloading and progress[0].total == total
    assert (progress[-1].done, progress[-1].total) == (total, total)
    assert lines[-1] == "engine started with ['--port', '8101']"
    [snapshot] = (cache / "models--acme--tiny" / "snapshots").iterdir()
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (snapshot / "model.safetensors").read_bytes() == weights
    assert json.loads((snapshot / "config.json").read_text()) == {"model_type": "llama"}
