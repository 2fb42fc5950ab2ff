"""`worker keys ...`: accounts, balances and API keys, straight on the billing database (WORKER_DB_URL)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError

from worker.api.billing_views import (
    AccountView,
    CreateAccountRequest,
    CreateKeyRequest,
    KeyView,
    TopUpRequest,
    View,
)
from worker.billing.audit import audit
from worker.billing.keys import open_account
from worker.billing.money import micro_to_usd_text, usd_to_micro
from worker.billing.store import BalanceLimitExceeded, LedgerStore, UnknownAccount
from worker.billing.store.records import MAX_BALANCE_USD, AdminAction, utc_month
from worker.cli.store_command import database_options, store_handler

Request = TypeVar("Request", bound=View)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("keys", help="accounts, balances and API keys")
    commands = parser.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    db = database_options()

    account = commands.add_parser("create-account", parents=[db], help="open a prepaid account")
    account.add_argument("name")
    account.add_argument("--balance-usd", default="0", help="initial balance in USD (default 0)")
    account.set_defaults(handler=store_handler(_create_account))

    accounts = commands.add_parser("accounts", parents=[db], help="list accounts and balances")
    accounts.add_argument("--json", action="store_true", help="one JSON object per line")
    accounts.set_defaults(handler=store_handler(_list_accounts))

    create = commands.add_parser("create", parents=[db], help="issue an API key (printed once, never stored)")
    create.add_argument("--account", required=True, help="account id the key spends from")
    create.add_argument("--name", default="", help="a label for the key")
    create.add_argument(
        "--models", default="", help="comma-separated model ids the key may use (default: all)"
    )
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--monthly-cap-usd", help="monthly spend cap in USD")
    create.add_argument("--expires-in-days", type=float, help="expire the key after this many days")
    create.add_argument(
        "--byok", action="store_true", help="mark responses as bring-your-own-key (usage.is_byok)"
    )
    create.add_argument("--priority", type=int, default=0,
                        help="queued requests of higher-priority keys go first (-10 to 10; default 0)")
    create.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    create.set_defaults(handler=store_handler(_create_key))

    listing = commands.add_parser("list", parents=[db], help="list keys (never their secrets)")
    listing.add_argument("--account", help="only this account's keys")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=store_handler(_list_keys))

    revoke = commands.add_parser("revoke", parents=[db], help="revoke a key; its next request is refused")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=store_handler(_revoke_key))

    top_up = commands.add_parser("topup", parents=[db], help="add to an account's balance")
    top_up.add_argument("account_id")
    top_up.add_argument("amount_usd", help="amount in USD, e.g. 25 or 0.50")
    top_up.set_defaults(handler=store_handler(_top_up))


def _validated(model: type[Request], flags: dict[str, str], **fields: Any) -> Request:
    """The admin API's request, with its bounds; a refusal names the command-line flag."""
    try:
        return model.model_validate({name: value for name, value in fields.items() if value is not None})
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        raise SystemExit(f"worker keys: {flags.get(field, field)}: {first['msg']}") from None


async def _audit(store: LedgerStore, action: str, target: str, changes: dict[str, Any]) -> None:
    await audit(
        store, AdminAction(at=time.time(), actor="cli", action=action, target=target, changes=changes)
    )


async def _create_account(store: LedgerStore, args: argparse.Namespace) -> int:
    request = _validated(
        CreateAccountRequest, {"initial_balance_usd": "--balance-usd"},
        name=args.name, initial_balance_usd=args.balance_usd,
    )
    account = await open_account(store, request.name, usd_to_micro(request.initial_balance_usd))
    changes = {"name": account.name, "balance_micro": account.balance_micro}
    await _audit(store, "account.create", account.id, changes)
    print(f"account {account.id} ({account.name}), balance {micro_to_usd_text(account.balance_micro)} USD")
    return 0


async def _list_accounts(store: LedgerStore, args: argparse.Namespace) -> int:
    for account in await store.list_accounts():
        if args.json:
            print(AccountView.of(account).model_dump_json())
        else:
            print(
                f"{account.id}  {micro_to_usd_text(account.balance_micro):>14} USD  "
                f"reserved {micro_to_usd_text(account.reserved_micro)}  {account.name}"
            )
    return 0


async def _create_key(store: LedgerStore, args: argparse.Namespace) -> int:
    request = _validated(
        CreateKeyRequest,
        {"account_id": "--account", "allowed_models": "--models", "requests_per_minute": "--rpm",
         "tokens_per_minute": "--tpm", "monthly_spend_cap_usd": "--monthly-cap-usd",
         "expires_in_days": "--expires-in-days", "priority": "--priority"},
        account_id=args.account,
        name=args.name,
        allowed_models=[m.strip() for m in args.models.split(",") if m.strip()],
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        monthly_spend_cap_usd=args.monthly_cap_usd,
        expires_in_days=args.expires_in_days,
        is_byok=args.byok,
        priority=args.priority,
    )
    try:
        issued = await request.issue(store)
    except UnknownAccount:
        print(f"worker keys: no account '{args.account}' (see `worker keys accounts`)", file=sys.stderr)
        return 1
    key_view = KeyView.of(issued.key, utc_month(time.time()))
    await _audit(store, "key.create", issued.key.id, key_view.settings())
    plaintext = issued.plaintext.get_secret_value()
    if args.json:
        view = key_view.model_dump(mode="json")
        print(orjson.dumps({"key": plaintext, "data": view}).decode())
    else:
        print(f"key id {issued.key.id} for account {issued.key.account_id}", file=sys.stderr)
        print("the API key below is shown only now; it cannot be recovered", file=sys.stderr)
        print(plaintext)
    return 0


async def _list_keys(store: LedgerStore, args: argparse.Namespace) -> int:
    month = utc_month(time.time())
    for key in await store.list_keys(args.account):
        if args.json:
            print(KeyView.of(key, month).model_dump_json())
            continue
        state = "revoked" if key.revoked_at else ("expired" if key.is_expired(time.time()) else "active")
        models = ",".join(key.limits.allowed_models) or "*"
        print(
            f"{key.id}  {key.prefix}...  {state:<7}  account {key.account_id}  models {models}  "
            f"spent this month {micro_to_usd_text(key.spent_in(month))} USD  {key.name}"
        )
    return 0


async def _revoke_key(store: LedgerStore, args: argparse.Namespace) -> int:
    key = await store.revoke_key(args.key_id, time.time())
    if key is None:
        print(f"worker keys: no key '{args.key_id}'", file=sys.stderr)
        return 1
    revoked_at = key.revoked_at.isoformat() if key.revoked_at else None
    await _audit(store, "key.revoke", key.id, {"account_id": key.account_id, "revoked_at": revoked_at})
    print(f"revoked {key.id}")
    return 0


async def _top_up(store: LedgerStore, args: argparse.Namespace) -> int:
    request = _validated(TopUpRequest, {"amount_usd": "amount"}, amount_usd=args.amount_usd)
    amount = usd_to_micro(request.amount_usd)
    try:
        account = await store.top_up(args.account_id, amount)
    except UnknownAccount:
        print(f"worker keys: no account '{args.account_id}'", file=sys.stderr)
        return 1
    except BalanceLimitExceeded:
        print(f"worker keys: the balance after this top-up would exceed {MAX_BALANCE_USD} USD",
              file=sys.stderr)
        return 1
    changes = {"amount_micro": amount, "balance_micro": account.balance_micro}
    await _audit(store, "account.topup", account.id, changes)
    print(f"account {account.id} balance {micro_to_usd_text(account.balance_micro)} USD")
    return 0
