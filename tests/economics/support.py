"""A hand-checked window of ledger records and replica runs, and the configuration that prices it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.billing.support import ledger_entry, make_key
from worker.billing.store import LedgerStore
from worker.billing.store.records import ApiKey, LedgerEntry, ReplicaUptime, to_epoch
from worker.config import NodeConfig
from worker.config.loader import parse_node_config

SINCE = datetime(2026, 11, 10, tzinfo=UTC)
UNTIL = SINCE + timedelta(hours=1)
T0 = to_epoch(SINCE)


def node_config() -> NodeConfig:
    def model(model_id: str, prompt: str, completion: str, **extra: str) -> dict[str, object]:
        return {"id": model_id, "engine": "mock", "source": f"local/{model_id}",
                "pricing": {"prompt_per_mtok": prompt, "completion_per_mtok": completion}, **extra}

    return parse_node_config({
        "worker": {"id": "node-1", "gpu_hour_usd": "3.00"},
        "models": [model("acme/chat", "1.00", "2.00", gpu_hour_usd="2.00"), model("acme/big", "0.50", "1.50")],
    })


def entry(record_id: str, at: float, prompt: int, completion: int, cost: int, gpu_seconds: float, *,
          model: str = "acme/chat", cached: int = 0, key: ApiKey | None = None) -> LedgerEntry:
    base = ledger_entry(record_id, key=key, cost=cost, model=model, gpu_seconds=gpu_seconds, worker_id="node-1")
    return base._replace(received_at=at, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)


def run(replica_id: str, model: str, gpus: int, started: float, stopped: float | None, seen: float) -> ReplicaUptime:
    return ReplicaUptime("node-1", replica_id, started, model, gpus, started + 5, stopped, seen)


async def write_window(store: LedgerStore) -> None:
    """acme/chat: 3 requests in the window (one before it, one at its end: not counted) on one GPU, 30 min
    up then a restart that crashed 15 min later; acme/big: 1 BYOK request on 2 GPUs up all the hour."""
    byok = await make_key(store, byok=True)
    for record in (
        entry("chat-before", T0 - 10, 1, 1, 99_999, 9.0),
        entry("chat-1", T0 + 60, 1000, 500, 2000, 1.5, cached=200),
        entry("chat-2", T0 + 70, 3000, 1500, 6000, 2.5),
        entry("chat-3", T0 + 1900, 2000, 0, 2000, 1.0),
        entry("chat-at-until", T0 + 3600, 1, 1, 99_999, 9.0),
        entry("big-1", T0 + 600, 10_000, 10_000, 20_000, 30.0, model="acme/big", key=byok.key),
    ):
        await store.settle(record)
    await store.save_replica_uptime([
        run("acme-chat-0", "acme/chat", 1, T0 - 7200, T0 - 3600, T0 - 3600),  # before the window
        run("acme-chat-0", "acme/chat", 1, T0 - 600, T0 + 1800, T0 + 1800),
        run("acme-chat-0", "acme/chat", 1, T0 + 1800, None, T0 + 2700),  # its worker died: up to its heartbeat
        run("acme-big-0", "acme/big", 2, T0, T0 + 7200, T0 + 7200),
    ])
