"""What each replica's KV cache probably holds, so a request can go where its prompt prefix is cached.

Two indices behind one interface (`PrefixIndex`):
- `ApproximatePrefixIndex` remembers which prompt prefixes the worker sent to which replica: the prompt's
  text hashed in fixed-size chunks as a hash chain, per replica an LRU sized from its KV capacity. No
  tokenizer, no engine coupling; it cannot see what the engine evicted early or what other clients sent.
- `KvEventsPrefixIndex` (worker/capacity/kv_index.py) follows the engine's own KV-cache events.

Both compare hash chains: link `i` covers every chunk up to `i`, so a link present on a replica means the
whole prefix up to it was there, and the leading run of present links is the cached prefix.

`SessionAffinity` remembers which replica served a client's session last, for turns too short for either
index to tell.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from worker.config.models import ModelConfig
    from worker.engines.replica import Replica

# llm-d's approximate prefix scorer also hashes 64-token blocks: short enough that a system prompt and
# most of a conversation's history land in full chunks, long enough that a 6k-token prompt is ~100 links.
DEFAULT_CHUNK_TOKENS = 64
# What one token of English text or code is on average, in UTF-8 bytes, for BPE vocabularies of today's
# models (~4 characters a token).
DEFAULT_BYTES_PER_TOKEN = 4
_LINK_BYTES = 8  # 64-bit links: a false match needs a collision among a few million live links
ROOT_LINK = b"\x00" * _LINK_BYTES  # what the first chunk's link continues


@dataclass(frozen=True, slots=True)
class PromptKey:
    """A prompt as an index sees it: the hash chain of its full chunks, computed once per request."""

    chain: tuple[bytes, ...]
    chunk_tokens: int  # prompt tokens one link stands for (an estimate for the approximate index)


class PrefixIndex(Protocol):
    def keys(self, endpoint: str, body: Mapping[str, Any]) -> PromptKey:
        """The request's key; `endpoint` is "chat.completions", "completions" or "embeddings"."""
        ...

    async def keys_async(self, endpoint: str, body: Mapping[str, Any]) -> PromptKey:
        """`keys` without holding the event loop: the exact index tokenizes in a worker thread."""
        ...

    def match(self, replica_id: str, key: PromptKey) -> int:
        """Estimated prompt tokens of `key` already cached on the replica."""
        ...

    def record(self, replica_id: str, key: PromptKey) -> None:
        """The request was dispatched to the replica, which will cache its prompt."""
        ...

    def forget(self, replica_id: str) -> None:
        """The replica restarted: its cache is gone."""
        ...


def chain_links(data: bytes, chunk_size: int, parent: bytes = ROOT_LINK) -> tuple[bytes, ...]:
    """Hash chain of the full `chunk_size`-byte chunks of `data` (a partial last chunk is never cached),
    continuing the chain whose last link is `parent`."""
    links: list[bytes] = []
    previous = parent
    view = memoryview(data)
    for start in range(0, len(data) - chunk_size + 1, chunk_size):
        previous = hashlib.blake2b(view[start:start + chunk_size], digest_size=_LINK_BYTES, key=previous).digest()
        links.append(previous)
    return tuple(links)


def prompt_text(endpoint: str, body: Mapping[str, Any]) -> bytes:
    """A canonical rendering of what the engine will read first, such that the rendering of a conversation
    is a prefix of the rendering of its next turn: tools (chat templates put them first), then each message
    with its keys sorted; completions and embeddings: the (first) prompt."""
    if endpoint == "chat.completions":
        parts: list[bytes] = []
        tools = body.get("tools")
        if tools:
            parts.append(orjson.dumps(tools, option=orjson.OPT_SORT_KEYS))
        messages = body.get("messages")
        if isinstance(messages, list):
            parts.extend(orjson.dumps(message, option=orjson.OPT_SORT_KEYS) for message in messages)
        return b"\x1e".join(parts) + b"\x1e" if parts else b""
    prompt = body.get("prompt" if endpoint == "completions" else "input")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: its first prompt decides where it goes
    if isinstance(prompt, str):
        return prompt.encode()
    if isinstance(prompt, list):
        return orjson.dumps(prompt)  # token ids: "[1,2,3" of a longer prompt is its prefix but for "]"
    return b""


class ApproximatePrefixIndex:
    """Prompt prefixes the worker sent to each replica, in an LRU per replica sized from its KV capacity."""

    def __init__(self, capacity_tokens: Mapping[str, int], *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN) -> None:
        if chunk_tokens < 1 or bytes_per_token < 1:
            raise ValueError("chunk_tokens and bytes_per_token must be at least 1")
        self.chunk_tokens = chunk_tokens
        self._chunk_bytes = chunk_tokens * bytes_per_token
        self._capacity_links: dict[str, int] = {}
        self._links: dict[str, OrderedDict[bytes, None]] = {}
        for replica_id, tokens in capacity_tokens.items():
            self.set_capacity(replica_id, tokens)

    def set_capacity(self, replica_id: str, capacity_tokens: int) -> None:
        """The replica's KV cache in tokens (num blocks x block size), e.g. once the engine reports it."""
        if capacity_tokens < 1:
            raise ValueError(f"replica '{replica_id}': KV capacity must be at least 1 token, got {capacity_tokens}")
        self._capacity_links[replica_id] = max(1, capacity_tokens // self.chunk_tokens)
        links = self._links.setdefault(replica_id, OrderedDict())
        self._evict(replica_id, links)

    def keys(self, endpoint: str, body: Mapping[str, Any]) -> PromptKey:
        return PromptKey(chain_links(prompt_text(endpoint, body), self._chunk_bytes), self.chunk_tokens)

    async def keys_async(self, endpoint: str, body: Mapping[str, Any]) -> PromptKey:
        return self.keys(endpoint, body)  # ~0.1 ms for a 6k-token prompt: cheaper than a thread hop

    def match(self, replica_id: str, key: PromptKey) -> int:
        links = self._links.get(replica_id)
        if not links:
            return 0
        matched = 0
        for link in key.chain:
            if link not in links:
                break
            matched += 1
        return matched * key.chunk_tokens

    def record(self, replica_id: str, key: PromptKey) -> None:
        try:
            links = self._links[replica_id]
        except KeyError:
            raise KeyError(f"replica '{replica_id}' has no KV capacity set (set_capacity)") from None
        # Last link first, so the prompt's head is the most recently used: like vLLM, which frees a
        # request's blocks tail first, the tail of a prefix is evicted before its head.
        for link in reversed(key.chain):
            links[link] = None
            links.move_to_end(link)
        self._evict(replica_id, links)

    def forget(self, replica_id: str) -> None:
        links = self._links.get(replica_id)
        if links is not None:
            links.clear()

    def cached_links(self, replica_id: str) -> int:
        return len(self._links.get(replica_id) or ())

    def _evict(self, replica_id: str, links: OrderedDict[bytes, None]) -> None:
        excess = len(links) - self._capacity_links[replica_id]
        for _ in range(max(0, excess)):
            links.popitem(last=False)


class SessionAffinity:
    """Session key -> the replica that served its last turn, for the `max_sessions` most recent sessions.

    The key is the client's own session header (`routing.session_header`), else the OpenAI `user` field
    (worker.gateway.requests.session_key).
    """

    def __init__(self, max_sessions: int = 100_000) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self._max_sessions = max_sessions
        self._replicas: OrderedDict[str, str] = OrderedDict()

    def replica_of(self, session: str) -> str | None:
        replica_id = self._replicas.get(session)
        if replica_id is not None:
            self._replicas.move_to_end(session)
        return replica_id

    def remember(self, session: str, replica_id: str) -> None:
        self._replicas[session] = replica_id
        self._replicas.move_to_end(session)
        if len(self._replicas) > self._max_sessions:
            self._replicas.popitem(last=False)

    def forget_replica(self, replica_id: str) -> None:
        """The replica restarted or left: its sessions start over wherever they land next."""
        for session in [s for s, r in self._replicas.items() if r == replica_id]:
            del self._replicas[session]

    def __len__(self) -> int:
        return len(self._replicas)


def kv_capacity_tokens(model: ModelConfig) -> int:
    """A replica's KV cache in tokens as far as the configuration tells, before the engine reports its own
    (vLLM sizes its cache from free memory at start-up: `vllm:cache_config_info` then has the real one)."""
    from worker.config.models import EngineKind

    if model.engine is EngineKind.mock:
        return model.mock.num_kv_blocks * model.mock.block_size
    blocks = model.engine_args.get("num_gpu_blocks_override")
    block_size = model.engine_args.get("block_size")
    if isinstance(blocks, int) and isinstance(block_size, int):
        return blocks * block_size
    # At least a full batch of full-length sequences: what the engine must hold to run at max_num_seqs.
    return model.max_num_seqs * model.max_model_len


def build_prefix_index(replicas: Sequence[Replica]) -> PrefixIndex:
    """The index placement uses for the replicas of one model: the approximate one (see RoutingConfig)."""
    return ApproximatePrefixIndex({replica.replica_id: kv_capacity_tokens(replica.spec.model)
                                   for replica in replicas})
