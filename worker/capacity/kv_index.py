"""The exact prefix index: what each replica caches, from the engine's own KV-cache events.

Each replica publishes `BlockStored` / `BlockRemoved` / `AllBlocksCleared` (worker/engines/kv_events.py);
a subscriber per replica keeps, for that replica, the set of cached blocks named by our own hash chain of
their token ids (`chain_links` over the tokens' bytes). Indexing by tokens rather than by the engine's
block hashes means the engine's hash seed and algorithm do not matter; the engine's hashes only map a
`BlockRemoved` back to our link and a `BlockStored`'s parent to where its chain continues.

Matching a request needs its token ids as the engine will see them: `PromptTokenizer` renders the chat
template and tokenizes (transformers' tokenizer from the model's local directory; the mock engine's own
toy tokenizer for mock replicas). That is the costly part of a lookup (see `keys`).

Between dispatch and the engine's `BlockStored` (its prefill has to run first) the index also counts what
`record` was told, in a small LRU per replica, so a burst of requests sharing a new prefix is not spread
over every replica before the first one's events arrive.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from worker.capacity.prefix_index import ROOT_LINK, PromptKey, chain_links
from worker.engines.kv_events import (
    REPLAY_END_SEQ,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    decode_batch,
    seq_bytes,
    seq_of,
)

if TYPE_CHECKING:
    from worker.config.models import ModelConfig

logger = logging.getLogger(__name__)

# vLLM's default block size on GPUs (it is 128 on its CPU backend); the first BlockStored tells the truth.
DEFAULT_BLOCK_SIZE = 16
# Links dispatched but not yet confirmed by events, per replica: a few hundred requests' worth of prefixes.
PENDING_LINKS = 16_384
REPLAY_TIMEOUT_S = 2.0


class PromptTokenizer(Protocol):
    def prompt_token_ids(self, endpoint: str, body: Mapping[str, Any]) -> list[int]:
        """The prompt's token ids as the engine will compute them ([] when it cannot tell)."""
        ...


def _first_prompt(endpoint: str, body: Mapping[str, Any]) -> Any:
    prompt = body.get("prompt" if endpoint == "completions" else "input")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return prompt[0]
    return prompt


class HfPromptTokenizer:
    """The model's own tokenizer and chat template (a local model directory; nothing is downloaded)."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def prompt_token_ids(self, endpoint: str, body: Mapping[str, Any]) -> list[int]:
        if endpoint == "chat.completions":
            messages = body.get("messages")
            if not isinstance(messages, list):
                return []
            rendered = self._tokenizer.apply_chat_template(
                messages, tools=body.get("tools") or None, tokenize=True,
                add_generation_prompt=body.get("add_generation_prompt", True),
                **(body.get("chat_template_kwargs") or {}))
            ids = rendered["input_ids"] if isinstance(rendered, Mapping) else rendered
            return list(ids)
        prompt = _first_prompt(endpoint, body)
        if isinstance(prompt, str):
            return list(self._tokenizer(prompt)["input_ids"])
        if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
            return prompt
        return []


class MockPromptTokenizer:
    """The mock engine's toy tokenizer and ChatML-like template (worker/engines/mock/tokens.py)."""

    def prompt_token_ids(self, endpoint: str, body: Mapping[str, Any]) -> list[int]:
        from worker.engines.mock import tokens

        if endpoint == "chat.completions":
            messages = body.get("messages")
            if not isinstance(messages, list):
                return []
            return tokens.encode_chat([m for m in messages if isinstance(m, dict)],
                                      bool(body.get("add_generation_prompt", True)))
        prompt = _first_prompt(endpoint, body)
        if isinstance(prompt, str):
            return tokens.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
            return prompt
        return []


def token_links(token_ids: Sequence[int], block_size: int) -> tuple[bytes, ...]:
    """Hash chain of the full blocks of `token_ids` (what the engine caches), one link per block."""
    return chain_links(array.array("q", token_ids).tobytes(), block_size * 8)


@dataclass(slots=True)
class _ReplicaBlocks:
    """One replica's cached blocks: engine hash -> our link, and how many engine blocks hold each link."""

    by_engine_hash: dict[BlockHash, bytes] = field(default_factory=dict)
    links: dict[bytes, int] = field(default_factory=dict)
    pending: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    last_seq: int | None = None

    def clear(self) -> None:
        self.by_engine_hash.clear()
        self.links.clear()
        self.pending.clear()

    def store(self, engine_hash: BlockHash, link: bytes) -> None:
        if engine_hash in self.by_engine_hash:
            return  # the same block reported again
        self.by_engine_hash[engine_hash] = link
        self.links[link] = self.links.get(link, 0) + 1
        self.pending.pop(link, None)

    def remove(self, engine_hash: BlockHash) -> None:
        link = self.by_engine_hash.pop(engine_hash, None)
        if link is None:
            return
        remaining = self.links[link] - 1
        if remaining:
            self.links[link] = remaining
        else:
            del self.links[link]


class KvEventsPrefixIndex:
    """Cached blocks per replica from KV-cache events; `keys` tokenizes, so on the event loop use
    `keys_async`, which does it in a worker thread."""

    def __init__(self, tokenizer: PromptTokenizer | None, *, block_size: int | None = None,
                 pending_links: int = PENDING_LINKS) -> None:
        self._tokenizer = tokenizer
        self.block_size = block_size  # learned from the first BlockStored when not given
        self._pending_links = pending_links
        self._replicas: dict[str, _ReplicaBlocks] = {}
        self._subscriptions: dict[str, asyncio.Task[None]] = {}
        self._context = zmq.asyncio.Context()

    @classmethod
    def for_model(cls, model: ModelConfig) -> KvEventsPrefixIndex:
        """The index with the tokenizer the model's engine uses."""
        from pathlib import Path

        from worker.config.models import EngineKind

        if model.engine is EngineKind.mock:
            return cls(MockPromptTokenizer(), block_size=model.mock.block_size)
        source = Path(model.source).expanduser()
        if not source.is_dir():
            raise ValueError(f"model '{model.id}': routing.prefix_index 'exact' needs the tokenizer in a local "
                             f"model directory, and source '{model.source}' is not one")
        block_size = model.engine_args.get("block_size")
        return cls(HfPromptTokenizer(str(source)), block_size=block_size if isinstance(block_size, int) else None)

    # -- PrefixIndex ----------------------------------------------------------------------------

    def keys(self, endpoint: str, body: Mapping[str, Any]) -> PromptKey:
        block_size = self.block_size or DEFAULT_BLOCK_SIZE
        if self._tokenizer is None:
            return PromptKey((), block_size)
        return PromptKey(token_links(self._tokenizer.prompt_token_ids(endpoint, body), block_size), block_size)

    async def keys_async(self, endpoint: str, body: Mapping[str, Any]) -> PromptKey:
        # Tokenizing takes about 1 us a token; the Rust tokenizer mostly runs without the GIL (a thread
        # tokenizing nonstop left the event loop's thread ~80% of its speed on this 2-core machine).
        return await asyncio.to_thread(self.keys, endpoint, body)

    def match(self, replica_id: str, key: PromptKey) -> int:
        blocks = self._replicas.get(replica_id)
        if blocks is None or key.chunk_tokens != (self.block_size or DEFAULT_BLOCK_SIZE):
            return 0
        matched = 0
        for link in key.chain:
            if link not in blocks.links and link not in blocks.pending:
                break
            matched += 1
        return matched * key.chunk_tokens

    def record(self, replica_id: str, key: PromptKey) -> None:
        blocks = self._replicas.setdefault(replica_id, _ReplicaBlocks())
        pending = blocks.pending
        for link in reversed(key.chain):
            if link not in blocks.links:
                pending[link] = None
                pending.move_to_end(link)
        while len(pending) > self._pending_links:
            pending.popitem(last=False)

    def forget(self, replica_id: str) -> None:
        blocks = self._replicas.get(replica_id)
        if blocks is not None:
            blocks.clear()

    # -- events ---------------------------------------------------------------------------------

    def apply(self, replica_id: str, batch: KvEventBatch) -> None:
        """Applies one batch of the replica's events, in order."""
        blocks = self._replicas.setdefault(replica_id, _ReplicaBlocks())
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._stored(blocks, event)
            elif isinstance(event, BlockRemoved):
                for engine_hash in event.block_hashes:
                    blocks.remove(engine_hash)
            elif isinstance(event, AllBlocksCleared):
                blocks.clear()

    def _stored(self, blocks: _ReplicaBlocks, event: BlockStored) -> None:
        size = event.block_size
        if not event.plain or len(event.token_ids) != size * len(event.block_hashes):
            return  # blocks a plain prompt cannot hit, or a partial block
        if self.block_size is None:
            self.block_size = size
        elif size != self.block_size:
            return
        if event.parent_block_hash is None:
            link = ROOT_LINK
        else:
            parent = blocks.by_engine_hash.get(event.parent_block_hash)
            if parent is None:
                return  # its chain started before we listened: no prompt can be matched through it
            link = parent
        token_bytes = array.array("q", event.token_ids).tobytes()
        # Continued from the parent's link: the same links token_links() gives the whole prompt.
        for engine_hash, block_link in zip(event.block_hashes, chain_links(token_bytes, size * 8, link),
                                           strict=True):
            blocks.store(engine_hash, block_link)

    def cached_blocks(self, replica_id: str) -> int:
        blocks = self._replicas.get(replica_id)
        return len(blocks.links) if blocks is not None else 0

    # -- subscriptions --------------------------------------------------------------------------

    def subscribe(self, replica_id: str, endpoint: str, replay_endpoint: str | None = None) -> None:
        """Follows the replica's events from now on (a running event loop is needed)."""
        self.unsubscribe(replica_id)
        self._subscriptions[replica_id] = asyncio.get_running_loop().create_task(
            self._follow(replica_id, endpoint, replay_endpoint), name=f"kv-events-{replica_id}")

    def unsubscribe(self, replica_id: str) -> None:
        task = self._subscriptions.pop(replica_id, None)
        if task is not None:
            task.cancel()

    async def aclose(self) -> None:
        tasks = list(self._subscriptions.values())
        self._subscriptions.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._context.destroy(linger=0)

    async def _follow(self, replica_id: str, endpoint: str, replay_endpoint: str | None) -> None:
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(endpoint)
        blocks = self._replicas.setdefault(replica_id, _ReplicaBlocks())
        try:
            while True:
                frames = await socket.recv_multipart()
                if len(frames) != 3:
                    continue
                seq = seq_of(frames[1])
                last = blocks.last_seq
                if last is None:
                    if seq > 0 and replay_endpoint is not None:
                        # Joined late (the engine was up before us): fetch what it published before.
                        await self._replay(replica_id, replay_endpoint, 0, seq)
                elif seq <= last:
                    # The engine restarted (its numbering starts over): what we knew of it is gone.
                    logger.info("kv events restarted", extra={"replica": replica_id, "seq": seq})
                    blocks.clear()
                elif seq > last + 1:
                    await self._fill_gap(replica_id, blocks, last + 1, seq, replay_endpoint)
                self._apply_payload(replica_id, frames[2])
                blocks.last_seq = seq
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("kv events subscription failed", extra={"replica": replica_id})
            blocks.clear()
        finally:
            socket.close(linger=0)

    def _apply_payload(self, replica_id: str, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except msgspec.DecodeError:
            logger.warning("kv events batch not understood", extra={"replica": replica_id})
            return
        self.apply(replica_id, batch)

    async def _fill_gap(self, replica_id: str, blocks: _ReplicaBlocks, first: int, upto: int,
                        replay_endpoint: str | None) -> None:
        """Batches `first`..`upto - 1` were dropped (high-water mark): replay them, else start over."""
        replayed = replay_endpoint is not None and await self._replay(replica_id, replay_endpoint, first, upto)
        if not replayed:
            logger.warning("kv events lost; replica index cleared",
                           extra={"replica": replica_id, "first_missing": first, "next": upto})
            blocks.clear()

    async def _replay(self, replica_id: str, replay_endpoint: str, first: int, upto: int) -> bool:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(replay_endpoint)
        expected = first
        try:
            await socket.send_multipart([b"", seq_bytes(first)])
            while True:
                frames = await asyncio.wait_for(socket.recv_multipart(), REPLAY_TIMEOUT_S)
                if len(frames) != 4:
                    return False
                seq = seq_of(frames[2])
                if seq == REPLAY_END_SEQ:
                    return expected >= upto
                if seq < expected:
                    continue
                if seq > expected:
                    return False  # the engine's replay buffer no longer holds what we missed
                if seq < upto:
                    self._apply_payload(replica_id, frames[3])
                expected = seq + 1
        except TimeoutError:
            return False
        finally:
            socket.close(linger=0)

