"""Record what a real NVML answered, and replay it: a real GPU's answers become a test fixture.

`RecordingBackend` wraps any `NvmlBackend` and keeps every call with its answer or its NVML error;
`python -m worker.gpu.probe --record FILE` writes them out. `ReplayNvmlBackend` answers the same calls
from such a file, in the recorded order, so the monitor can be run in CI against what a real GPU
(driver, virtual machine and all) said, including the readings it refused.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml

from worker.gpu.backend import MemoryInfo, NvmlBackend, NvmlEvent, RemappedRows, UtilizationRates

# Every method of the `NvmlBackend` protocol: what is recorded and replayed.
BACKEND_METHODS = frozenset(
    name for name, member in vars(NvmlBackend).items() if callable(member) and not name.startswith("_")
)
_VALUE_TYPES: dict[str, type] = {
    cls.__name__: cls for cls in (MemoryInfo, UtilizationRates, RemappedRows, NvmlEvent)
}
_EVENT_SET = "event_set"


class _EventSetToken:
    """Stands for an NVML event set in a replay (the real one is a C pointer)."""


def _encode_value(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **dataclasses.asdict(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return {"type": _EVENT_SET}  # the only other answer: create_event_set's handle


def _decode_value(value: object) -> object:
    if isinstance(value, dict):
        fields = dict(value)
        kind = fields.pop("type")
        if kind == _EVENT_SET:
            return _EventSetToken()
        return _VALUE_TYPES[kind](**fields)
    return value


def _encode_args(args: tuple[object, ...]) -> list[object]:
    return [arg if isinstance(arg, int | str) else _EVENT_SET for arg in args]


class RecordingBackend:
    """An `NvmlBackend` that forwards every call and keeps it, with its answer, for `save`.

    An event wait that timed out (None) is not kept: the listener makes one every half second.
    """

    def __init__(self, inner: NvmlBackend) -> None:
        self._inner = inner
        self._lock = threading.Lock()  # the poll thread and the event thread both call
        self._started: float | None = None
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method not in BACKEND_METHODS:
            raise AttributeError(method)
        call = getattr(self._inner, method)

        def recorded(*args: object) -> object:
            entry: dict[str, Any] = {"method": method, "args": _encode_args(args)}
            try:
                result = call(*args)
            except pynvml.NVMLError as error:
                entry.update(nvml_error=int(error.value), error_name=type(error).__name__)
                self._keep(entry)
                raise
            except OSError as error:
                entry.update(os_error=str(error))
                self._keep(entry)
                raise
            if not (method == "wait_event" and result is None):
                entry.update(result=_encode_value(result))
                self._keep(entry)
            return result

        return recorded

    def _keep(self, entry: dict[str, Any]) -> None:
        with self._lock:
            now = time.monotonic()
            if self._started is None:
                self._started = now
            # When the answer came, from the first call: a replay delivers events no sooner.
            entry["at_s"] = round(now - self._started, 4)
            self.calls.append(entry)

    def save(self, path: Path, **about: object) -> None:
        with self._lock:
            document = {**about, "calls": list(self.calls)}
        path.write_text(json.dumps(document, indent=1) + "\n")


class ReplayNvmlBackend:
    """Answers each call as the recording answered the same call with the same arguments, in order.

    When a call's recorded answers run out, its last answer repeats (a GPU read once more reads the
    same); a call never recorded raises NVMLError_NotSupported. A recorded event is delivered once, no
    sooner after the first call than it came in the recording; a wait with no event due times out as
    NVML's would.
    """

    def __init__(self, calls: list[dict[str, Any]]) -> None:
        self._answers: dict[tuple[str, str], deque[dict[str, Any]]] = defaultdict(deque)
        self._events: deque[dict[str, Any]] = deque()
        for entry in calls:
            if entry["method"] == "wait_event":
                self._events.append(entry)
            else:
                self._answers[(entry["method"], json.dumps(entry["args"]))].append(entry)
        self._lock = threading.Lock()
        self._started: float | None = None

    @classmethod
    def load(cls, path: Path) -> ReplayNvmlBackend:
        return cls(json.loads(path.read_text())["calls"])

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method not in BACKEND_METHODS:
            raise AttributeError(method)

        def replayed(*args: object) -> object:
            return self._answer(method, args)

        return replayed

    def _answer(self, method: str, args: tuple[object, ...]) -> object:
        if method == "wait_event":
            return self._next_event(int(args[1]))  # type: ignore[call-overload]
        with self._lock:
            if self._started is None:
                self._started = time.monotonic()
            answers = self._answers.get((method, json.dumps(_encode_args(args))))
            entry = None if not answers else answers.popleft() if len(answers) > 1 else answers[0]
        if entry is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self._replay(entry)

    def _next_event(self, timeout_ms: int) -> object:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            with self._lock:
                started = self._started if self._started is not None else time.monotonic()
                if self._events and started + self._events[0]["at_s"] <= time.monotonic():
                    return self._replay(self._events.popleft())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(0.01, remaining))

    @staticmethod
    def _replay(entry: dict[str, Any]) -> object:
        if "nvml_error" in entry:
            raise pynvml.NVMLError(entry["nvml_error"])
        if "os_error" in entry:
            raise OSError(entry["os_error"])
        return _decode_value(entry.get("result"))
