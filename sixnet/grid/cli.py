"""``sixnet grid user add|remove|list|passwd``: the XMPP server's password accounts.

Passwords are read from a prompt (twice) on a terminal, or as the first line of standard input
otherwise; never from the command line, where other users could read them. The server reads
the same database, so a change applies to the next login without a restart.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, task

from sixnet.cli import Output, add_common, config_of
from sixnet.config import Config
from sixnet.errors import EXIT_USAGE, CommandError
from sixnet.grid.accounts import AccountError, AccountStore, normalize_username
from sixnet.grid.service import open_database
from sixnet.storage import DatabaseURLError, parse_url


def register(commands: Any) -> None:
    grid = commands.add_parser("grid", help="the XMPP-Grid controller")
    sub = grid.add_subparsers(dest="grid_command", metavar="COMMAND", required=True,
                              parser_class=type(grid))
    user = sub.add_parser("user", help="password accounts of the XMPP server")
    verbs = user.add_subparsers(dest="user_command", metavar="COMMAND", required=True,
                                parser_class=type(grid))

    def verb(name: str, run: Callable[[argparse.Namespace, Output], int],
             help_text: str, *, named: bool = True) -> None:
        p = verbs.add_parser(name, help=help_text, description=help_text)
        add_common(p)
        if named:
            p.add_argument("name", metavar="USER",
                           help="the account's localpart (alice for alice@DOMAIN)")
        p.set_defaults(run=run)

    verb("add", run_add, "create a password account (password from a prompt or stdin)")
    verb("passwd", run_passwd, "set a new password (from a prompt or stdin)")
    verb("remove", run_remove, "delete an account and its stored offline messages")
    verb("list", run_list, "list the accounts (password and certificate)", named=False)


def checked_name(name: str) -> str:
    try:
        return normalize_username(name)
    except AccountError as e:
        raise CommandError(str(e), EXIT_USAGE) from None


def read_password(name: str) -> str:
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {name}: ")
        if first != getpass.getpass("again: "):
            raise CommandError("the two passwords differ", EXIT_USAGE)
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    if not first:
        raise CommandError("empty password", EXIT_USAGE)
    return first


def with_accounts(config: Config, work: Callable[[AccountStore], Awaitable[Any]]) -> Any:
    """Run `work` against the account store with a reactor, and return its result."""
    outcome: dict[str, Any] = {}

    async def main() -> None:
        db = open_database(config)
        try:
            store = AccountStore(db, config.grid.scram_iterations)
            await store.prepare()
            outcome["value"] = await work(store)
        except AccountError as e:
            outcome["error"] = CommandError(str(e))
        except Exception as e:  # noqa: BLE001 - a database failure is one line, not a trace
            outcome["error"] = CommandError(f"{config.grid.database}: {e}")
        finally:
            db.close()

    try:
        parse_url(config.grid.database, config.sixnet.state_dir)
    except DatabaseURLError as e:
        raise CommandError(f"{config.path}: grid.database: {e}", EXIT_USAGE) from None
    try:
        task.react(lambda _reactor: defer.Deferred.fromCoroutine(main()))
    except SystemExit as e:
        if e.code not in (0, None):
            raise CommandError("the database operation failed") from None
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def run_add(args: argparse.Namespace, out: Output) -> int:
    config = config_of(args, check_files=False)
    args.name = checked_name(args.name)
    password = read_password(args.name)
    with_accounts(config, lambda store: store.add(args.name, password))
    jid = f"{args.name}@{config.grid.domain}"
    out.result({"added": jid}, f"account {jid} created")
    return 0


def run_passwd(args: argparse.Namespace, out: Output) -> int:
    config = config_of(args, check_files=False)
    args.name = checked_name(args.name)
    password = read_password(args.name)
    with_accounts(config, lambda store: store.add(args.name, password, replace=True))
    jid = f"{args.name}@{config.grid.domain}"
    out.result({"changed": jid}, f"password of {jid} changed")
    return 0


def run_remove(args: argparse.Namespace, out: Output) -> int:
    config = config_of(args, check_files=False)
    args.name = checked_name(args.name)
    with_accounts(config, lambda store: store.remove(args.name))
    jid = f"{args.name}@{config.grid.domain}"
    out.result({"removed": jid}, f"account {jid} removed")
    return 0


def run_list(args: argparse.Namespace, out: Output) -> int:
    config = config_of(args, check_files=False)
    accounts = with_accounts(config, lambda store: store.list())
    domain = config.grid.domain
    out.result(
        [{"jid": f"{a.username}@{domain}", "kind": a.kind, "created": a.created}
         for a in accounts],
        lambda: "\n".join(f"{a.username + '@' + domain:<40} {a.kind:<12} {a.created}"
                           for a in accounts) or "no accounts",
    )
    return 0
