"""``sixnet irp``: talk to a registry (enroll, register, lookup, watch, revoke) and administer
one on its own host (invite, user add/remove/list work on the registry's database).

Passwords are read from a prompt, or from standard input when it is not a terminal; never
from the command line.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from twisted.internet.error import ConnectError

from sixnet.core.audit import AuditLog
from sixnet.core.cli import CommandGroup, Output, config_of
from sixnet.core.errors import EXIT_USAGE, CommandError, ConfigError
from sixnet.core.events import EventSpool
from sixnet.core.storage.database import Database, DatabaseURLError
from sixnet.core.timefmt import rfc3339
from sixnet.irp.client import DEFAULT_PORT, IRPClient, IRPConnectionError, connect, find_registry
from sixnet.irp.config import IRPSettings
from sixnet.irp.engine.access import Caller
from sixnet.irp.engine.credentials import hash_password, invite_hash, new_invite_code
from sixnet.irp.engine.registry import Registry
from sixnet.irp.service import EVENT_SPOOL
from sixnet.irp.storage import MIGRATIONS, SQLRegistryStore
from sixnet.irp.wire import IRPError, PersonRecord
from sixnet.pki.ca import CAError, LabCA
from sixnet.pki.identity import IdentitySyntaxError, normalize_user_id
from sixnet.pki.keys import (
    KeyFileError,
    certificates_pem,
    generate_key,
    write_private_key,
    write_public_file,
)
from sixnet.pki.store import CertificateStore, NodeIdentity, store_from_config


def register(commands: Any) -> None:
    irp = CommandGroup(commands, "irp", "the IRP registry: enroll, register, look up, watch")

    def client_command(name: str, run: Any, help_text: str) -> argparse.ArgumentParser:
        p = irp.command(name, run, help_text)
        p.add_argument("--server", help="registry HOST[:PORT] (default: DNS SRV "
                                        "_irp._tcp of --domain, else localhost:4604)")
        p.add_argument("--domain", help="find the registry of this domain by DNS SRV")
        p.add_argument("--server-name", help="the name in the registry's certificate "
                                             "(default: the server host)")
        p.add_argument("--identity", default="user",
                       help="[pki.identities.NAME] to authenticate with (default: user)")
        return p

    p = client_command("enroll", run_enroll, "get a certificate by password or one-time code")
    p.add_argument("user", metavar="USER_ID")
    p.add_argument("--code", help="a one-time enrollment code from 'sixnet irp invite' "
                                  "(otherwise the password is asked for)")
    p.add_argument("--out", type=Path, help="directory for cert.pem and key.pem (default: "
                                            "the files of --identity)")
    p.add_argument("--key-type", default="ecdsa-p256")
    p.add_argument("--force", action="store_true", help="replace an existing key")

    p = client_command("register", run_register, "publish this device's addresses")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS",
                   help="IP:PORT, an IPv6 address in brackets: [2001:db8::1]:4605")
    p.add_argument("--device", default="default", help="device label (default: default)")
    p.add_argument("--lifetime", type=int, default=3600, help="seconds (default 3600)")

    p = client_command("lookup", run_lookup, "a person's addresses and certificate, signed")
    p.add_argument("user", metavar="USER_ID")

    p = client_command("watch", run_watch, "print a person's record each time it changes")
    p.add_argument("user", metavar="USER_ID")
    p.add_argument("--count", type=int, default=0, help="stop after this many changes")

    p = client_command("revoke", run_revoke, "revoke your certificate (operators: any)")
    p.add_argument("serial", nargs="?", help="hex serial (default: the one authenticating)")

    p = irp.command("invite", run_invite, "issue a one-time enrollment code")
    p.add_argument("user", metavar="USER_ID")
    p.add_argument("--days", type=int, default=None, help="validity (default [irp] "
                                                         "invite_days)")
    users = irp.group("user", "password accounts (on the registry's host)")
    p = users.command("add", run_user_add, "create an account or set its password")
    p.add_argument("user", metavar="USER_ID")
    p = users.command("remove", run_user_remove, "remove a person and their records")
    p.add_argument("user", metavar="USER_ID")
    p = users.command("list", run_user_list, "list persons")
    p.add_argument("--after", help="continue after this user id")
    p.add_argument("--limit", type=int, default=1000)


# -- running Twisted code from a command --------------------------------------------------------


def _run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run one coroutine on the reactor and return its result (or raise its exception)."""
    from twisted.internet import defer, reactor

    outcome: list[Any] = []

    def start() -> None:
        d = defer.Deferred.fromCoroutine(main())
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.callLater(0, reactor.stop))  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined]
    result = outcome[0]
    from twisted.python.failure import Failure

    if isinstance(result, Failure):
        result.raiseException()
    return result


def _user(text: str) -> str:
    try:
        return normalize_user_id(text)
    except IdentitySyntaxError as e:
        raise CommandError(str(e), EXIT_USAGE) from None


def _read_password(prompt: str, confirm: bool = False) -> str:
    if sys.stdin.isatty():
        password = getpass.getpass(prompt)
        if confirm and getpass.getpass("again: ") != password:
            raise CommandError("the passwords differ", EXIT_USAGE)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("an empty password is not allowed", EXIT_USAGE)
    return password


# -- client commands -------------------------------------------------------------------------


def _identity(config: IRPSettings, store: CertificateStore, name: str,
              required: bool) -> NodeIdentity | None:
    if name in store.identities:
        return store.identities[name]
    if required:
        raise ConfigError(str(config.path), f"pki.identities.{name}",
                          "no such identity (give --identity, or enroll first)")
    return None


def _parse_server(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(DEFAULT_PORT)
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise CommandError(f"--server {text!r}: the port must be 1-65535 in ASCII digits",
                           EXIT_USAGE)
    return host, int(port)


async def _connect(args: argparse.Namespace, config: IRPSettings, store: CertificateStore,
                   identity: NodeIdentity | None) -> IRPClient:
    if args.server:
        candidates = [_parse_server(args.server)]
    elif args.domain:
        candidates = await find_registry(args.domain)
    else:
        candidates = [("localhost", DEFAULT_PORT)]
    errors = []
    for host, port in candidates:
        try:
            return await connect(host, port, store, identity=identity,
                                 server_name=args.server_name or host)
        except (IRPConnectionError, OSError, ConnectError) as e:
            errors.append(f"{host}:{port}: {e}")
    raise CommandError("cannot reach the registry: " + "; ".join(errors) if errors
                       else f"{args.domain}: no IRP registry (SRV says none)")


def _client_session(args: argparse.Namespace, body: Callable[[IRPClient], Any], *,
                    authenticated: bool = True) -> Any:
    config = config_of(args)
    store = store_from_config(config)
    identity = _identity(config, store, args.identity, authenticated)

    async def main() -> Any:
        client = await _connect(args, config, store, identity)
        try:
            if authenticated and client.user is None:
                why = f" ({client.refused})" if client.refused else ""
                raise CommandError(f"the registry did not accept identity {args.identity}{why}")
            return await body(client)
        except IRPError as e:
            raise CommandError(f"the registry refused: {e}") from None
        finally:
            client.close()

    try:
        return _run(main)
    except IRPConnectionError as e:
        raise CommandError(f"registry connection failed: {e}") from None


def record_json(record: PersonRecord) -> dict[str, Any]:
    cert = record.certificate
    return {
        "user": record.person,
        "addresses": [{"ip": a.ip, "port": a.port, "device": d.device,
                       "registered": rfc3339(d.registered), "expires": rfc3339(d.expires)}
                      for d in record.devices for a in d.addresses],
        "certificate": None if cert is None else {
            "serial": cert.serial, "status": cert.status,
            "chain": certificates_pem(list(cert.chain)).decode("ascii")},
        "removed": record.removed,
    }


def record_text(record: PersonRecord) -> str:
    lines = [record.person + (" (removed)" if record.removed else "")]
    for ip, port, device in record.addresses:
        shown = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        lines.append(f"  {shown:<45} {device}")
    if not record.addresses:
        lines.append("  no addresses registered")
    if record.certificate is not None:
        lines.append(f"  certificate {record.certificate.serial} {record.certificate.status}")
    return "\n".join(lines)


def run_enroll(args: argparse.Namespace, out: Output) -> int:
    user = _user(args.user)
    config = config_of(args, check_files=False)
    if args.out is not None:
        cert_path, key_path = args.out / "cert.pem", args.out / "key.pem"
    elif args.identity in config.pki.identities:
        ident = config.pki.identities[args.identity]
        cert_path, key_path = ident.certificate, ident.key
    else:
        raise CommandError("give --out DIR, or an --identity the configuration defines",
                           EXIT_USAGE)
    if key_path.exists() and not args.force:
        raise CommandError(f"{key_path}: a key already exists (use --force to replace it)")
    password = None if args.code else _read_password(f"password for {user}: ")
    key = generate_key(args.key_type)
    store = CertificateStore.from_files(config.pki.trust_anchors, config.pki.crls)

    async def main() -> Any:
        client = await _connect(args, config, store, None)
        try:
            return await client.enroll(user, key, password=password, code=args.code)
        except IRPError as e:
            raise CommandError(f"enrollment refused: {e}") from None
        finally:
            client.close()

    try:
        chain = _run(main)
    except IRPConnectionError as e:
        raise CommandError(f"registry connection failed: {e}") from None
    write_private_key(key_path, key, force=args.force)
    write_public_file(cert_path, certificates_pem(chain))
    serial = format(chain[0].serial_number, "X")
    out.result({"user": user, "serial": serial, "certificate": str(cert_path),
                "key": str(key_path)},
               f"enrolled {user}: certificate {serial} in {cert_path} (key {key_path})")
    return 0


def _address(text: str) -> tuple[str, int]:
    if text.startswith("["):
        ip, _, port = text[1:].partition("]:")
    else:
        ip, _, port = text.rpartition(":")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise CommandError(f"{text!r} is not IP:PORT (IPv6 in brackets)", EXIT_USAGE) from None
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise CommandError(f"{text!r}: the port must be 1-65535 in ASCII digits", EXIT_USAGE)
    return ip, int(port)


def run_register(args: argparse.Namespace, out: Output) -> int:
    addresses = [_address(a) for a in args.addresses]
    record = _client_session(args, lambda c: c.register(addresses, args.device, args.lifetime))
    out.result(record_json(record), lambda: record_text(record))
    return 0


def run_lookup(args: argparse.Namespace, out: Output) -> int:
    user = _user(args.user)
    record = _client_session(args, lambda c: c.lookup(user))
    out.result(record_json(record), lambda: record_text(record))
    return 0


def run_watch(args: argparse.Namespace, out: Output) -> int:
    user = _user(args.user)

    async def body(client: IRPClient) -> None:
        from twisted.internet import defer

        done: defer.Deferred[None] = defer.Deferred()
        seen = [0]

        def changed(record: PersonRecord) -> None:
            _print(out, record)
            seen[0] += 1
            if args.count and seen[0] >= args.count and not done.called:
                done.callback(None)

        _print(out, await client.watch(user, changed))
        client.lost.addCallback(lambda e: done.called or done.errback(e))
        await done

    _client_session(args, body)
    return 0


def _print(out: Output, record: PersonRecord) -> None:
    if out.as_json:
        print(json.dumps(record_json(record), sort_keys=True), flush=True)
    else:
        print(record_text(record), flush=True)


def run_revoke(args: argparse.Namespace, out: Output) -> int:
    serial = _client_session(args, lambda c: c.revoke(args.serial))
    out.result({"revoked": serial}, f"revoked certificate {serial}")
    return 0


# -- administration on the registry's host ---------------------------------------------------------

#: Who runs the administration commands: an operator on the registry's host (no address).
COMMAND_LINE = Caller(None, "operator (command line)", operator=True)



def _admin(args: argparse.Namespace, body: Callable[[SQLRegistryStore, IRPSettings, AuditLog], Any]
           ) -> Any:
    config = config_of(args, check_files=False)
    try:
        db = Database(config.irp.database, base=config.sixnet.state_dir)
    except DatabaseURLError as e:
        raise ConfigError(str(config.path), "irp.database", str(e)) from None
    store = SQLRegistryStore(db)
    audit = AuditLog(config.sixnet.state_dir / config.irp.audit_log)

    async def main() -> Any:
        try:
            await db.migrate("irp", MIGRATIONS)
            return await body(store, config, audit)
        finally:
            db.close()
            audit.close()

    try:
        return _run(main)
    except (OSError, KeyFileError, CAError) as e:
        raise CommandError(f"the registry: {e}") from None


def _now_ms() -> int:
    return int(time.time() * 1000)


def run_invite(args: argparse.Namespace, out: Output) -> int:
    user = _user(args.user)
    code = new_invite_code()

    async def body(store: SQLRegistryStore, config: IRPSettings, audit: AuditLog) -> str:
        days = args.days or config.irp.invite_days
        if days <= 0:
            raise CommandError("--days must be positive", EXIT_USAGE)
        now = _now_ms()
        expires = now + days * 86_400_000
        await store.add_invite(invite_hash(code), user, now, expires)
        audit.record("invite", outcome="ok", actor=COMMAND_LINE.actor, target=user)
        return rfc3339(expires / 1000)

    expires = _admin(args, body)
    out.result({"user": user, "code": code, "expires": expires},
               f"enrollment code for {user}: {code} (valid until {expires}; it works once)")
    return 0


def run_user_add(args: argparse.Namespace, out: Output) -> int:
    user = _user(args.user)
    password = _read_password(f"new password for {user}: ", confirm=True)
    hashed = hash_password(password)

    async def body(store: SQLRegistryStore, config: IRPSettings, audit: AuditLog) -> None:
        await store.set_password(user, hashed, _now_ms())
        audit.record("user-add", outcome="ok", actor=COMMAND_LINE.actor, target=user)

    _admin(args, body)
    out.result({"user": user, "password": "set"}, f"{user}: password set")
    return 0


def run_user_remove(args: argparse.Namespace, out: Output) -> int:
    user = _user(args.user)

    async def body(store: SQLRegistryStore, config: IRPSettings, audit: AuditLog) -> list[str]:
        ca = LabCA.open(config.pki.lab_ca) if config.pki.lab_ca is not None else None
        certificates = CertificateStore.from_files(config.pki.trust_anchors, config.pki.crls)
        # This process has no bridge: the running registry emits the events (EventSpool).
        spool = EventSpool(config.sixnet.state_dir / EVENT_SPOOL)
        registry = Registry(store, certificates, config.irp, audit, ca, events=spool)
        try:
            return await registry.remove(COMMAND_LINE, user)
        except IRPError as e:
            raise CommandError(e.text) from None

    revoked = _admin(args, body)
    out.result({"user": user, "removed": True, "revoked": revoked},
               f"{user} removed; certificates revoked: {', '.join(revoked) or 'none'}")
    return 0


def run_user_list(args: argparse.Namespace, out: Output) -> int:
    async def body(store: SQLRegistryStore, config: IRPSettings, audit: AuditLog) -> list[Any]:
        return await store.list_persons(args.after, args.limit)

    rows = _admin(args, body)
    data = [{"user": r.person, "certificates": r.certificates, "password": r.has_password,
             "created": rfc3339(r.created / 1000)}
            for r in rows]
    out.result(data, lambda: "\n".join(
        f"{d['user']:<40} certificates {d['certificates']:<3} "
        f"password {'yes' if d['password'] else 'no'}" for d in data) or "no persons")
    return 0

