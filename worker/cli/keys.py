"""`worker keys ...`: accounts, balances and API keys, straight on the billing database (WORKER_DB_URL)."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta

import orjson

from worker.billing.cli_support import database_options, store_handler
from worker.billing.issuing import issue_key, open_account
from worker.billing.money import micro_to_usd_text, usd_to_micro
from worker.billing.records import KeyLimits, utc_month
from worker.billing.store import LedgerStore, UnknownAccount
from worker.billing.views import AccountView, KeyView


def register(subparsers: argparse._SubParsersAction) -> None:
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


def _usd(text: str, what: str) -> int:
    try:
        return usd_to_micro(text)
    except ValueError as error:
        raise SystemExit(f"worker keys: {what}: {error}") from None


async def _create_account(store: LedgerStore, args: argparse.Namespace) -> int:
    account = await open_account(store, args.name, _usd(args.balance_usd, "--balance-usd"))
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
    for flag, value in (("--rpm", args.rpm), ("--tpm", args.tpm)):
        if value is not None and value < 1:
            raise SystemExit(f"worker keys: {flag} must be at least 1")
    cap = _usd(args.monthly_cap_usd, "--monthly-cap-usd") if args.monthly_cap_usd is not None else None
    limits = KeyLimits(
        allowed_models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        monthly_spend_cap_micro=cap,
    )
    expires_at = datetime.now(UTC) + timedelta(days=args.expires_in_days) if args.expires_in_days else None
    try:
        issued = await issue_key(
            store,
            account_id=args.account,
            name=args.name,
            limits=limits,
            byok=args.byok,
            expires_at=expires_at,
        )
    except UnknownAccount:
        print(f"worker keys: no account '{args.account}' (see `worker keys accounts`)", file=sys.stderr)
        return 1
    plaintext = issued.plaintext.get_secret_value()
    if args.json:
        view = KeyView.of(issued.key, utc_month(time.time())).model_dump(mode="json")
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
    print(f"revoked {key.id}")
    return 0


async def _top_up(store: LedgerStore, args: argparse.Namespace) -> int:
    amount = _usd(args.amount_usd, "amount")
    if amount <= 0:
        raise SystemExit("worker keys: the amount must be positive")
    try:
        account = await store.top_up(args.account_id, amount)
    except UnknownAccount:
        print(f"worker keys: no account '{args.account_id}'", file=sys.stderr)
        return 1
    print(f"account {account.id} balance {micro_to_usd_text(account.balance_micro)} USD")
    return 0
