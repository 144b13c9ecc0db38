"""``sixnet pki``: the lab certificate authority's commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sixnet.core.cli import CommandGroup, Output, config_of
from sixnet.core.errors import EXIT_USAGE, CommandError
from sixnet.core.timefmt import rfc3339
from sixnet.pki.ca import CAError, LabCA, parse_serial, serial_hex
from sixnet.pki.identity import IdentitySyntaxError
from sixnet.pki.keys import DEFAULT_KEY_TYPE, KEY_TYPES, KeyFileError


def register(commands: Any) -> None:
    def ca_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ca-dir", type=Path, default=None,
                       help="the CA's directory (default: [pki] lab_ca of the configuration)")

    command = CommandGroup(commands, "pki", "the lab certificate authority", ca_dir).command

    p = command("init", run_init, "create a CA (a self-signed root) in the CA directory")
    p.add_argument("--name", default="sixnet lab CA", help="the CA's common name")
    _key_options(p, days=3650)

    p = command("issue-user", run_issue, "issue a client certificate for a person")
    p.add_argument("name", metavar="USER_ID", help="the person, e.g. alice@example.test")
    p.add_argument("--out", type=Path, help="directory for cert.pem and key.pem")
    _key_options(p, days=365)
    p.set_defaults(kind="user")

    p = command("issue-host", run_issue, "issue a server certificate for a host")
    p.add_argument("name", metavar="HOST", help="the host name, e.g. grid.example.test")
    p.add_argument("--out", type=Path, help="directory for cert.pem and key.pem")
    _key_options(p, days=365)
    p.set_defaults(kind="host")

    p = command("revoke", run_revoke, "revoke a certificate and rewrite the CRL")
    p.add_argument("serial", help="the serial, hexadecimal, as 'sixnet pki list' shows it")
    p.add_argument("--reason", default="unspecified", help="why (recorded in the index)")

    command("crl", run_crl, "write a fresh CRL and show what it lists")
    command("list", run_list, "list every certificate the CA issued")
    p = command("setup", run_setup,
                "create the CA and every identity the configuration names, where missing")
    p.add_argument("--force", action="store_true",
                   help="replace a key whose certificate is missing")


def _key_options(p: argparse.ArgumentParser, *, days: int) -> None:
    p.add_argument("--key-type", choices=KEY_TYPES, default=DEFAULT_KEY_TYPE,
                   help=f"key algorithm (default {DEFAULT_KEY_TYPE})")
    p.add_argument("--days", type=int, default=days, help=f"validity in days (default {days})")
    p.add_argument("--force", action="store_true", help="replace an existing key")


def _ca_dir(args: argparse.Namespace) -> Path:
    if args.ca_dir is not None:
        return args.ca_dir
    config = config_of(args, check_files=False)
    if config.pki.lab_ca is None:
        raise CommandError(f"{config.path}: pki.lab_ca is not set; give --ca-dir",
                           EXIT_USAGE)
    return config.pki.lab_ca


def _open(args: argparse.Namespace) -> LabCA:
    try:
        return LabCA.open(_ca_dir(args))
    except (CAError, KeyFileError) as e:
        raise CommandError(str(e)) from None


def run_init(args: argparse.Namespace, out: Output) -> int:
    if args.days <= 0:
        raise CommandError("--days must be positive", EXIT_USAGE)
    try:
        ca = LabCA.init(_ca_dir(args), name=args.name, key_type=args.key_type, days=args.days,
                        force=args.force)
    except (CAError, FileExistsError) as e:
        raise CommandError(str(e)) from None
    cert = ca.certificate
    out.result(
        {"ca_dir": str(ca.directory), "certificate": str(ca.directory / "ca.pem"),
         "serial": serial_hex(cert.serial_number), "subject": cert.subject.rfc4514_string()},
        f"CA {cert.subject.rfc4514_string()} created in {ca.directory}",
    )
    return 0


def run_issue(args: argparse.Namespace, out: Output) -> int:
    if args.days <= 0:
        raise CommandError("--days must be positive", EXIT_USAGE)
    ca = _open(args)
    try:
        cert_path, key_path, chain = ca.issue(args.kind, args.name, key_type=args.key_type,
                                              days=args.days, out=args.out, force=args.force)
    except IdentitySyntaxError as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    except (CAError, FileExistsError) as e:
        raise CommandError(str(e)) from None
    leaf = chain[0]
    # As in index.json and `sixnet pki list`: RFC 3339 with Z, to the second.
    not_after = rfc3339(leaf.not_valid_after_utc, precision="seconds")
    out.result(
        {"kind": args.kind, "name": args.name, "serial": serial_hex(leaf.serial_number),
         "certificate": str(cert_path), "key": str(key_path), "not_after": not_after},
        f"{args.kind} certificate {serial_hex(leaf.serial_number)} for {args.name}: "
        f"{cert_path} (key {key_path}) until {not_after}",
    )
    return 0


def run_revoke(args: argparse.Namespace, out: Output) -> int:
    ca = _open(args)
    try:
        record = ca.revoke(parse_serial(args.serial), args.reason)
    except CAError as e:
        raise CommandError(str(e)) from None
    out.result({"serial": record.serial, "name": record.name, "revoked_at": record.revoked_at,
                "crl": str(ca.directory / "crl.pem")},
               f"revoked {record.serial} ({record.name}); CRL {ca.directory / 'crl.pem'}")
    return 0


def run_crl(args: argparse.Namespace, out: Output) -> int:
    ca = _open(args)
    path = ca.write_crl()
    revoked = [r for r in ca.records() if r.revoked_at]
    out.result(
        {"crl": str(path), "revoked": [{"serial": r.serial, "name": r.name,
                                        "revoked_at": r.revoked_at} for r in revoked]},
        lambda: "\n".join([f"CRL {path}: {len(revoked)} revoked"]
                          + [f"{r.serial}  {r.name}  {r.revoked_at}" for r in revoked]),
    )
    return 0


def run_list(args: argparse.Namespace, out: Output) -> int:
    ca = _open(args)
    records = ca.records()
    out.result(
        [vars(r) for r in records],
        lambda: "\n".join(
            f"{r.serial:<40} {r.kind:<5} {r.name:<32} until {r.not_after}"
            + (f"  REVOKED {r.revoked_at}" if r.revoked_at else "")
            for r in records
        ),
    )
    return 0


def run_setup(args: argparse.Namespace, out: Output) -> int:
    """Make what the configuration needs: the lab CA, then each identity whose files are absent."""
    config = config_of(args, check_files=False)
    directory = args.ca_dir or config.pki.lab_ca
    if directory is None:
        raise CommandError(f"{config.path}: pki.lab_ca is not set; nothing to set up",
                           EXIT_USAGE)
    made: list[str] = []
    try:
        if (directory / "ca.pem").exists():
            ca = LabCA.open(directory)
        else:
            ca = LabCA.init(directory)
            made.append(f"CA in {directory}")
        for name, ident in config.pki.identities.items():
            if ident.certificate.exists() and ident.key.exists():
                continue
            kind = "user" if "@" in ident.subject else "host"
            ca.issue(kind, ident.subject, key_type=ident.key_type, force=args.force,
                     cert_path=ident.certificate, key_path=ident.key)
            made.append(f"{kind} identity {name} ({ident.subject})")
    except (CAError, KeyFileError, IdentitySyntaxError, FileExistsError) as e:
        raise CommandError(str(e)) from None
    out.result({"created": made}, "\n".join(made) if made else "nothing to do")
    return 0
