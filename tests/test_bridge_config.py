"""The [bridge] section: defaults, and every problem as one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sixnet.app.config import load_config

from .support.configs import config_file, localhost_config, problem
from .support.pki import LabPKI


@pytest.fixture
def base(pki: LabPKI) -> str:
    return localhost_config(pki)


def test_defaults(tmp_path: Path, base: str) -> None:
    config = load_config(config_file(tmp_path, base))
    bridge = config.bridge
    assert not bridge.enabled and bridge.target == "local"
    assert bridge.window == 60.0 and bridge.max_queue == 10000
    assert {s: bridge.topic_for(s) for s in ("irp", "chat", "grid")} == dict.fromkeys(
        ("irp", "chat", "grid"), "sixnet-security")
    assert "chat.mitm" in bridge.immediate


def test_per_service_topics_and_a_remote_target(tmp_path: Path, base: str) -> None:
    secret = tmp_path / "password"
    secret.write_text("pencil\n")
    config = load_config(config_file(tmp_path, base + f"""
[bridge]
enabled = true
target = "remote"
[bridge.topics]
chat = "sixnet-chat"
[bridge.remote]
server = "[2001:db8::1]:5223"
jid = "bridge@example.org"
service = "pubsub.example.org"
tls = "direct"
password_file = "{secret}"
"""))
    assert config.bridge.topic_for("chat") == "sixnet-chat"
    assert config.bridge.topic_for("irp") == "sixnet-security"
    assert config.bridge.remote.password_file == secret


REMOTE = '[bridge]\nenabled = true\ntarget = "remote"\n[bridge.remote]\n'


@pytest.mark.parametrize("extra,expected", [
    ('[bridge]\ntarget = "cloud"\n', "FILE: bridge.target: 'cloud' is not one of local, remote"),
    ("[bridge]\nwindow = 0\n", "FILE: bridge.window: 0.0 must be greater than 0"),
    ("[bridge]\nmax_queue = 0\n", "FILE: bridge.max_queue: 0 is out of range 1-10000000"),
    ('[bridge]\nimmediate = ["chat.typo"]\n',
     "FILE: bridge.immediate: 'chat.typo' is not a security event kind"),
    ('[bridge]\ntopic = "two words"\n', "FILE: bridge.topic: 'two words' is not a topic name"),
    ('[bridge.topics]\nmail = "x"\n', "FILE: bridge.topics.mail: unknown key"),
    ('[bridge]\nlocalpart = "Bridge@x"\n', "FILE: bridge.localpart: 'Bridge@x' must be"),
    ('[bridge]\ndatabase = "mysql://x"\n', "FILE: bridge.database: 'mysql://x' is neither"),
    ('[bridge]\naccess_model = "everyone"\n', "FILE: bridge.access_model: 'everyone' is not"),
    ("[bridge]\nenabled = true\n",
     "FILE: bridge.target: 'local' needs the grid here ([grid] enabled = true)"),
    ('[bridge]\nenabled = true\nidentity = "nobody"\n',
     "FILE: bridge.identity: no [pki.identities.nobody] table defines it"),
    (REMOTE, "FILE: bridge.remote.server: is required when target = 'remote'"),
    (REMOTE + 'server = "grid.example.org"\n',
     "FILE: bridge.remote.server: 'grid.example.org' is not host:port"),
    (REMOTE + 'server = "h:\u00b2"\n', "FILE: bridge.remote.server: 'h:\u00b2' is not host:port"),
    (REMOTE + 'server = "h:\u0665\u0662\u0662\u0662"\n',
     "FILE: bridge.remote.server: 'h:\u0665\u0662\u0662\u0662' is not host:port"),
    (REMOTE + 'server = "h:5222"\njid = "h"\n', "FILE: bridge.remote.jid: 'h' is not a bare JID"),
    (REMOTE + 'server = "h:5222"\njid = "b@h"\nservice = "pubsub.h"\n',
     "FILE: bridge.remote: set exactly one of identity (EXTERNAL) and password_file"),
    (REMOTE + 'server = "h:5222"\njid = "b@h"\nservice = "pubsub.h"\nidentity = "nobody"\n',
     "FILE: bridge.remote.identity: no [pki.identities.nobody] table defines it"),
    (REMOTE + 'password_file = "/nonexistent/pw"\n',
     "FILE: bridge.remote.password_file: file /nonexistent/pw does not exist"),
    (REMOTE + 'tls = "ssl"\n', "FILE: bridge.remote.tls: 'ssl' is not one of starttls, direct"),
])
def test_one_line_problems(tmp_path: Path, base: str, extra: str, expected: str) -> None:
    assert problem(tmp_path, base + extra).startswith(expected)


def test_every_key_documented_in_the_shipped_file() -> None:
    from dataclasses import fields

    from sixnet.bridge.config import BridgeConfig, RemoteConfig, TopicsConfig

    text = (Path(__file__).parent.parent / "etc" / "sixnet.toml").read_text()
    for cls, table in ((BridgeConfig, "[bridge]"), (TopicsConfig, "[bridge.topics]"),
                       (RemoteConfig, "[bridge.remote]")):
        section = "\n" + text.split(f"\n{table}\n", 1)[1].split("\n[", 1)[0]
        for f in fields(cls):
            if f.name in ("topics", "remote"):
                continue
            assert f"\n{f.name} = " in section or f"\n# {f.name} = " in section, f.name


def test_the_root_hands_the_bridge_the_grid_of_the_process(pki: LabPKI, tmp_path: Path) -> None:
    from sixnet.app.root import make_root
    from sixnet.bridge.targets import LocalTarget

    text = localhost_config(pki, grid={"enabled": True, "listen": [], "listen_tls": []},
                            bridge={"enabled": True})
    root = make_root(load_config(config_file(tmp_path, text)))
    grid, bridge = root.getServiceNamed("grid"), root.getServiceNamed("bridge")
    for db in (grid.db, grid.broker_db, bridge.db):  # never started
        db.close()
    assert isinstance(bridge.target, LocalTarget) and bridge.target.grid is grid
    assert bridge.target.service == "broker.localhost"
    assert bridge.incident_name == "localhost"
    assert bridge.events is root.events
