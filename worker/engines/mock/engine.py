"""The mock engine's core: the model's limits, the scheduler task, faults and metrics in one object."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence as Seq

from worker.config import ModelConfig
from worker.engines.mock.errors import engine_failed, model_not_found
from worker.engines.mock.faults import FaultState
from worker.engines.mock.kv_publisher import KvEventPublisher
from worker.engines.mock.latency import LatencyModel
from worker.engines.mock.metrics import EngineMetrics
from worker.engines.mock.scheduler import EngineLimits, Scheduler
from worker.engines.mock.sequence import Sequence, StopMatcher
from worker.engines.mock.tokens import TokenSampler, prompt_fingerprint

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"  # the server this engine answers like


class GpuTimeRecord:
    """What the engine's finished requests used of its busy time, by response id (the latest
    `capacity`), for tests to compare with what the worker attributes."""

    def __init__(self, scheduler: Scheduler, capacity: int = 100_000) -> None:
        self._scheduler = scheduler
        self._capacity = capacity
        self.requests: dict[str, float] = {}

    def record(self, response_id: str, gpu_seconds: float) -> None:
        self.requests[response_id] = gpu_seconds
        if len(self.requests) > self._capacity:
            del self.requests[next(iter(self.requests))]

    def snapshot(self) -> dict[str, object]:
        return {"busy_seconds": self._scheduler.busy_seconds, "requests": self.requests}


class MockEngine:
    def __init__(self, model: ModelConfig, *, kv_events_host: str | None = None) -> None:
        """`kv_events_host`: where to publish KV-cache events when the model's mock config has a port."""
        mock = model.mock
        self.model = model
        self.limits = EngineLimits(
            max_num_seqs=model.max_num_seqs,
            max_num_batched_tokens=model.max_num_batched_tokens,
            max_model_len=model.max_model_len,
            num_kv_blocks=mock.num_kv_blocks,
            block_size=mock.block_size,
            prefix_caching=mock.enable_prefix_caching,
        )
        if mock.num_kv_blocks * mock.block_size < model.max_model_len:
            # vLLM refuses to start when one full-length sequence cannot fit in the KV cache.
            raise ValueError(
                f"model '{model.id}': the KV cache ({mock.num_kv_blocks} blocks of {mock.block_size} tokens) "
                f"cannot hold one sequence of max_model_len={model.max_model_len} tokens")
        self.metrics = EngineMetrics(model.id, mock.block_size, mock.num_kv_blocks, mock.enable_prefix_caching)
        self.faults = FaultState()
        self.kv_events: KvEventPublisher | None = None
        if kv_events_host is not None and mock.kv_events_port is not None:
            replay = mock.kv_events_replay_port
            self.kv_events = KvEventPublisher(
                f"tcp://{kv_events_host}:{mock.kv_events_port}",
                f"tcp://{kv_events_host}:{replay}" if replay is not None else None)
        self.scheduler = Scheduler(self.limits, LatencyModel.from_config(mock), self.metrics, self.faults,
                                   self.kv_events.publish if self.kv_events is not None else None)
        self.accounting = GpuTimeRecord(self.scheduler)
        self.created = int(time.time())
        config_digest = hashlib.blake2b(model.model_dump_json().encode(), digest_size=4).hexdigest()
        self.system_fingerprint = f"vllm-{VLLM_VERSION}-{config_digest}"
        self.dead = False
        self.server_load = 0  # requests in flight, as vLLM's /load counts them
        self._loop_task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def ensure_running(self) -> None:
        """Starts the step loop on first use (lifespan events do not run under every ASGI host)."""
        if self._loop_task is None:
            if self.kv_events is not None:
                self.kv_events.start()
            self._loop_task = asyncio.get_running_loop().create_task(self.scheduler.run(), name="mock-engine-steps")
            self._loop_task.add_done_callback(self._on_loop_exit)

    async def aclose(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.kv_events is not None:
            await self.kv_events.aclose()

    def _on_loop_exit(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.dead = True
            logger.error("mock engine step loop failed", exc_info=task.exception())

    # -- request admission ----------------------------------------------------------------------

    def check_model(self, requested: str | None) -> None:
        if requested and requested != self.model.id:
            raise model_not_found(requested, self.model.id)

    def check_accepting(self) -> None:
        if self.dead or self.faults.failing_requests:
            raise engine_failed()
        self.ensure_running()

    def submit(self, request_id: str, prompt_ids: Seq[int], max_tokens: int, n: int, seed: int | None,
               stops: tuple[str, ...], include_stop: bool, notify: asyncio.Event) -> list[Sequence]:
        """Queues `n` sequences for one prompt (n=1 and max_tokens=0 for a pooling request)."""
        key = prompt_fingerprint(prompt_ids) if max_tokens else ""
        now = time.monotonic()
        sequences = []
        for index in range(n):
            sampler = TokenSampler(self.model.mock.seed, seed, key, index) if max_tokens else None
            sequence = Sequence(
                request_id=f"{request_id}-{index}" if n > 1 else request_id,
                prompt_tokens=len(prompt_ids),
                token_ids=list(prompt_ids),
                max_tokens=max_tokens,
                sampler=sampler,
                stop=StopMatcher(stops, include_stop) if stops else None,
                notify=notify,
                arrival=now,
            )
            self.scheduler.add(sequence)
            sequences.append(sequence)
        return sequences

    def abort(self, sequences: Seq[Sequence]) -> None:
        for sequence in sequences:
            self.scheduler.abort(sequence)

