"""``sixnet pki``: the lab CA round trip, checked with openssl."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from sixnet.core.timefmt import parse_rfc3339

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="the openssl command is not installed")


def sixnet(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sixnet", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


@needs_openssl
def test_round_trip_with_openssl(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    r = sixnet("pki", "init", "--ca-dir", str(ca), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["certificate"] == str(ca / "ca.pem")
    assert stat.S_IMODE(os.stat(ca / "ca.key").st_mode) == 0o600

    user = json.loads(sixnet("pki", "issue-user", "alice@example.test", "--ca-dir", str(ca),
                             "--json").stdout)
    host = json.loads(sixnet("pki", "issue-host", "grid.example.test", "--ca-dir", str(ca),
                             "--json", "--key-type", "rsa2048").stdout)
    assert stat.S_IMODE(os.stat(user["key"]).st_mode) == 0o600
    for issued, purpose in ((user, "sslclient"), (host, "sslserver")):
        v = subprocess.run(["openssl", "verify", "-CAfile", str(ca / "ca.pem"), "-purpose",
                            purpose, issued["certificate"]], capture_output=True, text=True)
        assert v.returncode == 0, v.stdout + v.stderr
        assert v.stdout.strip().endswith(": OK")

    r = sixnet("pki", "revoke", user["serial"], "--ca-dir", str(ca))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"revoked {user['serial']} (alice@example.test)")

    listed = json.loads(sixnet("pki", "crl", "--ca-dir", str(ca), "--json").stdout)
    assert [e["serial"] for e in listed["revoked"]] == [user["serial"]]
    crl_text = subprocess.run(["openssl", "crl", "-in", str(ca / "crl.pem"), "-noout", "-text"],
                              capture_output=True, text=True, check=True).stdout
    assert f"Serial Number: {user['serial']}" in crl_text
    # openssl agrees the revoked certificate is revoked and the other is not
    crl_check = ["openssl", "verify", "-crl_check", "-CAfile", str(ca / "ca.pem"),
                 "-CRLfile", str(ca / "crl.pem")]
    v = subprocess.run([*crl_check, user["certificate"]], capture_output=True, text=True)
    assert v.returncode != 0 and "revoked" in (v.stdout + v.stderr)
    v = subprocess.run([*crl_check, host["certificate"]], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr

    rows = json.loads(sixnet("pki", "list", "--ca-dir", str(ca), "--json").stdout)
    assert [(r["kind"], r["name"], bool(r["revoked_at"])) for r in rows] == [
        ("ca", "sixnet lab CA", False), ("user", "alice@example.test", True),
        ("host", "grid.example.test", False)]



def test_issue_gives_not_after_in_rfc3339_with_z(tmp_path: Path) -> None:
    """The suite's one time format (``sixnet.core.timefmt``), in JSON and text alike, and the
    same text as the CA's index (``sixnet pki list``)."""
    ca = tmp_path / "ca"
    assert sixnet("pki", "init", "--ca-dir", str(ca)).returncode == 0
    issued = json.loads(sixnet("pki", "issue-user", "alice@example.test", "--ca-dir", str(ca),
                               "--days", "30", "--json").stdout)
    not_after = issued["not_after"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", not_after), not_after
    cert = x509.load_pem_x509_certificate(Path(issued["certificate"]).read_bytes())
    assert parse_rfc3339(not_after) == cert.not_valid_after_utc
    rows = json.loads(sixnet("pki", "list", "--ca-dir", str(ca), "--json").stdout)
    assert [r["not_after"] for r in rows if r["serial"] == issued["serial"]] == [not_after]
    text = sixnet("pki", "issue-user", "bob@example.test", "--ca-dir", str(ca)).stdout
    assert re.search(r" until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", text.strip()), text
    assert "+00:00" not in text

def test_never_overwrites_a_key_without_force(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    assert sixnet("pki", "init", "--ca-dir", str(ca)).returncode == 0
    r = sixnet("pki", "init", "--ca-dir", str(ca))
    assert r.returncode == 1
    assert r.stderr == (f"sixnet: {ca}/ca.key: a CA already exists here "
                        "(use --force to replace it)\n")
    assert sixnet("pki", "issue-user", "bob@example.test", "--ca-dir", str(ca)).returncode == 0
    r = sixnet("pki", "issue-user", "bob@example.test", "--ca-dir", str(ca))
    assert r.returncode == 1
    assert "a key already exists (use --force to replace it)" in r.stderr
    assert sixnet("pki", "issue-user", "bob@example.test", "--ca-dir", str(ca),
                  "--force").returncode == 0


@pytest.mark.parametrize("key_type", ["ed25519", "rsa3072", "ecdsa-p384"])
def test_key_types_on_request(tmp_path: Path, key_type: str) -> None:
    ca = tmp_path / "ca"
    assert sixnet("pki", "init", "--ca-dir", str(ca), "--key-type", key_type).returncode == 0
    r = sixnet("pki", "issue-user", "carol@example.test", "--ca-dir", str(ca), "--key-type",
               key_type, "--json")
    assert r.returncode == 0, r.stderr


def test_command_line_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    r = sixnet("pki", "issue-user", "not-a-user-id", "--ca-dir", str(tmp_path))
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.count("\n") == 1
    ca = tmp_path / "ca"
    sixnet("pki", "init", "--ca-dir", str(ca))
    r = sixnet("pki", "issue-user", "not-a-user-id", "--ca-dir", str(ca))
    assert r.returncode == 2
    assert r.stderr == "sixnet: 'not-a-user-id' is not a user id of the form name@domain\n"
    r = sixnet("pki", "issue-user", "a@example.test", "--key-type", "dsa")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "invalid choice: 'dsa'" in r.stderr
    r = sixnet("pki", "revoke", "zz", "--ca-dir", str(ca))
    assert (r.returncode, r.stderr) == (1, "sixnet: 'zz' is not a certificate serial "
                                           "(hexadecimal)\n")
    r = sixnet("pki", "frobnicate")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr
