"""Engine guard: a tiny parent for one engine process tree that never outlives the worker.

Run as `python -m worker.engines.guard --parent PID --grace S -- CMD...`. It asks the kernel for a
signal when the worker dies (even by SIGKILL), adopts every orphaned descendant (child subreaper), and
on any exit path terminates the whole tree. The engine it starts gets SIGTERM from the kernel when the
guard itself dies, even by SIGKILL; what the engine started in turn is ended by the worker, which sweeps
the guard's process group and every process that carries the launch's marker once the guard is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

import psutil

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def _die_with_guard(guard_pid: int) -> None:
    """Runs in the engine's process between fork and exec: the kernel signals it when the guard dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # survives exec; SIGTERM lets vLLM stop its engine core
    if os.getppid() != guard_pid:  # the guard died before the signal was armed
        os._exit(1)


def _terminate_descendants(grace_s: float) -> None:
    me = psutil.Process()
    procs = me.children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    # Reap adopted orphans that psutil waited on but that are still zombies of ours.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="worker-engine-guard")
    parser.add_argument("--parent", type=int, required=True, help="pid of the worker that must be alive")
    parser.add_argument("--grace", type=float, default=15.0, help="seconds the engine gets to stop")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no engine command given")

    stop_requested = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != args.parent:  # the worker died before the death signal was armed
        return 1

    guard_pid = os.getpid()
    # The guard is single-threaded, so preexec_fn is safe here.
    engine = subprocess.Popen(command, preexec_fn=lambda: _die_with_guard(guard_pid))  # noqa: PLW1509
    while engine.poll() is None and not stop_requested:
        # Also poll the parent: a belt to the PDEATHSIG braces.
        if os.getppid() != args.parent:
            stop_requested = True
            break
        time.sleep(0.2)

    if stop_requested and engine.poll() is None:
        engine.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            engine.wait(timeout=args.grace)
    _terminate_descendants(grace_s=5.0)
    returncode = engine.poll()
    if returncode is None:
        return 128 + signal.SIGKILL
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main())
