"""A relay process's entry point: its gateway priced with billing's `usage.cost` (the relay's composition root,
as node.py is the worker process's), so that the gateway package needs nothing from billing."""

from __future__ import annotations

import sys

import uvloop

from worker.billing.disclosure import usage_cost
from worker.gateway.processes.relay_process import run


def main() -> None:
    uvloop.run(run(int(sys.argv[1]), int(sys.argv[2]), usage_cost))
