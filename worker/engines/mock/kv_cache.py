"""KV-cache blocks with automatic prefix caching, the way vLLM's v1 block pool keeps them.

Every full block of a sequence (prompt and generated tokens) is named by a hash chain over its token ids
and stays cached after its sequence ends, until it is evicted. Free blocks, cached or not, wait in one
LRU queue; a sequence's blocks are freed tail first, so the end of a prefix is evicted before its start.
A new sequence reuses the longest run of cached blocks that starts its prompt, at most all but the last
prompt token (the engine must compute one to sample from). Blocks in use by running sequences are never
evicted. Caching and evictions are reported as vLLM's KV-cache events.
"""

from __future__ import annotations

import array
import hashlib
import os
from collections import OrderedDict

from worker.engines.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from worker.engines.mock.sequence import Sequence

_MEDIUM = "GPU"  # what vLLM calls its device cache, on CPU too


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # vLLM seeds its chain with a random value per process unless PYTHONHASHSEED is set; so do we, so
        # nothing downstream can depend on the engine's hash values.
        self._root = os.urandom(8)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_count = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self.events: list[KvEvent] = []

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return (self.num_blocks - len(self._free)) / self.num_blocks

    # -- prefix hits ----------------------------------------------------------------------------

    def computed_blocks(self, sequence: Sequence) -> list[int]:
        """The cached blocks that start `sequence` (which has none yet), at most all but its last token."""
        if not self.prefix_caching:
            return []
        self._hash_full_blocks(sequence)
        limit = (sequence.total_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in sequence.block_hashes[:limit]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    # -- allocation -----------------------------------------------------------------------------

    def allocate(self, sequence: Sequence, new_tokens: int, computed: list[int] | None = None) -> bool:
        """Gives `sequence` the blocks for `new_tokens` more tokens (after taking `computed` cache hits);
        False, changing nothing, when the free blocks do not suffice."""
        computed = computed or []
        already = len(sequence.block_ids) + len(computed)
        needed = -(-(sequence.num_computed + len(computed) * self.block_size + new_tokens) // self.block_size)
        needed -= already
        # Hit blocks that sit in the free queue stop being free when taken.
        hits_in_free = sum(1 for block in computed if self._ref_count[block] == 0)
        if max(0, needed) + hits_in_free > len(self._free):
            return False
        if computed:
            for block in computed:
                self._take(block)
            sequence.block_ids.extend(computed)
            sequence.num_cached_blocks = len(sequence.block_ids)
        for _ in range(max(0, needed)):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self._ref_count[block] = 1
            sequence.block_ids.append(block)
        return True

    def free(self, sequence: Sequence) -> None:
        """Releases the sequence's blocks, tail first; cached ones stay cached until evicted."""
        for block in reversed(sequence.block_ids):
            self._ref_count[block] -= 1
            if self._ref_count[block] == 0:
                self._free[block] = None
        sequence.block_ids.clear()
        sequence.num_cached_blocks = 0

    # -- caching --------------------------------------------------------------------------------

    def cache_full_blocks(self, sequence: Sequence) -> None:
        """Names the sequence's newly filled blocks (those fully computed) and reports them as stored."""
        if not self.prefix_caching:
            return
        full = min(sequence.num_computed // self.block_size, len(sequence.block_ids))
        start = sequence.num_cached_blocks
        if full <= start:
            return
        self._hash_full_blocks(sequence)
        full = min(full, len(sequence.block_hashes))
        stored: list[bytes] = []
        for index in range(start, full):
            block_hash = sequence.block_hashes[index]
            block = sequence.block_ids[index]
            if block_hash not in self._cached and self._hash_of[block] is None:
                self._cached[block_hash] = block
                self._hash_of[block] = block_hash
                stored.append(block_hash)
            elif stored:
                self._report_stored(sequence, start, stored)
                stored, start = [], index + 1
            else:
                start = index + 1
        if stored:
            self._report_stored(sequence, start, stored)
        sequence.num_cached_blocks = max(full, sequence.num_cached_blocks)

    def reset(self) -> bool:
        """Forgets every cached block (vLLM's reset_prefix_cache); refused while blocks are in use."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._hash_of = [None] * self.num_blocks
        self.events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KvEvent]:
        events, self.events = self.events, []
        return events

    # -- internals ------------------------------------------------------------------------------

    def _hash_full_blocks(self, sequence: Sequence) -> None:
        size = self.block_size
        hashes = sequence.block_hashes
        tokens = sequence.token_ids
        if len(tokens) != sequence.total_tokens:
            return  # a sequence made without its token ids (scheduler tests): nothing to name its blocks by
        previous = hashes[-1] if hashes else self._root
        for index in range(len(hashes), len(tokens) // size):
            data = array.array("q", tokens[index * size:(index + 1) * size]).tobytes()
            previous = hashlib.blake2b(data, digest_size=8, key=previous).digest()
            hashes.append(previous)

    def _take(self, block: int) -> None:
        if self._ref_count[block] == 0:
            del self._free[block]
        self._ref_count[block] += 1

    def _evict(self, block: int) -> None:
        block_hash = self._hash_of[block]
        if block_hash is None:
            return
        self._hash_of[block] = None
        if self._cached.get(block_hash) == block:
            del self._cached[block_hash]
        self.events.append(BlockRemoved(block_hashes=[_external(block_hash)], medium=_MEDIUM))

    def _report_stored(self, sequence: Sequence, start: int, hashes: list[bytes]) -> None:
        size = self.block_size
        parent = _external(sequence.block_hashes[start - 1]) if start > 0 else None
        self.events.append(BlockStored(
            block_hashes=[_external(h) for h in hashes], parent_block_hash=parent,
            token_ids=sequence.token_ids[start * size:(start + len(hashes)) * size], block_size=size,
            lora_id=None, medium=_MEDIUM, lora_name=None, extra_keys=[None] * len(hashes), group_idx=0,
            kv_cache_spec_kind="full_attention"))


def _external(block_hash: bytes) -> int:
    """The 64-bit int vLLM publishes for a block hash (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)."""
    return int.from_bytes(block_hash, "big")
