"""How far the worker's GPU time estimate (for engines that report none, as vLLM) is from the exact figure, per
request, measured against the mock engine's own accounting.

    .venv/bin/python -m bench.gpu_time [--quick] [--doc docs/benchmarks-gpu-time.md]
    .venv/bin/python -m bench.gpu_time --render WORK_DIR/summary.json   # the page again, from a run's figures

One mock replica at the mock's default latency model, behind the worker's own gateway in this process (the
requests go through the gateway's ASGI entry, no HTTP client in between). A fixed, seeded mix of chat
completions (prompts of 5 to 400 words, 4 to 96 output tokens, half streamed, about 15% with n=2) is sent
in a closed loop at each load (requests in flight), on a fresh engine each time. The mock reports each
request's exact share of its measured step time (`usage.gpu_seconds`); the worker meters every request all
the same, and its meters' events (when the request was leased, its first byte, its end, its sequences,
whether it streamed, and its body's size) are recorded.

Those events are then replayed offline through `worker.capacity.gpu_time` under several models: the shipped
one (before its first byte a stream weighs sequences x (1 + prompt tokens / 256), the prompt tokens being
its body's size at 4 bytes a token), fixed prefill weights 2 (the earlier model), 1, 4 and 8 with the
prompt's size ignored, and an equal split of in-flight time (sequences ignored). The replay of the shipped
model must give what the live meters gave (checked, the page says how close).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.common import command_line, describe_machine, fmt, table_head
from tests.support.worker_process import serving
from worker.capacity.gpu_time import PREFILL_TOKENS_PER_DECODE, GpuTimeMeters, GpuTimeShare, prefill_weight
from worker.capacity.leasing import AdmissionLeaser
from worker.config import NodeConfig
from worker.engines.data_client import EngineDataClient
from worker.engines.mock import build_mock_app
from worker.engines.replica import ReplicaLease, _Interruption
from worker.gateway.app import serve_inference
from worker.gateway.context import RequestContext
from worker.gateway.gateway import Gateway
from worker.gateway.hooks import ObservingHook
from worker.gateway.prompt_count import BYTES_PER_TOKEN

MODEL = "bench/gpu-time"
REPLICA = "gpu-time-0"
WORDS = ("the", "river", "carries", "light", "and", "stone", "through", "garden", "where", "people", "read",
         "paper", "signal", "music", "engine", "queue", "batch", "token", "model", "window", "years", "good")


@dataclass(frozen=True)
class Workload:
    loads: tuple[int, ...] = (4, 16, 48)  # requests in flight (closed loop)
    requests: int = 120  # per load
    prompt_words: tuple[int, int] = (5, 400)
    output_tokens: tuple[int, int] = (4, 96)
    stream_share: float = 0.5
    n2_share: float = 0.15
    seed: int = 20


QUICK_WORKLOAD = Workload(loads=(2, 4), requests=12)


def request_bodies(workload: Workload) -> list[dict[str, Any]]:
    """The same requests at every load, in the same order."""
    rng = random.Random(workload.seed)
    bodies = []
    for _ in range(workload.requests):
        words = rng.randint(*workload.prompt_words)
        body: dict[str, Any] = {
            "model": MODEL, "messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=words))}],
            "max_tokens": rng.randint(*workload.output_tokens)}
        if rng.random() < workload.stream_share:
            body["stream"] = True
        if rng.random() < workload.n2_share:
            body["n"] = 2
        bodies.append(body)
    return bodies


# -- recording what the worker meters ------------------------------------------------------------------


class RecordingShare(GpuTimeShare):
    """A request's share that also keeps the times of the events it was metered at."""

    __slots__ = ("body_bytes", "ended", "first_byte_at", "leased", "stream")

    def __init__(self, prefill_weight: float, sequences: int, body_bytes: int) -> None:
        super().__init__(prefill_weight, sequences)
        self.body_bytes = body_bytes
        self.stream = False
        self.leased: float | None = None
        self.first_byte_at: float | None = None
        self.ended: float | None = None

    def start(self, meter: Any, stream: bool, at: float) -> None:
        if self.leased is not None:
            raise RuntimeError("a request was leased twice: one replica should never be excluded")
        self.leased, self.stream = at, stream
        super().start(meter, stream, at)

    def first_byte(self, at: float) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = at
        super().first_byte(at)

    def settle(self, at: float) -> float:
        if self.ended is None:
            self.ended = at
        return super().settle(at)


class RecordingMeters(GpuTimeMeters):
    def new_share(self, ctx: RequestContext) -> GpuTimeShare:
        share = super().new_share(ctx)  # the worker's own weights, kept with the events
        return RecordingShare(share.prefill_weight, share.sequences, ctx.body_bytes)


class Finished(ObservingHook):
    def __init__(self) -> None:
        self.contexts: list[RequestContext] = []

    async def finalize(self, ctx: RequestContext) -> None:
        self.contexts.append(ctx)


class OneReplica:
    """The admission the leaser asks: the one replica, always with room (the mock batches up to 256)."""

    def __init__(self, base_url: str) -> None:
        self.replica_id = REPLICA
        self.data = EngineDataClient(base_url)
        self.in_flight = 0
        self.on_free = None
        self.interruption = _Interruption()

    def admit_now(self, ctx: RequestContext, exclude: object = None) -> ReplicaLease:
        self.in_flight += 1
        return ReplicaLease(self, self.interruption)  # type: ignore[arg-type]

    async def wait_for_slot(self, ctx: RequestContext, size_bytes: int = 0) -> ReplicaLease:
        raise AssertionError("the replica always has room")


async def post(gateway: Gateway, body: dict[str, Any], request_id: str) -> int:
    """One chat completion through the gateway's ASGI entry, read to its end: its status."""
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]}
    sent = [{"type": "http.request", "body": orjson.dumps(body), "more_body": False}]
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        if sent:
            return sent.pop()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(message["status"]))

    await serve_inference(gateway, "chat.completions", scope, receive, send)
    return statuses[0]


async def measure_load(in_flight: int, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The bodies in a closed loop of `in_flight` users on a fresh mock replica: each request's exact figure
    and metered events, and the engine's busy seconds."""
    config = NodeConfig.model_validate({
        "worker": {"id": "bench"},
        "models": [{"id": MODEL, "engine": "mock", "source": "local/x", "gpus_per_replica": 1,
                    "pricing": {"prompt_per_mtok": "1", "completion_per_mtok": "1"}}]})
    meters, finished = RecordingMeters(), Finished()
    pending = list(enumerate(bodies))
    failed = 0
    async with serving(build_mock_app(config.models[0])) as engine_url:
        replica = OneReplica(engine_url)
        gateway = Gateway(config, AdmissionLeaser(replica, meters), hooks=[finished])

        async def user() -> None:
            nonlocal failed
            while pending:
                index, body = pending.pop(0)
                if await post(gateway, body, f"req-{index}") != 200:
                    failed += 1

        started = time.monotonic()
        try:
            await asyncio.gather(*(user() for _ in range(in_flight)))
            duration = time.monotonic() - started
            await gateway.aclose()
            async with httpx.AsyncClient(base_url=engine_url) as client:
                accounting = (await client.get("/mock/accounting")).json()
        finally:
            await replica.data.aclose()
    records = []
    for ctx in finished.contexts:
        share = ctx.gpu_timer
        if ctx.outcome != "ok" or ctx.gpu_seconds_source != "engine" or not isinstance(share, RecordingShare):
            failed += 1
            continue
        records.append({"exact": ctx.gpu_seconds, "live_estimate": share.seconds, "leased": share.leased,
                        "first_byte": share.first_byte_at, "ended": share.ended, "sequences": share.sequences,
                        "stream": share.stream, "body_bytes": share.body_bytes})
    return {"in_flight": in_flight, "duration_s": duration, "failed": failed,
            "engine_busy_s": accounting["busy_seconds"], "worker_busy_s": meters.meter(REPLICA).busy_seconds(),
            "requests": records}


# -- replaying the events under each model -------------------------------------------------------------

# A model: (prefill-phase weight, sequences) of a request from its record.
Model = Callable[[dict[str, Any]], tuple[float, int]]


def _prefill_weight(weight: float) -> Model:
    return lambda record: (weight, record["sequences"])


def _shipped(record: dict[str, Any]) -> tuple[float, int]:
    return prefill_weight(record["body_bytes"]), record["sequences"]


MODELS: dict[str, Model] = {
    f"shipped (prefill weight 1 + prompt tokens / {PREFILL_TOKENS_PER_DECODE:g})": _shipped,
    "phase weight 2, prompt size ignored": _prefill_weight(2.0),
    "prefill weight 1": _prefill_weight(1.0),
    "prefill weight 4": _prefill_weight(4.0),
    "prefill weight 8": _prefill_weight(8.0),
    "equal split (weight 1, sequences ignored)": lambda record: (1.0, 1),
}
SHIPPED = next(iter(MODELS))


def replay(records: list[dict[str, Any]], model: Model) -> list[float]:
    """Each request's estimate when its events are replayed, in time order, through one replica's meter."""
    meter = GpuTimeMeters().meter(REPLICA)
    shares = []
    events: list[tuple[float, int, int]] = []  # (time, order at a tie: ends first, index)
    for index, record in enumerate(records):
        prefill_weight, sequences = model(record)
        shares.append(GpuTimeShare(prefill_weight, sequences))
        events.append((record["leased"], 2, index))
        if record["first_byte"] is not None:
            events.append((record["first_byte"], 1, index))
        events.append((record["ended"], 0, index))
    for at, kind, index in sorted(events):
        if kind == 2:
            shares[index].start(meter, records[index]["stream"], at)
        elif kind == 1:
            shares[index].first_byte(at)
        else:
            shares[index].settle(at)
    return [share.seconds for share in shares]


def errors_of(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    records = [record for record in run["requests"] if record["exact"] > 0]
    figures = {}
    for name, model in MODELS.items():
        estimates = replay(records, model)
        errors = sorted(abs(estimate / record["exact"] - 1) for estimate, record in zip(estimates, records,
                                                                                          strict=True))
        figures[name] = {"median": statistics.median(errors), "p90": errors[math.ceil(0.9 * len(errors)) - 1],
                         "worst": errors[-1], "total_s": sum(estimates)}
    shipped = replay(records, MODELS[SHIPPED])
    figures[SHIPPED]["replay_vs_live"] = max(abs(a - r["live_estimate"]) for a, r in zip(shipped, records,
                                                                                         strict=True))
    return figures


# -- the page -------------------------------------------------------------------------------------------


def render_page(summary: dict[str, Any]) -> str:
    workload = summary["workload"]
    runs = summary["runs"]
    lines = [
        "# Benchmark: the GPU time estimate against the mock's exact figure", "",
        (f"Generated by `{summary['command']}` on {summary['generated_at']}, {summary['machine']}. "
        "Rerun it to refresh this page; `--render WORK_DIR/summary.json` writes it again from a run's figures."),
        "",
        ("On vLLM the worker estimates each request's GPU time from what it sees of its replica "
        "(`worker/capacity/gpu_time.py`): the time between two events on a replica is split among the requests "
        "in flight on it, each weighing its sequences (`n` x prompts) times a phase weight: before a stream's first "
        "byte 1 + prompt tokens / "
        f"{summary['prefill_tokens_per_decode']:g} in the shipped model (a fixed prefill weight in the others), "
        "after it 1 (a non-streamed request weighs 1 throughout). The mock engine "
        "reports the exact figure: each engine step's measured time split among the sequences in it by the "
        "latency model's terms. Here one mock replica at the mock's default latency model serves the same "
        f"seeded mix at each load: {workload['requests']} chat completions, prompts of "
        f"{workload['prompt_words'][0]}-{workload['prompt_words'][1]} words, "
        f"{workload['output_tokens'][0]}-{workload['output_tokens'][1]} output tokens, "
        f"{workload['stream_share']:.0%} streamed, {workload['n2_share']:.0%} with n=2, sent in a closed loop "
        "with a fixed number of requests in flight, one run per load. The worker's meter events of every request (lease, first "
        "byte, end, sequences, streamed or not, body size) are recorded and replayed offline under each model below."),
        "",
        ("The shipped model's prompt tokens are what the worker knows for free when it leases a replica: the "
        f"request body's size as received at {summary['bytes_per_token']} bytes a token (no tokenizer is asked "
        "before the lease, nothing is serialised again). Error is |estimate / exact "
        "- 1| per request; `estimate total / engine busy` compares the estimates' sum (the worker-seen busy "
        "time, lease to end, by construction) with the engine's own busy time."),
        "",
        "## Results", "",
        *table_head("| requests in flight | model | median error | p90 error | worst error "
                    "| estimate total / engine busy |"),
    ]
    for run in runs:
        for name, figures in run["errors"].items():
            lines.append(f"| {run['in_flight']} | {name} | {figures['median']:.1%} | {figures['p90']:.1%} | "
                         f"{figures['worst']:.1%} | {fmt(figures['total_s'] / run['engine_busy_s'], 3)} |")
    lines += ["", "## Runs", "",
              *table_head("| requests in flight | requests | failed | duration s | engine busy s "
                          "| exact sum / engine busy | shipped replay vs live meters, max s |")]
    for run in runs:
        exact_sum = sum(record["exact"] for record in run["requests"])
        lines.append(f"| {run['in_flight']} | {len(run['requests'])} | {run['failed']} | "
                     f"{fmt(run['duration_s'], 1)} | {fmt(run['engine_busy_s'], 3)} | "
                     f"{fmt(exact_sum / run['engine_busy_s'], 3)} | {run['errors'][SHIPPED]['replay_vs_live']:.1e} |")
    lines += ["", ("`exact sum / engine busy` checks the mock's conservation (its shares sum to its busy time); the "
              "last column, that the offline replay of the shipped model gives what the worker's live meters gave."),
              ""]
    return "\n".join(lines)


def render(summary_path: Path, doc: Path) -> None:
    summary = json.loads(summary_path.read_text())
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render_page(summary))


async def run(workload: Workload) -> list[dict[str, Any]]:
    bodies = request_bodies(workload)
    runs = []
    for in_flight in workload.loads:
        measured = await measure_load(in_flight, bodies)
        measured["errors"] = errors_of(measured)
        runs.append(measured)
        print(f"{in_flight} in flight: {len(measured['requests'])} requests in {measured['duration_s']:.1f} s",
              file=sys.stderr)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a tiny run (two light loads, 12 requests each)")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks-gpu-time.md"))
    parser.add_argument("--work-dir", type=Path, help="where summary.json goes (default: a new temp dir)")
    parser.add_argument("--render", type=Path, metavar="SUMMARY_JSON",
                        help="write the page from an earlier run's summary.json instead of running")
    args = parser.parse_args(argv)
    if args.render:
        render(args.render, args.doc)
        print(f"wrote {args.doc}")
        return
    workload = QUICK_WORKLOAD if args.quick else Workload()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-gpu-time-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "command": command_line("bench.gpu_time", argv), "machine": describe_machine(),
        "generated_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "workload": asdict(workload),
        "prefill_tokens_per_decode": PREFILL_TOKENS_PER_DECODE, "bytes_per_token": BYTES_PER_TOKEN,
        "runs": asyncio.run(run(workload)),
    }
    summary_path = work_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1))
    render(summary_path, args.doc)
    print(f"wrote {args.doc} (summary.json in {work_dir})")


if __name__ == "__main__":
    main()
