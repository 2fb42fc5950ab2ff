"""Fleet benchmark: LiteLLM's Router in front of two workers while the preferred one saturates, drains or
loses its GPU.

Starts a preferred worker (order 1: `max_num_seqs` 4) and a backup (order 2: `max_num_seqs` 32), both
`worker serve --engine mock` with the same engine speed, plus, for the GPU scenario, a preferred worker
whose single GPU is a fake NVML device (this script's `gpu-node` mode: a worker node that takes XID
events on stdin). A LiteLLM Router (the library, in this process) sends them open-loop Poisson streaming
load, and each scenario runs three phases of equal length:

- saturation: the offered rate quadruples during the middle phase, beyond what the preferred worker
  can batch (it answers 429 with Retry-After), then drops back;
- drain: POST /admin/drain on the preferred worker (503 with Retry-After), then /admin/undrain;
- gpu: XID 79 on the preferred worker's GPU (its replica is quarantined: 503), then the node is replaced
  by a new one with a healthy GPU on the same address (a failed GPU stays failed, by design).

Per phase it reports the share of requests that succeeded as the client saw them, which worker served
them (the `x-worker-id` header LiteLLM relays) and TTFT p50/p99 (from calling the router to the first
streamed token), and writes docs/fleet.md.

Usage: .venv/bin/python bench/fleet.py [--phase-s 8] [--rate 3] [--out docs/fleet.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

from bench.arrivals import poisson_arrivals

if TYPE_CHECKING:
    from litellm import Router

MODEL = "bench/fleet"
ADMIN_TOKEN = "fleet-bench-admin-0123456789abcdef0123"
OUTPUT_TOKENS = 24
PROMPT = [{"role": "user", "content": "tell me a story"}]
# Both workers step at the same speed, so TTFT differences come from routing, not from the engines.
MOCK_LATENCY = {"step_base_ms": 25.0, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0}
PREFERRED_SEQS, BACKUP_SEQS = 4, 32
SATURATION_FACTOR = 4.0
# The router as tests/fleet configures it (see docs/fleet.md for why each setting).
ROUTER_SETTINGS: dict[str, Any] = {"num_retries": 0, "allowed_fails": 0, "cooldown_time": 5, "timeout": 60}
PHASES = ("before", "during", "after")


# -- workers --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(worker_id: str, port: int, max_num_seqs: int) -> dict[str, Any]:
    return {
        "worker": {"id": worker_id, "host": "127.0.0.1", "port": port,
                   # stats may age on a busy 2-core machine without the worker counting as saturated
                   "engine_health": {"stats_interval_s": 0.1, "stats_stale_after_s": 2.0, "probe_interval_s": None}},
        "models": [{
            "id": MODEL, "engine": "mock", "source": "local/fleet",
            "engine_args": {"max_model_len": 2048, "max_num_seqs": max_num_seqs},
            "pricing": {"prompt_per_mtok": "0", "completion_per_mtok": "0"},
            "mock": MOCK_LATENCY,
        }],
    }


@dataclass
class Worker:
    """A worker process: `worker serve`, or this script's `gpu-node` (one fake GPU, XIDs on stdin)."""

    worker_id: str
    port: int
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as client:
            while True:
                if self.process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.worker_id} did not become ready; see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/health/ready")).status_code == 200:
                        return
                await asyncio.sleep(0.2)

    async def inject_xid(self, xid: int, gpu_index: int = 0) -> None:
        assert self.process.stdin is not None, "only a gpu-node takes XIDs"
        self.process.stdin.write(f"{gpu_index} {xid}\n".encode())
        await self.process.stdin.drain()

    async def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 60)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def start_worker(worker_id: str, max_num_seqs: int, workdir: Path, *, fake_gpu: bool = False,
                       port: int | None = None) -> Worker:
    port = port or _free_port()
    config_path = workdir / f"{worker_id}-{port}.yaml"
    config_path.write_text(yaml.safe_dump(_config(worker_id, port, max_num_seqs), sort_keys=False))
    env = {**os.environ, "WORKER_AUTH": "false", "WORKER_LOG_LEVEL": "warning", "WORKER_ADMIN_TOKEN": ADMIN_TOKEN,
           "WORKER_DB_URL": f"sqlite:///{workdir / f'{worker_id}-ledger.db'}"}
    command = ([sys.executable, str(Path(__file__).resolve()), "gpu-node", "--config", str(config_path)] if fake_gpu
               else [sys.executable, "-m", "worker", "serve", "--config", str(config_path), "--engine", "mock"])
    log_path = workdir / f"{worker_id}.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.PIPE if fake_gpu else subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, env=env, cwd=workdir)
    worker = Worker(worker_id, port, process, log_path)
    await worker.wait_ready()
    return worker


async def admin(worker: Worker, action: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(f"{worker.base_url}/admin/{action}",
                                     headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        response.raise_for_status()


async def refusals_by_reason(worker: Worker) -> Counter[str]:
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{worker.base_url}/metrics")).text
    return Counter({sample.labels["reason"]: int(sample.value)
                    for family in text_string_to_metric_families(text) for sample in family.samples
                    if sample.name == "worker_admission_rejections_total"})


# -- load -----------------------------------------------------------------------------------------


def make_router(preferred: Worker, backup: Worker) -> Router:
    from litellm import Router

    def deployment(worker: Worker, order: int) -> dict[str, Any]:
        return {"model_name": MODEL, "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{worker.base_url}/v1",
                                                        "api_key": "unused", "order": order}}

    return Router(model_list=[deployment(preferred, 1), deployment(backup, 2)], **ROUTER_SETTINGS)


@dataclass
class Outcome:
    phase: str
    sent_at: float  # seconds since the scenario started
    ok: bool
    ttft_s: float | None = None
    worker_id: str | None = None
    failure: str | None = None


async def one_request(router: Router, phase: str, sent_at: float) -> Outcome:
    started = time.monotonic()
    outcome = Outcome(phase, sent_at, ok=False)
    finish_reason = None
    try:
        stream = await router.acompletion(model=MODEL, messages=PROMPT, max_tokens=OUTPUT_TOKENS, stream=True)
        outcome.worker_id = stream._hidden_params["additional_headers"].get("llm_provider-x-worker-id")
        async for chunk in stream:
            for choice in chunk.choices:
                if outcome.ttft_s is None and choice.delta.content:
                    outcome.ttft_s = time.monotonic() - started
                finish_reason = choice.finish_reason or finish_reason
    except Exception as error:  # noqa: BLE001  any exception is what the router's client would see
        status = getattr(error, "status_code", None)
        outcome.failure = f"{type(error).__name__}{f' {status}' if status else ''}"
        return outcome
    outcome.ok = finish_reason in ("length", "stop") and outcome.ttft_s is not None
    if not outcome.ok:
        outcome.failure = f"finish_reason {finish_reason}"
    return outcome


@dataclass
class Phase:
    name: str
    rate: float
    # Runs as the phase begins, alongside its load (a node replacement takes seconds).
    action: Callable[[], Awaitable[None]] | None = None


@dataclass
class ScenarioResult:
    name: str
    disruption: str
    recovery: str
    phases: list[Phase]
    phase_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    preferred_id: str = ""
    refusals: Counter[str] = field(default_factory=Counter)  # by the preferred worker, by reason
    backup_refusals: Counter[str] = field(default_factory=Counter)
    back_after_s: float | None = None  # from the recovery action to the first request the preferred worker served


async def run_phases(router: Router, result: ScenarioResult, seed: int) -> None:
    started = time.monotonic()
    requests: list[asyncio.Task[Outcome]] = []
    actions: list[asyncio.Task[None]] = []
    for index, phase in enumerate(result.phases):
        phase_start = index * result.phase_s
        if phase.action is not None:
            actions.append(asyncio.create_task(phase.action()))
        for at in poisson_arrivals(phase.rate, result.phase_s, seed * 10 + index):
            await asyncio.sleep(max(0.0, started + phase_start + at - time.monotonic()))
            requests.append(asyncio.create_task(one_request(router, phase.name, phase_start + at)))
        await asyncio.sleep(max(0.0, started + phase_start + result.phase_s - time.monotonic()))
    result.outcomes = list(await asyncio.gather(*requests))
    await asyncio.gather(*actions)
    recovered_at = 2 * result.phase_s
    back = [o.sent_at for o in result.outcomes if o.sent_at >= recovered_at and o.worker_id == result.preferred_id]
    result.back_after_s = min(back) - recovered_at if back else None


async def saturation(preferred: Worker, backup: Worker, rate: float, phase_s: float) -> ScenarioResult:
    result = ScenarioResult(
        "saturation", f"offered load x{SATURATION_FACTOR:g} (the preferred worker answers 429)", "load drops back",
        [Phase("before", rate), Phase("during", rate * SATURATION_FACTOR), Phase("after", rate)], phase_s,
        preferred_id=preferred.worker_id)
    before, backup_before = await refusals_by_reason(preferred), await refusals_by_reason(backup)
    await run_phases(make_router(preferred, backup), result, seed=1)
    result.refusals = await refusals_by_reason(preferred) - before
    result.backup_refusals = await refusals_by_reason(backup) - backup_before
    return result


async def drain(preferred: Worker, backup: Worker, rate: float, phase_s: float) -> ScenarioResult:
    result = ScenarioResult(
        "drain", "POST /admin/drain (503 + Retry-After: 5)", "POST /admin/undrain",
        [Phase("before", rate), Phase("during", rate, lambda: admin(preferred, "drain")),
         Phase("after", rate, lambda: admin(preferred, "undrain"))], phase_s, preferred_id=preferred.worker_id)
    before, backup_before = await refusals_by_reason(preferred), await refusals_by_reason(backup)
    await run_phases(make_router(preferred, backup), result, seed=2)
    result.refusals = await refusals_by_reason(preferred) - before
    result.backup_refusals = await refusals_by_reason(backup) - backup_before
    return result


async def gpu_failure(on_gpu: Worker, backup: Worker, workdir: Path, rate: float, phase_s: float,
                      running: list[Worker]) -> ScenarioResult:
    """`running` lists the processes to stop in the end: the replacement node takes the failed one's place."""

    async def replace() -> None:
        result.refusals = await refusals_by_reason(on_gpu)
        await on_gpu.stop()
        running.remove(on_gpu)
        running.append(await start_worker(on_gpu.worker_id, PREFERRED_SEQS, workdir, fake_gpu=True, port=on_gpu.port))

    result = ScenarioResult(
        "gpu", "XID 79 on the preferred worker's GPU (replica quarantined: 503 + Retry-After: 5)",
        "the node is replaced by one with a healthy GPU, same address",
        [Phase("before", rate), Phase("during", rate, lambda: on_gpu.inject_xid(79)), Phase("after", rate, replace)],
        phase_s, preferred_id=on_gpu.worker_id)
    backup_before = await refusals_by_reason(backup)
    await run_phases(make_router(on_gpu, backup), result, seed=3)
    result.backup_refusals = await refusals_by_reason(backup) - backup_before
    return result


async def warm_up(preferred: Worker, backup: Worker) -> None:
    """First requests and first failures import much of LiteLLM lazily; keep that out of the numbers."""
    router = make_router(preferred, backup)
    await admin(preferred, "drain")
    await asyncio.gather(*(one_request(router, "warm-up", 0.0) for _ in range(4)))
    await admin(preferred, "undrain")
    await asyncio.gather(*(one_request(make_router(preferred, backup), "warm-up", 0.0) for _ in range(4)))


# -- report ---------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def phase_row(result: ScenarioResult, phase: Phase) -> str:
    outcomes = [o for o in result.outcomes if o.phase == phase.name]
    ok = [o for o in outcomes if o.ok]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    on_preferred = sum(o.worker_id == result.preferred_id for o in ok)
    failures = Counter(o.failure for o in outcomes if not o.ok)
    share = f"{100 * len(ok) / len(outcomes):.1f}%" if outcomes else "-"
    return (f"| {result.name} | {phase.name} | {phase.rate:g} | {len(outcomes)} | {share} | "
            f"{on_preferred} / {len(ok) - on_preferred} | {_ms(percentile(ttfts, 50))} | {_ms(percentile(ttfts, 99))} | "
            f"{', '.join(f'{n} x {reason}' for reason, n in failures.items()) or '-'} |")


def _reasons(refusals: Counter[str]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(refusals.items())) or "none"


def report(results: list[ScenarioResult], rate: float, phase_s: float, wall_s: float, load_before: float) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    settings = ", ".join(f"{key}={value}" for key, value in ROUTER_SETTINGS.items())
    header = f"""\
# A fleet behind LiteLLM: saturation, drain and GPU loss

Generated by `bench/fleet.py` on {now} in {wall_s:.0f} s, {os.cpu_count()} CPU cores ({platform.machine()}),
load average {load_before:.1f} when it started; the router, the workers and their mock engines share these
cores, so compare phases with each other rather than reading absolute figures.

## Setup

- Router: LiteLLM {package_version("litellm")} `Router` (the Python library), one model group `{MODEL}` with two
  deployments, each `openai/{MODEL}` at a worker's `/v1`: the preferred worker with `order: 1`, the backup
  with `order: 2`. Settings: `{settings}`.
- Workers: `worker serve --engine mock`, one engine step = {MOCK_LATENCY["step_base_ms"]:g} ms on both; the
  preferred one has `max_num_seqs` {PREFERRED_SEQS} (so it admits {PREFERRED_SEQS} requests at a time), the backup
  {BACKUP_SEQS}. In the GPU scenario the preferred worker is a node on one fake NVML GPU.
- Load: open-loop Poisson arrivals of streaming chat completions ({OUTPUT_TOKENS} tokens), {rate:g} req/s (x{SATURATION_FACTOR:g}
  in the middle phase of the saturation scenario); each phase lasts {phase_s:g} s. A request succeeded when
  the client got a complete stream (finish_reason `length`) and no exception. TTFT: from calling the router
  to the first streamed token, successful requests only. A request belongs to the phase in which it was sent;
  with a few dozen requests per phase, p99 is close to the slowest one.

Reproduce: `.venv/bin/python bench/fleet.py` (rewrites this file); the same scenarios, with assertions instead of
numbers, are `tests/fleet/`.

## Results

| scenario | phase | offered req/s | requests | succeeded | served by preferred / backup | TTFT p50 ms | TTFT p99 ms | failures as the client saw them |
|---|---|---|---|---|---|---|---|---|
"""
    rows = [phase_row(result, phase) for result in results for phase in result.phases]
    notes = ["", "What happened at the start of `during` and of `after`, what each worker refused (its",
             "`worker_admission_rejections_total`), and when the router sent the preferred worker traffic again",
             "(the first request it served, counted from the recovery):", ""]
    for result in results:
        back = "not within the phase" if result.back_after_s is None else f"after {result.back_after_s:.1f} s"
        notes.append(f"- **{result.name}**: during = {result.disruption}; after = {result.recovery}. "
                     f"Refused by the preferred worker: {_reasons(result.refusals)}; by the backup: "
                     f"{_reasons(result.backup_refusals)}. Back on the preferred worker {back}.")
    return "\n".join([header + "\n".join(rows), *notes, "", EXPLANATION])


EXPLANATION = """\
## How the router and the worker work together

- **Refuse before the first byte.** A saturated worker answers 429 at once (admission control); a draining
  worker, and a worker whose replica sits on a failed GPU, answer 503. All carry `Retry-After` and an OpenAI
  error body and come before any byte of a stream, so LiteLLM sees a failed attempt and moves the request,
  streaming or not; the client never sees the refusal.
- **`order` and the order fallback.** LiteLLM sends every request to the lowest `order` it may use. When that
  deployment refuses, the same call falls through to the next order (the answer then carries
  `x-litellm-attempted-fallbacks: 1`). A *retry* (`num_retries`) picks from the lowest order again, which is
  the worker that just refused, so `num_retries=0` is the useful setting with one worker per order; the
  cross-group `fallbacks` (another model group) still apply when every order has refused.
- **Cooldown = the worker's Retry-After.** With `allowed_fails=0` the first refusal takes the worker out of the
  picks, for as long as that answer's `Retry-After` says: LiteLLM prefers the header to `cooldown_time`, which
  only applies to failures without one (a refused connection). A drain or a failed GPU says 5 s; a 429 says
  when the worker expects room, from its recent completion rate. So the worker decides how soon it is asked
  again, and the router asks it once per cooldown rather than once per request. With LiteLLM's default
  (`allowed_fails` 3) a refusing worker is asked three more times before its cooldown starts.
- **Cooldowns live in each Router object** (or in its Redis, when one is configured): every router process
  finds out about a refusing worker by itself, at the cost of one refused attempt.
- **What cannot be moved.** A stream that has started stays on its worker. When a GPU fails, the streams
  already running on it end with the contract's error chunk (`finish_reason: error`), which LiteLLM raises to
  its caller as `APIConnectionError` (status 500) carrying the worker's message; that is the one failure in
  the GPU scenario's `before` row (sent before the XID, still streaming when it came). Requests arriving after
  the failure are refused before their first byte and move.
- **When every worker refuses.** If every deployment of the group, and of its `fallbacks`, is cooling down,
  LiteLLM answers its caller 429 itself (`RouterRateLimitError`). Spare capacity in the fleet, or a reserve
  model group in `fallbacks`, is what keeps refusals away from clients. (On a machine starved of CPU by other
  work, both workers here fill up and such 429s appear in the table.)
- **A failed GPU stays failed.** The node quarantines its replicas for good; recovery is a new node (or a
  restarted one on healthy hardware). Once it answers on the same address and the last cooldown has run out,
  the router prefers it again.

## Configuring LiteLLM in front of workers

```python
from litellm import Router

def worker(url: str, order: int, group: str = "acme/model") -> dict:
    return {"model_name": group,
            "litellm_params": {"model": "openai/acme/model", "api_base": f"{url}/v1",
                               "api_key": "<worker API key>", "order": order}}

router = Router(
    model_list=[worker("http://worker-a:8000", 1), worker("http://worker-b:8000", 2),
                worker("http://worker-c:8000", 1, group="acme/model-reserve")],
    fallbacks=[{"acme/model": ["acme/model-reserve"]}],
    num_retries=0,      # the order fallback moves a refused request; a retry would ask the same worker
    allowed_fails=0,    # one refusal cools the worker down for its Retry-After
    cooldown_time=5,    # for failures without Retry-After (connection refused)
)
```

The worker that served a request is in its response headers: LiteLLM relays them in
`response._hidden_params["additional_headers"]` (`llm_provider-x-worker-id`, `llm_provider-x-worker-replica`,
next to its own `x-litellm-attempted-fallbacks`), for streams as well.

## Which router above the workers

A worker node decides for itself (admission, 429 with `Retry-After` before the first byte, drain,
GPU quarantine); what sits above a fleet of nodes decides where each request goes. Three kinds fit,
at different scales:

| | LiteLLM Router | OpenRouter (and io.net's IO Intelligence) | GIE / llm-d inference gateway |
|---|---|---|---|
| what it is | a Python library or proxy you run, with a list of worker URLs | a public marketplace that routes users' requests among providers; your node(s) are one provider's endpoint | Kubernetes Gateway API + an endpoint picker over an `InferencePool` of pods |
| picks a node by | `order`, then failures: a refusal cools the node down for its `Retry-After` | price and uptime across providers; not your nodes' load | each node's live queue, running requests and KV-cache use (`/metrics/node`), plus prefix-cache affinity |
| sees load | only refusals it receives (each router process on its own) | only its own outcomes (429s, errors, latency) | polls every node continuously |
| where | anywhere with HTTP to the nodes | the public internet (your node's URL, `/v1/models` and `/openrouter/models` listings) | inside one Kubernetes cluster |
| use it when | a handful of nodes, failover and a reserve group, no Kubernetes (this page's measurements) | you sell capacity to the public, or take BYOK traffic for io.net | many nodes of the same models in a cluster, where queue-aware placement pays: long prompts, bursty load, shared prefixes |

They stack: OpenRouter reaches one public URL per provider endpoint, and behind that URL either one
node or a router of your own (LiteLLM's proxy, or a GIE Gateway in front of a pool). What changes
with the layer:

- **LiteLLM** learns a node is full from its 429 and skips it for `Retry-After` seconds; until then it
  sends by `order` regardless of load. Good for failover, not for balancing load across equal nodes.
- **OpenRouter** counts every 5xx, 401/402/404 and mid-stream error against the provider's uptime, and
  moves users to other providers below 95%; it never knows which of your nodes answered. Keep
  refusals to early 429s (the worker's admission control does) and spread load yourself when one URL
  fronts several nodes. io.net deployments are prepaid and expire: extend them before a node's URL
  disappears (`deploy/ionet/README.md`).
- **GIE / llm-d** schedule every request from the model-server metrics of each node, so a node must
  answer them as one server: `/metrics/node` does (the worker's own queue counted as waiting), while
  `/metrics` re-exports each engine replica. The picker chooses a node; the node then chooses its
  replica. Put nodes serving the same models in one pool. Setup: `deploy/kubernetes/gie/README.md`.
"""


# -- entry points ---------------------------------------------------------------------------------


SCENARIOS = ("saturation", "drain", "gpu")


async def run(rate: float, phase_s: float, out: Path, scenarios: tuple[str, ...], logs: Path | None) -> None:
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")  # no download of LiteLLM's price map
    import litellm

    litellm.suppress_debug_info = True
    began, load_before = time.monotonic(), os.getloadavg()[0]
    results: list[ScenarioResult] = []
    with contextlib.ExitStack() as stack:
        workdir = logs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        running: list[Worker] = []  # whatever is running now, for the final stop
        try:
            preferred, backup = await asyncio.gather(start_worker("preferred", PREFERRED_SEQS, workdir),
                                                     start_worker("backup", BACKUP_SEQS, workdir))
            running += [preferred, backup]
            await warm_up(preferred, backup)
            for name, scenario in (("saturation", saturation), ("drain", drain)):
                if name in scenarios:
                    results.append(await scenario(preferred, backup, rate, phase_s))
                    _progress(results[-1])
            if "gpu" in scenarios:
                on_gpu = await start_worker("preferred-on-gpu", PREFERRED_SEQS, workdir, fake_gpu=True)
                running.append(on_gpu)
                results.append(await gpu_failure(on_gpu, backup, workdir, rate, phase_s, running))
                _progress(results[-1])
        finally:
            await asyncio.gather(*(worker.stop() for worker in running))
            await litellm.close_litellm_async_clients()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results, rate, phase_s, time.monotonic() - began, load_before))
    print(f"wrote {out}")


def _progress(result: ScenarioResult) -> None:
    for phase in result.phases:
        outcomes = [o for o in result.outcomes if o.phase == phase.name]
        print(f"{result.name:<10} {phase.name:<6} {len(outcomes):>4} requests, "
              f"{sum(not o.ok for o in outcomes)} failed", flush=True)


async def serve_gpu_node(config_path: str) -> None:
    """A worker node on one fake NVML GPU; each stdin line `<gpu index> <xid>` delivers an XID event."""
    import uvicorn

    from worker.cli.serve import DrainingServer
    from worker.config import Settings, load_node_config
    from worker.gpu import FakeNvmlBackend, GpuMonitor
    from worker.logs import configure_logging
    from worker.node import WorkerNode

    settings = Settings.from_env(config=config_path)
    configure_logging(settings.log_level)
    config = load_node_config(settings.config)
    nvml = FakeNvmlBackend.with_gpus(1)
    node = WorkerNode(config, settings, gpu_count=1, gpu_monitor=GpuMonitor(nvml, interval_s=0.2, event_wait_ms=20))
    loop = asyncio.get_running_loop()

    def read_xids() -> None:  # a daemon thread: a blocked read never holds up the exit
        for line in sys.stdin:
            index, xid = (int(part) for part in line.split())
            loop.call_soon_threadsafe(nvml.inject_xid, index, xid)

    threading.Thread(target=read_xids, name="xid-reader", daemon=True).start()
    server = DrainingServer(uvicorn.Config(
        node.app, host=config.worker.host, port=config.worker.port, http="httptools", access_log=False,
        log_config=None, timeout_graceful_shutdown=5, lifespan="on"), drain=node.drain)
    await server.serve()


def _event_loop_run(main: Awaitable[None]) -> None:
    try:
        import uvloop

        uvloop.run(main)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(main)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    gpu_node = sub.add_parser("gpu-node", help="(used by the benchmark) a worker on one fake GPU, XIDs on stdin")
    gpu_node.add_argument("--config", required=True)
    parser.add_argument("--rate", type=float, default=3.0, help="steady offered load, requests/s")
    parser.add_argument("--phase-s", type=float, default=8.0, help="seconds per phase (three per scenario)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {SCENARIOS}")
    parser.add_argument("--logs", type=Path, help="keep the workers' configs and logs in this folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "fleet.md")
    args = parser.parse_args()
    if args.mode == "gpu-node":
        _event_loop_run(serve_gpu_node(args.config))
        return
    scenarios = tuple(name for name in args.scenarios.split(",") if name)
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    _event_loop_run(run(args.rate, args.phase_s, args.out, scenarios, args.logs))


if __name__ == "__main__":
    main()
