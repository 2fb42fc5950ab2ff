"""Wire shapes of the key holder's and the admin's APIs. Money: USD strings plus integer micro-USD."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from worker.billing.money import micro_to_usd_text, usd_to_micro
from worker.billing.records import Account, ApiKey


def _decimal_from_text(value: Any) -> Any:
    # JSON numbers arrive as floats; their shortest repr is the number the sender wrote.
    return Decimal(repr(value)) if isinstance(value, float) else value


def _whole_micro_usd(value: Decimal) -> Decimal:
    usd_to_micro(value)  # raises ValueError, which pydantic reports against the field
    return value


UsdAmount = Annotated[Decimal, BeforeValidator(_decimal_from_text), AfterValidator(_whole_micro_usd)]


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
            "created_at": key.created_at,
            "expires_at": key.expires_at,
            "revoked_at": key.revoked_at,
            "spend_this_month_usd": micro_to_usd_text(spent),
            "spend_this_month_micro": spent,
        }

    @classmethod
    def of(cls, key: ApiKey, month: str) -> KeyView:
        return cls(**cls.fields_of(key, month))


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


class CreateAccountRequest(View):
    name: str = Field(min_length=1, max_length=200)
    initial_balance_usd: UsdAmount = Decimal(0)


class TopUpRequest(View):
    amount_usd: UsdAmount = Field(gt=0)


class CreateKeyRequest(View):
    account_id: str
    name: str = Field(default="", max_length=200)
    allowed_models: list[str] = Field(default_factory=list)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    monthly_spend_cap_usd: UsdAmount | None = Field(default=None, ge=0)
    expires_at: datetime | None = None
    expires_in_days: float | None = Field(default=None, gt=0)
    is_byok: bool = False


class CreatedKey(View):
    key: str = Field(description="the API key itself; shown only in this response")
    data: KeyView
