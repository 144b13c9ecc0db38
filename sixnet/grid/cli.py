"""``sixnet grid user add|remove|list|passwd``: the XMPP server's password accounts;
``sixnet grid revoke [--undo|--list] PLATFORM``: platforms cut off (RFC 8600 section 8.3).

Passwords are read from a prompt (twice) on a terminal, or as the first line of standard input
otherwise; never from the command line, where other users could read them. The server reads
the same database, so a change applies to the next login without a restart. The commands open
only the grid's storage (`sixnet.grid.storage`), never the server's modules.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, task

from sixnet.core.cli import CommandGroup, Output, config_of
from sixnet.core.errors import EXIT_USAGE, CommandError
from sixnet.core.storage.database import Database, DatabaseURLError, parse_url
from sixnet.core.timefmt import rfc3339
from sixnet.grid.client import cli as lab_cli
from sixnet.grid.config import GridSettings
from sixnet.grid.storage.accounts import AccountError, AccountStore, normalize_username
from sixnet.grid.storage.revocations import RevocationError, RevocationStore, platform_jid


def register(commands: Any) -> None:
    grid = CommandGroup(commands, "grid", "the XMPP-Grid controller")
    user = grid.group("user", "password accounts of the XMPP server")
    for name, run, help_text in (
            ("add", run_add, "create a password account (password from a prompt or stdin)"),
            ("passwd", run_passwd, "set a new password (from a prompt or stdin)"),
            ("remove", run_remove, "delete an account and its stored offline messages")):
        user.command(name, run, help_text).add_argument(
            "name", metavar="USER", help="the account's localpart (alice for alice@DOMAIN)")
    user.command("list", run_list, "list the accounts (password and certificate)")

    revoke = grid.command("revoke", run_revoke,
                          "cut a platform off: its sessions end, its subscriptions and "
                          "affiliations go, its logins are refused (a running server acts "
                          "within seconds)")
    revoke.add_argument("platform", metavar="PLATFORM", nargs="?",
                        help="the platform's bare JID (alice@DOMAIN, or alice)")
    revoke.add_argument("--reason", default="", help="recorded with the revocation")
    what = revoke.add_mutually_exclusive_group()
    what.add_argument("--undo", action="store_true",
                      help="lift the revocation (removed subscriptions stay removed)")
    what.add_argument("--list", action="store_true", help="list the revoked platforms")
    lab_cli.register(grid)  # the lab client: topics, publish, follow... (docs/gridclient.rst)


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


def with_accounts(config: GridSettings, work: Callable[[AccountStore], Awaitable[Any]]) -> Any:
    """Run `work` against the account store with a reactor, and return its result."""
    async def accounts(db: Database) -> Any:
        store = AccountStore(db, config.grid.scram_iterations)
        await store.prepare()
        return await work(store)

    return with_database(config, accounts)


def with_revocations(config: GridSettings,
                     work: Callable[[RevocationStore], Awaitable[Any]]) -> Any:
    async def revocations(db: Database) -> Any:
        store = RevocationStore(db)
        await store.prepare()
        return await work(store)

    return with_database(config, revocations)


def with_database(config: GridSettings, work: Callable[[Database], Awaitable[Any]]) -> Any:
    """Run `work` against the grid database with a reactor, and return its result."""
    outcome: dict[str, Any] = {}

    async def main() -> None:
        db = Database(config.grid.database, base=config.sixnet.state_dir)
        try:
            outcome["value"] = await work(db)
        except (AccountError, RevocationError) as e:
            outcome["error"] = CommandError(str(e))
        except Exception as e:
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


def run_revoke(args: argparse.Namespace, out: Output) -> int:
    config = config_of(args, check_files=False)
    if args.list:
        if args.platform:
            raise CommandError("--list takes no PLATFORM", EXIT_USAGE)
        rows = with_revocations(config, lambda store: store.list())
        out.result([vars(r) for r in rows],
                   lambda: "\n".join(f"{r.jid:<40} {r.revoked}  {r.reason}".rstrip()
                                      for r in rows) or "no revoked platforms")
        return 0
    if not args.platform:
        raise CommandError("PLATFORM is missing", EXIT_USAGE)
    try:
        jid = platform_jid(args.platform, config.grid.domain)
    except RevocationError as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    if args.undo:
        with_revocations(config, lambda store: store.unrevoke(jid))
        out.result({"unrevoked": jid}, f"{jid} is no longer revoked")
        return 0
    when = rfc3339(precision="seconds")
    new = with_revocations(config, lambda store: store.revoke(jid, when, args.reason))
    out.result({"revoked": jid, "new": new},
               f"{jid} revoked" if new else f"{jid} was revoked already")
    return 0
