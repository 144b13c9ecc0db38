"""The configuration loader: every problem is one line naming the file, the key and the fault."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sixnet.app.config import load_config

from .support.configs import config_file, localhost_config, problem
from .support.pki import LabPKI


@pytest.fixture
def base(pki: LabPKI) -> str:
    return localhost_config(pki)


def test_example_config_is_valid_and_documents_every_key() -> None:
    config = load_config(Path(__file__).parent.parent / "etc" / "sixnet.toml", check_files=False)
    assert config.irp.enabled and config.chat.enabled and config.grid.enabled
    assert config.grid.broker.subdomain == "broker"


def test_defaults_and_relative_paths(tmp_path: Path, base: str) -> None:
    config = load_config(config_file(tmp_path, base))
    assert config.sixnet.state_dir == tmp_path.parent / "state"
    assert config.grid.listen == ["tcp6:5222:interface=\\:\\:"]
    assert not config.grid.enabled


@pytest.mark.parametrize("extra,expected", [
    ("[grid]\nlisten = 5222\n", "FILE: grid.listen: expected a list of strings, got integer 5222"),
    ('[grid]\nlisten = ["tcp:70000"]\n',
     "FILE: grid.listen: 'tcp:70000': port 70000 is out of range 0-65535"),
    ('[grid]\nlisten = ["bogus:1"]\n', "FILE: grid.listen: 'bogus:1' is not a server endpoint "
                                        "string (Unknown endpoint type: 'bogus')"),
    ("[sixnet]\nstate = 1\n", "FILE: sixnet.state: unknown key (known keys: log_format, "
                               "state_dir)"),
    ('[grid]\nenabled = "yes"\n', "FILE: grid.enabled: expected true or false, got string 'yes'"),
    ('[sixnet]\nlog_format = "xml"\n', "FILE: sixnet.log_format: 'xml' is not one of text, json"),
    ("[nonsense]\n", "FILE: nonsense: unknown section (known: sixnet, pki, irp, chat, grid, "
                     "bridge, metrics)"),
    ('[grid]\nenabled = true\nidentity = "nobody"\n',
     "FILE: grid.identity: no [pki.identities.nobody] table defines it"),
    ('[grid.broker]\nsubdomian = "b"\n', "FILE: grid.broker.subdomian: unknown key"),
    ('[grid]\ndatabase = "mysql://x"\n',
     "FILE: grid.database: 'mysql://x' is neither sqlite:PATH nor a postgresql:// URL"),
])
def test_one_line_problems(tmp_path: Path, base: str, extra: str, expected: str) -> None:
    assert problem(tmp_path, base + extra).startswith(expected)


def test_missing_certificate_file(tmp_path: Path, base: str) -> None:
    text = base.replace('certificate = "', 'certificate = "/nonexistent')
    message = problem(tmp_path, text)
    assert message.startswith("FILE: pki.identities.host.certificate: file /nonexistent")
    assert message.endswith("does not exist")


def test_missing_pki_and_bad_toml(tmp_path: Path) -> None:
    assert problem(tmp_path, "[grid]\n") == "FILE: pki: section is required but missing"
    assert problem(tmp_path, "[grid\n").startswith("FILE: is not valid TOML (")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_check_config_command_exact_output(tmp_path: Path, base: str) -> None:
    path = config_file(tmp_path, base + "[irp]\nlisten = [\"tcp:99999\"]\n")
    r = run(sys.executable, "-m", "sixnet", "check-config", "--config", str(path))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == f"sixnet: {path}: irp.listen: 'tcp:99999': port 99999 is out of range " \
                       "0-65535\n"
    good = config_file(tmp_path, base)
    r = run(sys.executable, "-m", "sixnet", "check-config", "--config", str(good), "--json")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f'{{"config": "{good}", "enabled": []}}\n'


def test_twistd_refuses_bad_config_with_one_line(tmp_path: Path, base: str) -> None:
    path = config_file(tmp_path, base + "[sixnet]\nport = 5222\n")
    twistd = Path(sys.executable).parent / "twistd"
    r = run(str(twistd), "--nodaemon", "--pidfile=", "sixnet", "--config", str(path))
    assert r.returncode == 2
    assert r.stderr == (f"sixnet: {path}: sixnet.port: unknown key (known keys: log_format, "
                        "state_dir)\n")
    r = run(str(twistd), "--nodaemon", "--pidfile=", "sixnet", "--config", "/nonexistent.toml")
    assert (r.returncode, r.stderr) == (2, "sixnet: /nonexistent.toml: configuration file does "
                                           "not exist\n")
    r = run(str(twistd), "--nodaemon", "--pidfile=", "sixnet", "--log-format", "xml")
    assert (r.returncode, r.stderr) == (2, "sixnet: --log-format: 'xml' is not one of text, "
                                           "json\n")
