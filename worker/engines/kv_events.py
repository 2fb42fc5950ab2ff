"""vLLM's KV-cache events on the wire (`--kv-events-config`), as vLLM 0.32 publishes them.

vLLM's `ZmqEventPublisher` (vllm/distributed/kv_events.py) sends each batch on a ZMQ PUB socket as three
frames: topic, an 8-byte big-endian sequence number, and the msgpack of `[ts, events, data_parallel_rank]`;
each event is a map tagged with its class name under "type" (fields with default values left out).
A ROUTER socket, when configured, replays buffered batches: a request `[b"", start_seq]` is answered by
`[b"", topic, seq, payload]` frames for every buffered batch from `start_seq` on, then a frame whose
sequence number is -1.

These structs are the one codec for both ends here: the mock engine publishes with them and the worker's
subscriber decodes with them, so the mock exercises the code path that reads real vLLM.
"""

from __future__ import annotations

import msgspec

# Block hashes are 64-bit ints by default (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES), raw sha256 bytes otherwise.
BlockHash = int | bytes
REPLAY_END_SEQ = -1


class KvCacheEvent(msgspec.Struct, omit_defaults=True, tag_field="type", tag=True):
    """Base of the three event kinds; the tag is the class name, as vLLM's."""


class BlockStored(KvCacheEvent, tag="BlockStored"):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None  # vLLM always sends these three, null or not
    medium: str | None
    lora_name: str | None
    # Per block: what else went into its hash (LoRA name, multimodal items, cache salt); None when nothing.
    extra_keys: list[list[object] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None

    @property
    def plain(self) -> bool:
        """Blocks any prompt of the base model can hit: no LoRA, no multimodal items, no cache salt."""
        return self.lora_name is None and self.lora_id is None and (
            self.extra_keys is None or all(not keys for keys in self.extra_keys))


class BlockRemoved(KvCacheEvent, tag="BlockRemoved"):
    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KvCacheEvent, tag="AllBlocksCleared"):
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KvEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[KvEvent]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KvEventBatch)


def encode_batch(batch: KvEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KvEventBatch:
    """Raises msgspec.DecodeError (a ValueError) on a payload that is not a batch of known events."""
    return _decoder.decode(payload)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def seq_of(frame: bytes) -> int:
    return int.from_bytes(frame, "big", signed=True)
