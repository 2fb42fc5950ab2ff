"""GpuMonitor: polls every GPU through NVML off the event loop and listens for XID / ECC events.

NVML calls block (and can block for long on a failing GPU), so they run only on the monitor's own
threads: one poll thread (a single-worker executor) and one daemon thread waiting on the NVML event
set. The event loop only reads the latest state, which is kept under a lock that is never held
across an NVML call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pynvml

from worker.gpu.backend import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    GPU_LOST_ERRORS,
    MONITORED_EVENTS,
    NvmlBackend,
    NvmlEvent,
)
from worker.gpu.health import GpuHealthPolicy, GpuHealthTracker
from worker.gpu.models import GpuFleetSnapshot, GpuHealth, GpuHealthChange, GpuReadings, NvmlState
from worker.gpu.pynvml_backend import PynvmlBackend
from worker.gpu.readings import GpuReader

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
HealthCallback = Callable[[GpuHealthChange], Awaitable[None] | None]


class GpuMonitor:
    def __init__(
        self,
        backend: NvmlBackend | None = None,
        *,
        interval_s: float = 5.0,
        policy: GpuHealthPolicy | None = None,
        event_wait_ms: int = 500,
        stop_timeout_s: float = 10.0,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if backend is None:
            backend = PynvmlBackend()
        self._backend = backend
        self._reader = GpuReader(backend)
        self._interval_s = interval_s
        self._policy = policy or GpuHealthPolicy()
        # Short waits let the event thread notice stop() promptly.
        self._event_wait_ms = event_wait_ms
        self._stop_timeout_s = stop_timeout_s
        self._wall_clock = wall_clock
        self._monotonic = monotonic

        self._lock = threading.Lock()
        self._trackers: list[GpuHealthTracker] = []
        self._nvml_state: NvmlState = "not_started"
        self._nvml_reason: str | None = None
        self._driver_version: str | None = None

        self._executor: ThreadPoolExecutor | None = None
        self._event_set: object | None = None
        self._event_thread: threading.Thread | None = None
        self._stop_listening = threading.Event()
        self._poll_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: list[HealthCallback] = []
        self._callback_tasks: set[asyncio.Future[None]] = set()

    # Public API --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open NVML, take a first reading, then poll every `interval_s` and listen for events.

        Without NVML (no driver) the monitor stays in the "nvml_unavailable" state and starts nothing.
        """
        self._loop = asyncio.get_running_loop()
        await self.poll_once()
        if self._nvml_state != "available":
            return
        if self._event_set is not None and self._event_thread is None:
            self._stop_listening.clear()
            self._event_thread = threading.Thread(
                target=self._listen_for_events, name="gpu-monitor-events", daemon=True
            )
            self._event_thread.start()
        if self._poll_task is None:
            self._poll_task = asyncio.create_task(self._poll_forever(), name="gpu-monitor-poll")

    async def stop(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
            self._poll_task = None
        self._stop_listening.set()
        thread, self._event_thread = self._event_thread, None
        try:
            # Bounded: a GPU that hangs NVML calls must not hang the worker's shutdown.
            async with asyncio.timeout(self._stop_timeout_s):
                if thread is not None:
                    await self._in_thread(thread.join)
                if self._nvml_state == "available":
                    await self._in_thread(self._close_nvml)
        except TimeoutError:
            logger.warning("GPU monitor did not stop in time; leaving its threads behind")
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def poll_once(self) -> GpuFleetSnapshot:
        """Read every GPU now (opening NVML first if needed) and return the new snapshot."""
        self._loop = asyncio.get_running_loop()
        changes = await self._in_thread(self._poll_blocking)
        self._dispatch(changes)
        return self.snapshot()

    async def drain_events(self) -> int:
        """Handle the events already queued in NVML without waiting; for when the listener is not running."""
        self._loop = asyncio.get_running_loop()
        handled, changes = await self._in_thread(self._drain_blocking)
        self._dispatch(changes)
        return handled

    def snapshot(self) -> GpuFleetSnapshot:
        """The latest state; cheap and non-blocking (no NVML call)."""
        with self._lock:
            return GpuFleetSnapshot(
                nvml_state=self._nvml_state,
                nvml_reason=self._nvml_reason,
                driver_version=self._driver_version,
                taken_at=self._wall_clock(),
                gpus=[tracker.status() for tracker in self._trackers],
            )

    def subscribe(self, callback: HealthCallback) -> Callable[[], None]:
        """Call `callback(change)` on the event loop whenever a GPU's health changes; returns unsubscribe.

        A coroutine function is scheduled as a task. The supervisor uses this to take replicas on a
        GPU that became `failed` out of service at once.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # Event-loop side ---------------------------------------------------------------------------

    async def _in_thread(self, function: Callable[[], _T]) -> _T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-monitor-poll")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.poll_once()
            except Exception:
                logger.exception("GPU poll failed")

    def _dispatch(self, changes: list[GpuHealthChange]) -> None:
        for change in changes:
            log = logger.error if change.current is GpuHealth.FAILED else logger.warning
            log(
                "GPU health changed",
                extra={
                    "gpu_index": change.index,
                    "gpu_uuid": change.uuid,
                    "previous": change.previous.value,
                    "current": change.current.value,
                    "reasons": [reason.code for reason in change.reasons],
                },
            )
            for callback in list(self._subscribers):
                try:
                    result = callback(change)
                    if inspect.isawaitable(result):
                        task = asyncio.ensure_future(result)
                        self._callback_tasks.add(task)
                        task.add_done_callback(self._callback_done)
                except Exception:
                    logger.exception("GPU health subscriber failed", extra={"gpu_index": change.index})

    def _callback_done(self, task: asyncio.Future[None]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("GPU health subscriber failed", exc_info=task.exception())

    def _dispatch_from_thread(self, changes: list[GpuHealthChange]) -> None:
        loop = self._loop
        if not changes or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to tell
            loop.call_soon_threadsafe(self._dispatch, changes)

    # Worker-thread side (NVML calls happen only below) -----------------------------------------

    def _poll_blocking(self) -> list[GpuHealthChange]:
        if self._nvml_state == "not_started":
            self._open_nvml()
        if self._nvml_state != "available":
            return []
        with self._lock:
            trackers = [tracker for tracker in self._trackers if not tracker.lost]
        for tracker in trackers:
            try:
                readings = self._reader.read(tracker.index)
            except GPU_LOST_ERRORS as error:
                with self._lock:
                    tracker.record_lost(error)
                continue
            with self._lock:
                # A device that answered nothing at all is not freshly read: leave its age growing.
                if readings != GpuReadings():
                    tracker.record_readings(readings)
        return self._take_changes()

    def _take_changes(self) -> list[GpuHealthChange]:
        with self._lock:
            changes = [tracker.take_change() for tracker in self._trackers]
        return [change for change in changes if change is not None]

    def _open_nvml(self) -> None:
        backend = self._backend
        try:
            backend.init()
        except (pynvml.NVMLError, OSError) as error:
            self._set_unavailable(f"{type(error).__name__}: {error}")
            return
        try:
            count = backend.device_count()
        except pynvml.NVMLError as error:
            self._set_unavailable(f"nvmlDeviceGetCount failed: {type(error).__name__}: {error}")
            self._shutdown_quietly()
            return
        try:
            driver: str | None = backend.driver_version()
        except pynvml.NVMLError:
            driver = None
        with self._lock:
            # Reopening after stop() keeps what was learnt: failed stays failed for the process lifetime.
            previous = {(tracker.index, tracker.uuid): tracker for tracker in self._trackers}
        trackers = [self._discover(index, previous) for index in range(count)]
        with self._lock:
            self._trackers = trackers
            self._driver_version = driver
            self._nvml_state = "available"
            self._nvml_reason = None if count else "NVML found no GPU"
        logger.info("NVML opened", extra={"gpu_count": count, "driver_version": driver})
        self._event_set = self._open_event_set(trackers)

    def _set_unavailable(self, reason: str) -> None:
        logger.info("NVML unavailable; GPU monitoring off", extra={"reason": reason})
        with self._lock:
            self._nvml_state = "nvml_unavailable"
            self._nvml_reason = reason

    def _discover(self, index: int, previous: dict[tuple[int, str], GpuHealthTracker]) -> GpuHealthTracker:
        lost_error: pynvml.NVMLError | None = None
        try:
            uuid, name = self._backend.uuid(index), self._backend.name(index)
        except GPU_LOST_ERRORS as error:
            uuid, name, lost_error = "unknown", "unknown", error
        except pynvml.NVMLError:
            uuid, name = "unknown", "unknown"
        tracker = previous.get((index, uuid)) or GpuHealthTracker(
            index, uuid, name, self._policy, wall_clock=self._wall_clock, monotonic=self._monotonic
        )
        if lost_error is not None:
            tracker.record_lost(lost_error)
        return tracker

    def _open_event_set(self, trackers: list[GpuHealthTracker]) -> object | None:
        if not trackers:
            return None
        try:
            event_set = self._backend.create_event_set()
        except pynvml.NVMLError as error:
            logger.warning(
                "NVML event set unavailable; XIDs will not be seen", extra={"nvml_error": str(error)}
            )
            return None
        registered = 0
        for tracker in trackers:
            if tracker.lost:
                continue
            try:
                mask = MONITORED_EVENTS & self._backend.supported_event_types(tracker.index)
                if mask:
                    self._backend.register_events(tracker.index, mask, event_set)
                    registered += 1
            except GPU_LOST_ERRORS as error:
                with self._lock:
                    tracker.record_lost(error)
            except pynvml.NVMLError as error:
                logger.warning(
                    "GPU events not registered", extra={"gpu_index": tracker.index, "nvml_error": str(error)}
                )
        if registered:
            return event_set
        self._free_event_set(event_set)
        return None

    def _free_event_set(self, event_set: object) -> None:
        with contextlib.suppress(pynvml.NVMLError):
            self._backend.free_event_set(event_set)

    def _close_nvml(self) -> None:
        event_set, self._event_set = self._event_set, None
        if event_set is not None:
            self._free_event_set(event_set)
        self._shutdown_quietly()
        with self._lock:
            self._nvml_state = "not_started"

    def _shutdown_quietly(self) -> None:
        try:
            self._backend.shutdown()
        except pynvml.NVMLError as error:
            logger.warning("nvmlShutdown failed", extra={"nvml_error": str(error)})

    def _listen_for_events(self) -> None:
        event_set = self._event_set
        while event_set is not None and not self._stop_listening.is_set():
            try:
                event = self._backend.wait_event(event_set, self._event_wait_ms)
            except pynvml.NVMLError as error:
                # A lost GPU can make the whole set error out; the poll names the GPU. Back off a little.
                logger.warning("NVML event wait failed", extra={"nvml_error": str(error)})
                self._stop_listening.wait(1.0)
                continue
            if event is not None:
                self._handle_event(event)
                self._dispatch_from_thread(self._take_changes())

    def _drain_blocking(self) -> tuple[int, list[GpuHealthChange]]:
        if self._nvml_state == "not_started":
            self._open_nvml()
        handled = 0
        while self._event_set is not None:
            try:
                event = self._backend.wait_event(self._event_set, 0)
            except pynvml.NVMLError as error:
                logger.warning("NVML event wait failed", extra={"nvml_error": str(error)})
                break
            if event is None:
                break
            self._handle_event(event)
            handled += 1
        return handled, self._take_changes()

    def _handle_event(self, event: NvmlEvent) -> None:
        with self._lock:
            tracker = next((t for t in self._trackers if t.index == event.gpu_index), None)
            if tracker is None:
                logger.warning("NVML event for an unknown GPU", extra={"gpu_index": event.gpu_index})
                return
            if event.event_type & EVENT_XID_CRITICAL:
                xid_class = tracker.record_xid(event.event_data)
                logger.warning(
                    "GPU XID",
                    extra={"gpu_index": tracker.index, "xid": event.event_data, "xid_class": xid_class.value},
                )
            if event.event_type & EVENT_DOUBLE_BIT_ECC:
                tracker.record_ecc_event(double_bit=True)
            if event.event_type & EVENT_SINGLE_BIT_ECC:
                tracker.record_ecc_event(double_bit=False)
