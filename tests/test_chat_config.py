"""The [chat] section: every key checked, one line per problem; building the service."""

from __future__ import annotations

from pathlib import Path

import pytest

from sixnet.app.config import load_config
from sixnet.chat.service import make_service
from sixnet.core.errors import ConfigError
from sixnet.pki.store import store_from_config

from .support.chat import SharedDirectory
from .support.configs import config_file, problem
from .support.pki import LabPKI

BASE = """\
[sixnet]
state_dir = "{state}"
[pki]
trust_anchors = ["{ca}"]
crls = ["{crl}"]
[pki.identities.user]
subject = "alice@example.test"
certificate = "{ucert}"
key = "{ukey}"
[pki.identities.host]
subject = "localhost"
certificate = "{hcert}"
key = "{hkey}"
[chat]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
"""


@pytest.fixture
def base(pki: LabPKI, tmp_path: Path) -> str:
    pki.identity("user", "alice@example.test")
    pki.identity("host", "localhost")
    issued = pki.directory / "issued" / pki.root.directory.name
    user = issued / "user" / "alice@example.test" / "ecdsa-p256"
    host = issued / "host" / "localhost" / "ecdsa-p256"
    return BASE.format(state=tmp_path / "state", ca=pki.root.directory / "ca.pem",
                       crl=pki.root.directory / "crl.pem", ucert=user / "cert.pem",
                       ukey=user / "key.pem", hcert=host / "cert.pem", hkey=host / "key.pem")


@pytest.mark.parametrize("line,message", [
    ('key_agreement = ["dh"]', "chat.key_agreement: 'dh' is not one of x25519, rsa-oaep"),
    ("key_agreement = []", "chat.key_agreement: must name at least one of x25519, rsa-oaep"),
    ('ciphers = ["aes-256-gcm", "aes-256-gcm"]', "chat.ciphers: names a method twice"),
    ('advertise = ["nohost"]', "chat.advertise: 'nohost' is not host:port or [address]:port"),
    ('advertise = ["::1:4605"]', "chat.advertise: '::1:4605': an IPv6 address must be in "
                                 "brackets"),
    ('advertise = ["chat.example.test:4605"]', "chat.advertise: 'chat.example.test:4605': IRP "
                                               "registers IP addresses, not host names"),
    ('irp_server = "registry"', "chat.irp_server: 'registry' is not host:port or "
                                "[address]:port"),
    ('advertise = ["192.0.2.1:\u0664\u0666\u0660\u0665"]', "chat.advertise: "
     "'192.0.2.1:\u0664\u0666\u0660\u0665': the port must be 1-65535 in ASCII digits"),
    ('irp_server = "[2001:db8::1]:\u00b2"', "chat.irp_server: '[2001:db8::1]:\u00b2': the "
                                           "port must be 1-65535 in ASCII digits"),
    ('irp_server = "registry:70000"', "chat.irp_server: 'registry:70000': the port must be "
                                      "1-65535 in ASCII digits"),
    ("handshake_timeout = 0", "chat.handshake_timeout: 0.0 must be greater than 0"),
    ("max_message_bytes = 0", "chat.max_message_bytes: 0 is out of range 1-1048576"),
    ("retry_max = \"soon\"", "chat.retry_max: expected a number, got string 'soon'"),
    ("max_handshakes = 0", "chat.max_handshakes: 0 is out of range 1-100000"),
    ('allow = ["bob@"]', "chat.allow: 'bob@' is neither a person (name@domain) nor a domain"),
    ('deny = ["example.test", "nodot"]', "chat.deny: 'nodot' is neither a person "
                                         "(name@domain) nor a domain"),
])
def test_bad_values_are_one_line(base: str, tmp_path: Path, line: str, message: str) -> None:
    assert problem(tmp_path, base + line + "\n") == f"FILE: {message}"


def test_every_key_documented_in_the_shipped_file() -> None:
    from dataclasses import fields

    from sixnet.chat.config import ChatConfig

    text = (Path(__file__).parent.parent / "etc" / "sixnet.toml").read_text()
    section = text.split("[chat]", 1)[1].split("\n[", 1)[0]
    for f in fields(ChatConfig):
        assert f"\n{f.name} = " in section, f.name


def test_make_service_from_the_file(base: str, tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, base))
    store = store_from_config(config)
    shared = SharedDirectory(lambda: 0.0)
    service = make_service(config, store, directory=shared.for_person("alice@example.test"))
    service.db.close()  # never started: closing cancels the pool's pending start
    assert service.agent.me == "alice@example.test"
    assert service.control_path == tmp_path / "state" / "chat" / "control.sock"
    config = load_config(config_file(tmp_path, base + 'identity = "host"\n'))
    with pytest.raises(ConfigError) as info:
        make_service(config, store_from_config(config),
                     directory=shared.for_person("x@example.test"))
    assert str(info.value).endswith("chat.identity: identity 'host' must name exactly one "
                                    "person")


def test_command_line_errors_are_one_line_with_status_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    def sixnet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sixnet", "chat", *args],
                              capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).parent.parent)

    r = sixnet("inbox", "--limit", "0", "--socket", str(tmp_path / "s"))
    assert (r.returncode, r.stderr) == (2, "sixnet: --limit must be 1-10000\n")
    r = sixnet("send", "bob@example.test")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "required: text" in r.stderr
    r = sixnet("peers", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2
    assert r.stderr == f"sixnet: {tmp_path / 'missing.toml'}: configuration file does not exist\n"


def test_registry_given_by_ip_needs_its_certificate_name(base: str, tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, base + 'irp_server = "127.0.0.1:4604"\n'))
    with pytest.raises(ConfigError) as info:
        make_service(config, store_from_config(config))
    assert str(info.value) == (f"{config.path}: chat.irp_server_name: must be set when "
                               "irp_server is an IP address: it is the host name the "
                               "registry's certificate is checked for")
    config = load_config(config_file(tmp_path, base + 'irp_server = "127.0.0.1:4604"\n'
                                                'irp_server_name = "irp.example.test"\n'))
    service = make_service(config, store_from_config(config))
    service.db.close()
    assert (service.directory.host, service.directory.server_name) == ("127.0.0.1",
                                                                        "irp.example.test")
