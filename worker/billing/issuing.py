"""Opening accounts and issuing keys: shared by the admin API and the `worker keys` command."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import SecretStr

from worker.billing.keys import display_prefix, generate_api_key, hash_api_key, new_account_id, new_key_id
from worker.billing.store import LedgerStore
from worker.billing.store.records import Account, ApiKey, KeyLimits, NewApiKey


@dataclass(frozen=True)
class IssuedKey:
    """A new key and the only copy of its plaintext; show it once, then drop it."""

    plaintext: SecretStr
    key: ApiKey


async def open_account(store: LedgerStore, name: str, balance_micro: int = 0) -> Account:
    return await store.create_account(new_account_id(), name, balance_micro, time.time())


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
    new_key = NewApiKey(
        id=new_key_id(),
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
