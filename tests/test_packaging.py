"""The twistd plugins are found after the usual installs: ``pip install -e .`` and a wheel.

Each case makes a fresh virtual environment that borrows this environment's third-party
packages (Twisted, hatchling) through a path file, but not sixnet: sixnet gets there only
by the install under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def fresh_environment(where: Path) -> Path:
    """A virtual environment without pip whose interpreter can import our dependencies."""
    venv.create(where, with_pip=False)
    python = where / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # A plain directory line: the borrowed directory's own .pth files (our editable
    # install among them) are not processed, so sixnet itself is not borrowed.
    (Path(site) / "borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([python, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def pip(python: Path, *args: str, cwd: Path) -> None:
    r = run(python, "-m", "pip", "--disable-pip-version-check", "-q", *args, cwd=cwd)
    assert r.returncode == 0, r.stderr


def assert_plugins_found(python: Path, cwd: Path) -> None:
    listing = run(python, "-c", TWISTD, "--help", cwd=cwd)
    for name in ("sixnet ", "sixnet-irp", "sixnet-chat", "sixnet-grid"):
        assert name in listing.stdout, listing.stdout + listing.stderr
    plugin = run(python, "-c", TWISTD, "sixnet", "--help", cwd=cwd)
    assert plugin.returncode == 0, plugin.stderr
    assert "--config" in plugin.stdout


@pytest.fixture
def python(tmp_path: Path) -> Path:
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs to run from a virtual environment (./dev.sh test makes one)")
    return fresh_environment(tmp_path / "venv")


def test_plugins_found_after_an_editable_install(python: Path, tmp_path: Path) -> None:
    assert run(python, "-c", "import sixnet", cwd=tmp_path).returncode != 0  # not borrowed
    pip(python, "install", "--no-deps", "--no-build-isolation", "-e", str(REPO), cwd=tmp_path)
    assert_plugins_found(python, tmp_path)


def test_plugins_and_schemas_in_the_wheel(python: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    pip(python, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO),
        cwd=tmp_path)
    (wheel,) = dist.glob("sixnet-*.whl")
    pip(python, "install", "--no-deps", str(wheel), cwd=tmp_path)
    assert_plugins_found(python, tmp_path)
    schemas = run(python, "-c", "import sixnet.core.iodef, pathlib; print(pathlib.Path("
                  "sixnet.core.iodef.__file__).parent / 'schemas' / 'iodef-2.0.xsd')",
                  cwd=tmp_path)
    assert Path(schemas.stdout.strip()).is_file(), schemas.stderr
