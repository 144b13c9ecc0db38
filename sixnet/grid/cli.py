"""``sixnet grid user add|remove|list|passwd``: the XMPP server's password accounts;
``sixnet grid revoke [--undo|--list] PLATFORM``: platforms cut off (RFC 8600 section 8.3).

Passwords are read from a prompt (twice) on a terminal, or as the first line of standard input
otherwise; never from the command line, where other users could read them. ``user add --from
FILE`` creates many accounts at once: the whole file is checked first, the SCRAM keys are
derived on every CPU, and every account is written in one transaction. The server reads the
same database, so a change applies to the next login without a restart. The commands open
only the grid's storage (`sixnet.grid.storage`), never the server's modules.
"""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task, threads

from sixnet.core.cli import CommandGroup, Output, config_of
from sixnet.core.errors import EXIT_USAGE, CommandError
from sixnet.core.storage.database import Database, DatabaseURLError, parse_url
from sixnet.core.timefmt import rfc3339
from sixnet.grid.client import cli as lab_cli
from sixnet.grid.config import GridSettings
from sixnet.grid.storage.accounts import (
    AccountError,
    AccountStore,
    BulkResult,
    derive_many,
    normalize_username,
    prepare_password,
)
from sixnet.grid.storage.revocations import RevocationError, RevocationStore, platform_jid


def register(commands: Any) -> None:
    grid = CommandGroup(commands, "grid", "the XMPP-Grid controller")
    user = grid.group("user", "password accounts of the XMPP server")
    add = user.command("add", run_add, "create a password account (password from a prompt or "
                                       "stdin), or many from a file (--from)")
    add.add_argument("name", metavar="USER", nargs="?",
                     help="the account's localpart (alice for alice@DOMAIN)")
    add.add_argument("--from", dest="source", metavar="FILE",
                     help="create the accounts of FILE (- for stdin): a line 'name password', "
                          "or 'name' alone with --generate; '#' comments and blank lines "
                          "are skipped")
    add.add_argument("--generate", action="store_true",
                     help="make a strong random password for each account that has none, "
                          "and print 'name password' lines (or JSON with --json)")
    existing = add.add_mutually_exclusive_group()
    existing.add_argument("--skip-existing", action="store_true",
                          help="with --from: leave accounts that exist already as they are")
    existing.add_argument("--update", action="store_true",
                          help="with --from: set the password of accounts that exist already")
    for name, run, help_text in (
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


def generated_password() -> str:
    """24 characters of 144 random bits (URL-safe base64: easy to paste and to quote)."""
    return secrets.token_urlsafe(18)


def run_add(args: argparse.Namespace, out: Output) -> int:
    if args.source is not None:
        if args.name is not None:
            raise CommandError("give USER or --from FILE, not both", EXIT_USAGE)
        return run_add_many(args, out)
    if args.name is None:
        raise CommandError("USER is missing (or give --from FILE)", EXIT_USAGE)
    if args.skip_existing or args.update:
        raise CommandError("--skip-existing and --update go with --from FILE", EXIT_USAGE)
    config = config_of(args, check_files=False)
    args.name = checked_name(args.name)
    password = generated_password() if args.generate else read_password(args.name)
    with_accounts(config, lambda store: store.add(args.name, password))
    jid = f"{args.name}@{config.grid.domain}"
    if args.generate:
        out.result({"added": jid, "password": password}, f"{args.name} {password}")
        print(f"account {jid} created", file=sys.stderr)
    else:
        out.result({"added": jid}, f"account {jid} created")
    return 0


@dataclass(frozen=True)
class AccountLine:
    """One account of a ``--from`` file."""

    line: int
    name: str  # normalised
    password: str  # prepared (RFC 8265 OpaqueString)
    generated: bool


def parse_accounts(text: str, label: str, generate: bool) -> tuple[list[AccountLine],
                                                                    list[str]]:
    """The accounts of a ``--from`` file, and one ``LABEL:LINE: problem`` per bad line.

    A line is ``name password`` (the password is the rest of the line after the blanks that
    follow the name; it may contain spaces, trailing blanks are dropped) or ``name`` alone
    with `generate`. Lines whose first non-blank character is ``#``, and blank lines, are
    skipped.
    """
    accounts: list[AccountLine] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        where = f"{label}:{number}"
        try:
            name = normalize_username(parts[0])
        except AccountError as e:
            problems.append(f"{where}: {parts[0]!r}: {e}")
            continue
        if name in seen:
            problems.append(f"{where}: {name!r} is on line {seen[name]} already")
            continue
        seen[name] = number
        if len(parts) == 1:
            if not generate:
                problems.append(f"{where}: {name!r} has no password (give one after the "
                                "name, or use --generate)")
                continue
            password, generated = generated_password(), True
        else:
            try:
                password, generated = prepare_password(parts[1]), False
            except AccountError as e:
                problems.append(f"{where}: {name!r}: {e}")
                continue
        accounts.append(AccountLine(number, name, password, generated))
    return accounts, problems


def read_source(source: str) -> tuple[str, str]:
    """The text of a ``--from`` argument and the label its problems are reported with."""
    if source == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        with open(source, encoding="utf-8") as f:
            return f.read(), source
    except OSError as e:
        raise CommandError(f"{source}: {e.strerror}", EXIT_USAGE) from None
    except UnicodeDecodeError:
        raise CommandError(f"{source}: not UTF-8 text", EXIT_USAGE) from None


def run_add_many(args: argparse.Namespace, out: Output) -> int:
    config = config_of(args, check_files=False)
    text, label = read_source(args.source)
    accounts, problems = parse_accounts(text, label, args.generate)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        raise CommandError(f"{len(problems)} bad line(s) in {label}; no account was created",
                           EXIT_USAGE)
    if not accounts:
        raise CommandError(f"{label}: no accounts in it", EXIT_USAGE)
    existing = "skip" if args.skip_existing else "update" if args.update else "error"
    iterations = config.grid.scram_iterations

    async def create(store: AccountStore) -> BulkResult:
        wanted = list(accounts)
        if existing != "update":  # refuse or skip before deriving keys for nothing
            found = await store.existing([a.name for a in accounts])
            if found and existing == "error":
                raise AccountError(f"{len(found)} account(s) exist already: "
                                   f"{', '.join(sorted(found))} (nothing was created; "
                                   "--skip-existing or --update)")
            wanted = [a for a in accounts if a.name not in found]
        keys = await threads.deferToThread(derive_many, [a.password for a in wanted],
                                           iterations)
        result = await store.add_many([(a.name, k) for a, k in zip(wanted, keys, strict=True)],
                                      existing)
        skipped_before = {a.name for a in accounts} - {a.name for a in wanted}
        result.skipped = sorted(set(result.skipped) | skipped_before)
        return result

    result: BulkResult = with_accounts(config, create)
    domain = config.grid.domain
    done = set(result.created) | set(result.updated)
    generated = [a for a in accounts if a.generated and a.name in done]
    summary = (f"{len(result.created)} account(s) created, {len(result.updated)} updated, "
               f"{len(result.skipped)} skipped (existing)")
    data = {"created": [f"{n}@{domain}" for n in result.created],
            "updated": [f"{n}@{domain}" for n in result.updated],
            "skipped": [f"{n}@{domain}" for n in result.skipped],
            "generated": [{"name": a.name, "jid": f"{a.name}@{domain}", "password": a.password}
                          for a in generated]}
    if generated and not out.as_json:
        out.result(data, lambda: "\n".join(f"{a.name} {a.password}" for a in generated))
        print(summary, file=sys.stderr)  # stdout is the name-password list, for a file
    else:
        out.result(data, summary)
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
