"""API keys, and issuing them (for the admin API and `worker keys`): `iow_` + 43 base64url characters
(256 random bits). Only the SHA-256 of a key is stored.

A plain hash is enough because the key is random and long; there is nothing to brute-force, so a slow
password hash would only slow every request down.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import SecretStr

from worker.billing.store import LedgerStore
from worker.billing.store.records import Account, ApiKey, KeyLimits

KEY_PREFIX = "iow_"
_RANDOM_BYTES = 32
_KEY_PATTERN = re.compile(r"^iow_[A-Za-z0-9_-]{43}$")
# Enough of the key to recognise it in a list, far too little to guess the rest.
_DISPLAY_LENGTH = len(KEY_PREFIX) + 6


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def hashes_match(stored_hash: str, presented_hash: str) -> bool:
    return hmac.compare_digest(stored_hash.encode("ascii"), presented_hash.encode("ascii"))


def looks_like_api_key(value: str) -> bool:
    return bool(_KEY_PATTERN.fullmatch(value))


def display_prefix(key: str) -> str:
    return key[:_DISPLAY_LENGTH]


def presented_api_key(headers: Mapping[str, str]) -> str | None:
    """The key from `Authorization: Bearer <key>` or `x-api-key: <key>` (header names case-insensitive)."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


@dataclass(frozen=True)
class IssuedKey:
    """A new key and the only copy of its plaintext; show it once, then drop it."""

    plaintext: SecretStr
    key: ApiKey


async def open_account(store: LedgerStore, name: str, balance_micro: int = 0) -> Account:
    return await store.create_account(f"acct_{secrets.token_hex(8)}", name, balance_micro, time.time())


async def issue_key(
    store: LedgerStore,
    *,
    account_id: str,
    name: str,
    limits: KeyLimits,
    byok: bool = False,
    priority: int = 0,
    expires_at: datetime | None = None,
) -> IssuedKey:
    """Raises UnknownAccount when the account does not exist."""
    plaintext = generate_api_key()
    new_key = ApiKey(
        id=f"key_{secrets.token_hex(8)}",
        account_id=account_id,
        name=name,
        prefix=display_prefix(plaintext),
        key_hash=hash_api_key(plaintext),
        limits=limits,
        byok=byok,
        priority=priority,
        created_at=datetime.now(UTC),
        expires_at=expires_at,
    )
    return IssuedKey(plaintext=SecretStr(plaintext), key=await store.create_key(new_key))
