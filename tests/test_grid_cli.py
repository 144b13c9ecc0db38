"""``sixnet grid user ...`` as a user runs it: a subprocess, the password on standard input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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
