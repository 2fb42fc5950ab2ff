"""Where a response came from: worker, replica, GPUs, model revision and engine version.

Sent as `x-worker-*` response headers and kept in the ledger, so any billed request can be traced to
the hardware and software that served it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict


class Provenance(BaseModel):
    model_config = ConfigDict(frozen=True)

    worker_id: str
    replica_id: str | None = None
    gpu_model: str | None = None
    gpu_uuids: tuple[str, ...] = ()
    model_revision: str | None = None
    engine_version: str | None = None

    def headers(self) -> dict[str, str]:
        values = {
            "x-worker-id": self.worker_id,
            "x-worker-replica": self.replica_id,
            "x-worker-gpu": self.gpu_model,
            "x-worker-gpu-uuid": ",".join(self.gpu_uuids) or None,
            "x-worker-model-revision": self.model_revision,
            "x-worker-engine-version": self.engine_version,
        }
        # Header values must be latin-1 without line breaks; drop anything that is not.
        return {name: value for name, value in values.items() if value and _header_safe(value)}


# Given the replica that serves a request (None before routing), what served it. Supplied by the node,
# which knows the GPUs and engine versions.
ProvenanceSource = Callable[[Any], Provenance]


def _header_safe(value: str) -> bool:
    return value.isprintable() and all(ord(char) < 256 for char in value)
