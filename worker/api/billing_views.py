"""Wire shapes of the key holder's and the admin's APIs. Money: USD strings plus integer micro-USD."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from worker.billing.keys import IssuedKey, issue_key
from worker.billing.money import micro_to_usd_text, usd_to_micro
from worker.billing.store import LedgerStore
from worker.billing.store.records import MAX_BALANCE_USD, Account, ApiKey, KeyLimits

# Bounds of what the admin API stores, so that nothing it is given overflows a column: RPM/TPM limits are
# PostgreSQL INTEGERs; money is at most MAX_BALANCE_USD; expiries are dates Python can read back.
MAX_PER_MINUTE = 2**31 - 1
MAX_EXPIRY_DAYS = 36_500
_LATEST_EXPIRY = datetime(9000, 1, 1, tzinfo=UTC)
MAX_ALLOWED_MODELS = 1000
MAX_ID_CHARS = 200


def _decimal_from_text(value: Any) -> Any:
    # JSON numbers arrive as floats; their shortest repr is the number the sender wrote.
    return Decimal(repr(value)) if isinstance(value, float) else value


def _whole_micro_usd(value: Decimal) -> Decimal:
    usd_to_micro(value)  # raises ValueError, which pydantic reports against the field
    return value


def _storable_text(value: str) -> str:
    # PostgreSQL's text cannot hold NUL, and neither database encodes a lone surrogate ("\ud800" in JSON).
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


def _expiry_within_range(value: datetime | None) -> datetime | None:
    if value is not None and not datetime(1970, 1, 2, tzinfo=UTC) <= value.replace(
        tzinfo=value.tzinfo or UTC
    ) < _LATEST_EXPIRY:
        raise ValueError(f"must be between 1970 and {_LATEST_EXPIRY.year}")
    return value


def _usd_schema(exclusive_minimum: bool) -> dict[str, Any]:
    low = {"exclusiveMinimum": 0} if exclusive_minimum else {"minimum": 0}
    return {
        "anyOf": [
            {"type": "number", **low, "maximum": MAX_BALANCE_USD},
            {"type": "string", "pattern": r"^[0-9]{1,10}(\.[0-9]{1,6})?$"},
        ],
        "description": f"USD, a JSON number or a decimal string, at most 6 decimals and {MAX_BALANCE_USD}",
    }


# USD amounts: a JSON number or a decimal string, whole micro-USD, within [0, MAX_BALANCE_USD] (the bounds
# come first, so that an absurd exponent is refused before it is multiplied out).
UsdAmount = Annotated[
    Decimal,
    BeforeValidator(_decimal_from_text),
    Field(ge=0, le=MAX_BALANCE_USD),
    AfterValidator(_whole_micro_usd),
    WithJsonSchema(_usd_schema(exclusive_minimum=False)),
]
PositiveUsdAmount = Annotated[
    Decimal,
    BeforeValidator(_decimal_from_text),
    Field(gt=0, le=MAX_BALANCE_USD),
    AfterValidator(_whole_micro_usd),
    WithJsonSchema(_usd_schema(exclusive_minimum=True)),
]
# Names and ids the admin gives: text both databases store as it came.
Text = Annotated[str, AfterValidator(_storable_text)]
Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_storable_text)]
PerMinute = Annotated[int, Field(ge=1, le=MAX_PER_MINUTE)]
# A filter or path parameter compared with stored ids: the same text rules (a NUL would fail the query).
QueryText = Annotated[str, Field(max_length=MAX_ID_CHARS), AfterValidator(_storable_text)]


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class AccountView(View):
    id: str
    name: str
    balance_usd: str
    balance_micro: int
    reserved_micro: int
    available_usd: str
    created_at: datetime

    @classmethod
    def of(cls, account: Account) -> AccountView:
        return cls(
            id=account.id,
            name=account.name,
            balance_usd=micro_to_usd_text(account.balance_micro),
            balance_micro=account.balance_micro,
            reserved_micro=account.reserved_micro,
            available_usd=micro_to_usd_text(account.available_micro),
            created_at=account.created_at,
        )


class KeyView(View):
    id: str
    account_id: str
    name: str
    prefix: str
    allowed_models: list[str]
    requests_per_minute: int | None
    tokens_per_minute: int | None
    monthly_spend_cap_usd: str | None
    is_byok: bool
    priority: int
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    spend_this_month_usd: str
    spend_this_month_micro: int

    @classmethod
    def fields_of(cls, key: ApiKey, month: str) -> dict[str, Any]:
        cap = key.limits.monthly_spend_cap_micro
        spent = key.spent_in(month)
        return {
            "id": key.id,
            "account_id": key.account_id,
            "name": key.name,
            "prefix": key.prefix,
            "allowed_models": list(key.limits.allowed_models),
            "requests_per_minute": key.limits.requests_per_minute,
            "tokens_per_minute": key.limits.tokens_per_minute,
            "monthly_spend_cap_usd": micro_to_usd_text(cap) if cap is not None else None,
            "is_byok": key.byok,
            "priority": key.priority,
            "created_at": key.created_at,
            "expires_at": key.expires_at,
            "revoked_at": key.revoked_at,
            "spend_this_month_usd": micro_to_usd_text(spent),
            "spend_this_month_micro": spent,
        }

    @classmethod
    def of(cls, key: ApiKey, month: str) -> KeyView:
        return cls(**cls.fields_of(key, month))

    def settings(self) -> dict[str, Any]:
        """What the key was given when it was issued, for the audit trail (never the key itself)."""
        return self.model_dump(
            mode="json",
            include={"account_id", "name", "allowed_models", "requests_per_minute", "tokens_per_minute",
                     "monthly_spend_cap_usd", "is_byok", "priority", "expires_at"},
        )


class OwnKeyView(KeyView):
    """What a key holder sees of their key: also the account's spendable balance."""

    balance_usd: str
    balance_micro: int

    @classmethod
    def of_key(cls, key: ApiKey, account: Account, month: str) -> OwnKeyView:
        return cls(
            **cls.fields_of(key, month),
            balance_usd=micro_to_usd_text(account.available_micro),
            balance_micro=account.available_micro,
        )


MIN_KEY_PRIORITY, MAX_KEY_PRIORITY = -10, 10


class CreateAccountRequest(View):
    name: Text = Field(min_length=1, max_length=200)
    initial_balance_usd: UsdAmount = Decimal(0)


class TopUpRequest(View):
    amount_usd: PositiveUsdAmount = Field(
        description=f"more than 0; the balance after it at most {MAX_BALANCE_USD} USD"
    )


class CreateKeyRequest(View):
    account_id: Identifier
    name: Text = Field(default="", max_length=200)
    allowed_models: list[Identifier] = Field(default_factory=list, max_length=MAX_ALLOWED_MODELS)
    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None
    monthly_spend_cap_usd: UsdAmount | None = None
    expires_at: Annotated[datetime | None, AfterValidator(_expiry_within_range)] = Field(
        default=None, description=f"before the year {_LATEST_EXPIRY.year}; without a zone, UTC"
    )
    expires_in_days: float | None = Field(default=None, gt=0, le=MAX_EXPIRY_DAYS)
    is_byok: bool = False
    priority: int = Field(default=0, ge=MIN_KEY_PRIORITY, le=MAX_KEY_PRIORITY,
                          description="queued requests of higher-priority keys go first (a router's "
                          "prioritised keys above 0, fallback keys below)")


    async def issue(self, store: LedgerStore) -> IssuedKey:
        """Issue the key this asks for (the admin API's and `worker keys create`'s); raises UnknownAccount."""
        cap, days = self.monthly_spend_cap_usd, self.expires_in_days
        limits = KeyLimits(
            allowed_models=tuple(self.allowed_models),
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            monthly_spend_cap_micro=usd_to_micro(cap) if cap is not None else None,
        )
        expires_at = datetime.now(UTC) + timedelta(days=days) if days is not None else self.expires_at
        return await issue_key(store, account_id=self.account_id, name=self.name, limits=limits, byok=self.is_byok,
                               priority=self.priority, expires_at=expires_at)


class CreatedKey(View):
    key: str = Field(description="the API key itself; shown only in this response")
    data: KeyView
