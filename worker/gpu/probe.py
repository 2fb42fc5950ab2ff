"""Print, as JSON, everything the GPU monitor reads on this node: `python -m worker.gpu.probe`.

One full poll, then `--listen-s` seconds of XID/ECC event listening, then a second poll. Exits 0 even
without NVML (the document then says why), so it is safe to run anywhere. `--record FILE` also writes
every NVML call with its answer, for `ReplayNvmlBackend` (worker.gpu.recording) to replay in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

from worker.gpu.backend import NvmlBackend
from worker.gpu.inventory import detect_gpus
from worker.gpu.models import GpuHealthChange
from worker.gpu.monitor import GpuMonitor
from worker.gpu.pynvml_backend import PynvmlBackend
from worker.gpu.recording import RecordingBackend


async def probe(listen_s: float, backend: NvmlBackend | None = None) -> dict[str, Any]:
    inventory = await asyncio.to_thread(detect_gpus, backend)
    monitor = GpuMonitor(backend, interval_s=max(listen_s, 1.0))
    changes: list[GpuHealthChange] = []
    monitor.subscribe(changes.append)
    await monitor.start()
    try:
        first = monitor.snapshot()
        if first.nvml_available:
            await asyncio.sleep(listen_s)
        last = await monitor.poll_once() if first.nvml_available else first
    finally:
        await monitor.stop()
    return {
        "inventory": inventory.model_dump(mode="json"),
        "first_snapshot": first.model_dump(mode="json"),
        "listened_s": listen_s if first.nvml_available else 0,
        "health_changes": [change.model_dump(mode="json") for change in changes],
        "last_snapshot": last.model_dump(mode="json"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.gpu.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--listen-s", type=float, default=5.0, help="seconds to wait for XID/ECC events")
    parser.add_argument("--record", type=Path, help="also write every NVML call and its answer to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    recorder = RecordingBackend(PynvmlBackend()) if args.record else None
    document = asyncio.run(probe(args.listen_s, recorder))
    if recorder is not None:
        recorder.save(args.record, host=platform.node(), recorded_at=time.time(), listen_s=args.listen_s)
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
