"""Which API key a request presents: looked up by hash, kept briefly for inference requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from worker.billing.keys import hash_api_key, hashes_match, looks_like_api_key, presented_api_key
from worker.billing.store import LedgerStore
from worker.billing.store.records import ApiKey
from worker.refusals import InvalidKey

# How long an inference request may use a key looked up earlier. Revocation and the spend cap still act
# on the next request: the reservation re-checks both in its own transaction. Other edits (allowed
# models, limits, expiry) made elsewhere show within this time.
KEY_CACHE_TTL_S = 2.0
KEY_CACHE_MAX_ENTRIES = 10_000


class KeyAuthenticator:
    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        # key hash -> (key, when it was read): spares each request a database round trip before the engine.
        self._recent_keys: dict[str, tuple[ApiKey, float]] = {}
        # key hash -> the database read in flight for it: a burst of requests with one key reads it once.
        self._key_reads: dict[str, asyncio.Future[ApiKey | None]] = {}

    async def authenticate(self, headers: Mapping[str, str], *, recent_ok: bool = False) -> ApiKey:
        """The key the request presents; raises InvalidKey.

        `recent_ok`: a key read in the last KEY_CACHE_TTL_S will do (for inference requests, whose
        reservation re-checks revocation), and a read never waits for the ledger's pending batch; the key
        holder's own API always reads it afresh, with every record settled before it counted.
        """
        presented = presented_api_key(headers)
        if presented is None:
            raise InvalidKey("missing API key: send 'Authorization: Bearer <key>'")
        if not looks_like_api_key(presented):
            raise InvalidKey("invalid API key")
        presented_hash = hash_api_key(presented)
        now = time.time()
        key = self._recent_key(presented_hash, now) if recent_ok else None
        if key is None:
            key = await (self._shared_key_read(presented_hash) if recent_ok
                         else self.store.find_key_by_hash(presented_hash, settled=True))
            if key is not None and key.revoked_at is None:
                self._remember_key(presented_hash, key, now)
        if key is None or not hashes_match(key.key_hash, presented_hash):
            raise InvalidKey("invalid API key")
        if key.revoked_at is not None:
            raise InvalidKey("this API key has been revoked")
        if key.is_expired(now):
            raise InvalidKey("this API key has expired")
        return key

    def forget(self, key_hash: str) -> None:
        """Read this key afresh next time (it was found revoked)."""
        self._recent_keys.pop(key_hash, None)

    async def _shared_key_read(self, key_hash: str) -> ApiKey | None:
        read = self._key_reads.get(key_hash)
        if read is None:
            read = asyncio.ensure_future(self.store.find_key_by_hash(key_hash))
            self._key_reads[key_hash] = read
            read.add_done_callback(lambda _: self._key_reads.pop(key_hash, None))
        # Shielded: a client that hangs up must not cancel the read the others wait for.
        return await asyncio.shield(read)

    def _recent_key(self, key_hash: str, now: float) -> ApiKey | None:
        entry = self._recent_keys.get(key_hash)
        if entry is None or now - entry[1] > KEY_CACHE_TTL_S or now < entry[1]:
            return None
        return entry[0]

    def _remember_key(self, key_hash: str, key: ApiKey, now: float) -> None:
        if len(self._recent_keys) >= KEY_CACHE_MAX_ENTRIES:
            self._recent_keys.clear()  # many distinct keys at once: start over rather than track ages
        self._recent_keys[key_hash] = (key, now)
