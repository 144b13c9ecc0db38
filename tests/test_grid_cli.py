"""``sixnet grid user ...`` as a user runs it: a subprocess, the password on standard input."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from sixnet.grid.scram import ScramCredentials
from tests.grid_harness import write_config


def run(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sixnet", *args, "--config", str(config)],
                          input=stdin, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)


def test_user_commands(pki: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, pki).path
    added = run(config, "grid", "user", "add", "alice", stdin="s3cret\n")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "account alice@localhost created"
    again = run(config, "grid", "user", "add", "Alice", stdin="x\n")
    assert again.returncode == 1 and again.stderr.strip() == \
        "sixnet: account 'alice' exists already"
    assert run(config, "grid", "user", "passwd", "alice", stdin="new\n").returncode == 0
    listed = run(config, "grid", "user", "list", "--json")
    rows = json.loads(listed.stdout)
    assert [(r["jid"], r["kind"]) for r in rows] == [("alice@localhost", "password")]
    empty = run(config, "grid", "user", "add", "bob", stdin="")
    assert empty.returncode == 2 and "empty password" in empty.stderr
    bad = run(config, "grid", "user", "add", "a/b", stdin="x\n")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    missing = run(config, "grid", "user", "remove", "bob")
    assert missing.returncode == 1 and "no account 'bob'" in missing.stderr
    assert run(config, "grid", "user", "remove", "alice").returncode == 0
    assert run(config, "grid", "user", "list").stdout.strip() == "no accounts"
    # The password is never stored: only salted SCRAM keys.
    db = (config.parent / "state" / "grid.sqlite3").read_bytes()
    assert b"s3cret" not in db


def test_password_is_not_an_argument(pki: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, pki).path
    result = run(config, "grid", "user", "add", "alice", "--password", "x")
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_user_add_opens_only_the_storage(pki: Any, tmp_path: Path) -> None:
    """The command loads the grid's storage, not its server (streams, router, broker)."""
    config = write_config(tmp_path, pki).path
    code = ("import runpy, sys\n"
            "sys.argv = ['sixnet', 'grid', 'user', 'add', 'alice', '--config', sys.argv[1]]\n"
            "try:\n    runpy.run_module('sixnet', run_name='__main__')\n"
            "finally:\n"
            "    print(sorted(m for m in sys.modules if m.startswith('sixnet.grid')))\n")
    result = subprocess.run([sys.executable, "-c", code, str(config)], input="pw\n",
                            capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1].replace("'", '"')))
    assert "sixnet.grid.storage.accounts" in loaded
    assert not loaded & {"sixnet.grid.service", "sixnet.grid.stream", "sixnet.grid.router",
                         "sixnet.grid.sasl", "sixnet.grid.pubsub.component"}


# -- sixnet grid user add --from FILE ------------------------------------------------------------


def stored_credentials(config: Path) -> dict[str, tuple[str, ScramCredentials | None]]:
    """Every account's kind and SHA-256 SCRAM keys, read from the database file."""
    db = sqlite3.connect(config.parent / "state" / "grid.sqlite3")
    try:
        rows = db.execute("SELECT username, kind, sha256_salt, sha256_iterations, "
                          "sha256_stored, sha256_server FROM grid_accounts").fetchall()
    finally:
        db.close()
    return {name: (kind, ScramCredentials(salt, n, stored, server) if salt else None)
            for name, kind, salt, n, stored, server in rows}


def logs_in(credentials: dict[str, tuple[str, ScramCredentials | None]], name: str,
            password: str) -> bool:
    keys = credentials[name][1]
    return keys is not None and keys.check_password("SHA-256", password)


def test_bulk_add_from_a_file(pki: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, pki).path
    accounts = tmp_path / "accounts.txt"
    accounts.write_text("# lab platforms\n\nsensor1 pw-one\n  Sensor2\tpw two  \n"
                        "   # indented comment\nsensor3 p#3\n")
    added = run(config, "grid", "user", "add", "--from", str(accounts))
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "3 account(s) created, 0 updated, 0 skipped (existing)"
    stored = stored_credentials(config)
    assert sorted(stored) == ["sensor1", "sensor2", "sensor3"]
    assert logs_in(stored, "sensor1", "pw-one")
    assert logs_in(stored, "sensor2", "pw two")  # inner spaces kept, outer ones dropped
    assert logs_in(stored, "sensor3", "p#3")
    assert not logs_in(stored, "sensor1", "pw-two")


def test_bulk_add_from_stdin_with_generated_passwords(pki: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, pki).path
    names = [f"p{i}" for i in range(20)]
    added = run(config, "grid", "user", "add", "--from", "-", "--generate", "--json",
                stdin="\n".join(names + ["given given-password"]) + "\n")
    assert added.returncode == 0, added.stderr
    data = json.loads(added.stdout)
    assert sorted(data["created"]) == sorted(f"{n}@localhost" for n in [*names, "given"])
    generated = {g["name"]: g["password"] for g in data["generated"]}
    assert sorted(generated) == sorted(names)  # only the passwords it made
    assert len(set(generated.values())) == 20 and all(len(p) >= 24 for p in generated.values())
    stored = stored_credentials(config)
    assert all(logs_in(stored, n, p) for n, p in generated.items())
    assert logs_in(stored, "given", "given-password")
    # Without --json: 'name password' lines on stdout (for a file), the summary on stderr.
    plain = run(config, "grid", "user", "add", "--from", "-", "--generate", stdin="q1\nq2\n")
    assert plain.returncode == 0, plain.stderr
    pairs = dict(line.split(" ", 1) for line in plain.stdout.splitlines())
    assert sorted(pairs) == ["q1", "q2"]
    assert logs_in(stored_credentials(config), "q2", pairs["q2"])
    assert "2 account(s) created" in plain.stderr


def test_bulk_add_reports_every_bad_line_and_creates_nothing(pki: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, pki).path
    accounts = tmp_path / "bad.txt"
    accounts.write_text("good1 pw\na/b@c pw\nGood1 other\nnopassword\n"
                        "ctrl bad\x07pw\ngood2 pw\n")
    result = run(config, "grid", "user", "add", "--from", str(accounts))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split(": ")[0] for line in lines[:-1]] == [
        f"{accounts}:2", f"{accounts}:3", f"{accounts}:4", f"{accounts}:5"]
    assert "'good1' is on line 1 already" in lines[1]
    assert "has no password" in lines[2] and "--generate" in lines[2]
    assert "control characters" in lines[3]
    assert lines[-1] == f"sixnet: 4 bad line(s) in {accounts}; no account was created"
    assert not (config.parent / "state" / "grid.sqlite3").exists()  # not even opened
    missing = run(config, "grid", "user", "add", "--from", str(tmp_path / "none.txt"))
    assert missing.returncode == 2 and "No such file" in missing.stderr
    empty = run(config, "grid", "user", "add", "--from", "-", stdin="# nothing\n\n")
    assert empty.returncode == 2 and "no accounts" in empty.stderr
    both = run(config, "grid", "user", "add", "alice", "--from", "-", stdin="x y\n")
    assert both.returncode == 2 and "not both" in both.stderr


def test_bulk_add_with_existing_accounts(pki: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, pki).path
    assert run(config, "grid", "user", "add", "alice", stdin="old\n").returncode == 0
    assert run(config, "grid", "user", "add", "bob", stdin="old\n").returncode == 0
    source = "alice new\nbob new\ncarol new\n"
    refused = run(config, "grid", "user", "add", "--from", "-", stdin=source)
    assert refused.returncode == 1
    assert "2 account(s) exist already: alice, bob" in refused.stderr
    assert sorted(stored_credentials(config)) == ["alice", "bob"]  # carol was not created
    skipped = run(config, "grid", "user", "add", "--from", "-", "--skip-existing", "--json",
                  stdin=source)
    assert skipped.returncode == 0, skipped.stderr
    data = json.loads(skipped.stdout)
    assert (data["created"], data["skipped"]) == (["carol@localhost"],
                                                  ["alice@localhost", "bob@localhost"])
    stored = stored_credentials(config)
    assert logs_in(stored, "alice", "old") and logs_in(stored, "carol", "new")
    updated = run(config, "grid", "user", "add", "--from", "-", "--update", "--json",
                  stdin="alice newer\ndave d\n")
    assert updated.returncode == 0, updated.stderr
    data = json.loads(updated.stdout)
    assert (data["created"], data["updated"]) == (["dave@localhost"], ["alice@localhost"])
    stored = stored_credentials(config)
    assert logs_in(stored, "alice", "newer") and not logs_in(stored, "alice", "old")
    assert logs_in(stored, "bob", "old")


def test_single_add_with_a_generated_password(pki: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, pki).path
    added = run(config, "grid", "user", "add", "erin", "--generate")
    assert added.returncode == 0, added.stderr
    name, password = added.stdout.split()
    assert name == "erin" and logs_in(stored_credentials(config), "erin", password)
    flag = run(config, "grid", "user", "add", "frank", "--update", stdin="x\n")
    assert flag.returncode == 2 and "--from" in flag.stderr
