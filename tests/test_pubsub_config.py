"""The [grid.broker] table: keys, nested tables, one-line problems."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sixnet.app.config import load_config
from sixnet.core.errors import ConfigError
from sixnet.core.storage.database import Database
from sixnet.grid.pubsub.component import PubSubBroker
from sixnet.grid.pubsub.config import BrokerConfig
from sixnet.grid.storage.revocations import RevocationStore
from tests.grid_harness import write_config

BASE = '[pki]\ntrust_anchors = ["ca.pem"]\n'


def load(tmp_path: Path, text: str) -> BrokerConfig:
    path = tmp_path / "sixnet.toml"
    path.write_text(BASE + text)
    return load_config(path, check_files=False).grid.broker


def problem(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value).split(": ", 1)[1]


def test_roles_and_rate_limits(tmp_path: Path) -> None:
    broker = load(tmp_path, """
[grid.broker]
default_access_model = "whitelist"
default_operations = ["subscribe"]
[grid.broker.rate_limits]
publishes_per_second = 5
[grid.broker.roles.sensors]
platforms = ["*@sensors.example"]
operations = ["publish"]
""")
    assert broker.default_access_model == "whitelist"
    assert broker.rate_limits.publishes_per_second == 5.0
    assert broker.rate_limits.publish_burst == 500
    assert broker.roles["sensors"].operations == ["publish"]


@pytest.mark.parametrize(("text", "expected"), [
    ('[grid.broker]\ndefault_access_model = "presence"\n',
     "grid.broker.default_access_model: 'presence' is not one of authorize, whitelist, open"),
    ('[grid.broker.roles.x]\noperations = ["delete"]\n',
     "grid.broker.roles.x.operations: 'delete' is not one of create, publish, subscribe"),
    ('[grid.broker.roles.x]\nplatforms = ["a@b/c"]\n',
     "grid.broker.roles.x.platforms: 'a@b/c' is not a bare JID"),
    ("[grid.broker.rate_limits]\npublish_burst = 0\n",
     "grid.broker.rate_limits.publish_burst: 0 must be greater than 0"),
    ('[grid.broker]\nnotification_type = "chat"\n',
     "grid.broker.notification_type: 'chat' is not one of normal, headline"),
])
def test_one_line_problems(tmp_path: Path, text: str, expected: str) -> None:
    assert problem(tmp_path, text).startswith(expected)


def test_open_default_needs_open_access(tmp_path: Path) -> None:
    config = load(tmp_path, '[grid.broker]\ndefault_access_model = "open"\n')
    database = Database("sqlite:b.sqlite3", base=tmp_path)
    try:
        with pytest.raises(ConfigError) as info:
            PubSubBroker(config, "example.test", database, tmp_path / "audit.jsonl",
                         RevocationStore(database))
        assert "'open' needs open_access = true" in str(info.value)
    finally:
        database.close()


def test_open_without_open_access_names_the_file(pki: Any, tmp_path: Path) -> None:
    """Two keys checked together by the broker: still one line with the file and the key."""
    config = write_config(tmp_path, pki, broker={"default_access_model": "open"}).path
    twistd = Path(sys.executable).parent / "twistd"
    result = subprocess.run([str(twistd), "-n", "--pidfile=", "sixnet-grid", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"sixnet: {config}: grid.broker.default_access_model: "
                             "'open' needs open_access = true\n")
