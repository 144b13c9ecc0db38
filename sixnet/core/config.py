"""The configuration file: one frozen dataclass per section, validated in one place.

A section class declares its keys as dataclass fields; the field's type says what the TOML
value must be, its default makes it optional, and ``metadata`` may add a ``check`` (a function
returning a problem or None), ``must_exist`` for files, and ``doc``. Paths are relative to the
directory of the configuration file. Every problem is reported as one `ConfigError` line naming
the file, the key and what is wrong.

This module knows the process-wide sections (``[sixnet]``, ``[pki]`` and ``[metrics]``) and
how to read any section; the aggregate of every service's section lives in the composition root
(`sixnet.app.config`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sixnet.core.errors import ConfigError
from sixnet.core.settings import endpoint_check, one_of, positive, setting

DEFAULT_CONFIG = Path("etc/sixnet.toml")


# -- sections --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoreConfig:
    """``[sixnet]``: process-wide settings."""

    state_dir: Path = setting(Path("../state"), doc="where databases and generated keys live")
    log_format: str = setting("text", check=one_of("text", "json"))


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint (``GET /metrics``), off by default.

    It has no authentication: it listens on loopback unless told otherwise.
    """

    enabled: bool = setting(False)
    listen: str = setting("tcp:9464:interface=127.0.0.1", check=endpoint_check,
                          doc="a twistd server endpoint string")


@dataclass(frozen=True)
class IdentityConfig:
    """``[pki.identities.NAME]``: one of this node's certificates and its key."""

    subject: str = setting(doc="the host name or user id the certificate is for")
    certificate: Path = setting(must_exist=True)
    key: Path = setting(must_exist=True)
    key_type: str = setting("ecdsa-p256", check=one_of(
        "ecdsa-p256", "ecdsa-p384", "ed25519", "rsa2048", "rsa3072", "rsa4096"))


@dataclass(frozen=True)
class PKIConfig:
    """``[pki]``: the shared certificate store and the lab CA."""

    trust_anchors: list[Path] = setting(must_exist=True)
    crls: list[Path] = setting([], must_exist=True)
    lab_ca: Path | None = setting(None, doc="directory of a lab CA (sixnet pki init)")
    crl_refresh: float = setting(60.0, check=positive,
                                 doc="seconds between checks of the CRL files for changes")
    identities: dict[str, IdentityConfig] = setting({})


class Settings(Protocol):
    """What every service reads of the whole file besides its own section.

    A service declares its own protocol on top of this one (adding its section), so that it
    can be handed the aggregate without importing the composition root that defines it.
    """

    @property
    def path(self) -> Path: ...

    @property
    def sixnet(self) -> CoreConfig: ...

    @property
    def pki(self) -> PKIConfig: ...


# -- loading ---------------------------------------------------------------------------------

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               Path: "a path (string)"}


class _Loader:
    def __init__(self, path: Path, check_files: bool) -> None:
        self.path = path
        self.base = path.parent
        self.check_files = check_files

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(str(self.path), key, problem)

    def section(self, cls: type, data: Any, where: str) -> Any:
        if not isinstance(data, dict):
            raise self.fail(where, "must be a table")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        renamed = getattr(cls, "RENAMED", {})
        for name in data:
            if name in renamed:
                raise self.fail(f"{where}.{name}", f"renamed: the key is now {renamed[name]}")
            if name not in fields:
                known = ", ".join(sorted(fields))
                raise self.fail(f"{where}.{name}", f"unknown key (known keys: {known})")
        values = {}
        for name, f in fields.items():
            dotted = f"{where}.{name}"
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise self.fail(dotted, "is required but missing")
                default = f.default if f.default is not dataclasses.MISSING else \
                    f.default_factory()  # type: ignore[misc]
                values[name] = self.resolve(hints[name], default, f, dotted, check=False)
                continue
            values[name] = self.resolve(hints[name], data[name], f, dotted, check=True)
        return cls(**values)

    def resolve(self, hint: Any, value: Any, f: dataclasses.Field, dotted: str,
                *, check: bool) -> Any:
        origin = typing.get_origin(hint)
        if origin in (types.UnionType, typing.Union):
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            if value is None:
                return None
            return self.resolve(inner[0], value, f, dotted, check=check)
        if origin is list:
            (item,) = typing.get_args(hint)
            if not isinstance(value, list):
                raise self.fail(dotted, f"expected a list of {_TYPE_NAMES[item][2:]}s, "
                                        f"got {_describe(value)}")
            result = [self.scalar(item, v, f, f"{dotted}[{i}]") for i, v in enumerate(value)]
        elif origin is dict:
            _, item = typing.get_args(hint)
            if not isinstance(value, dict):
                raise self.fail(dotted, f"expected a table, got {_describe(value)}")
            result = {k: self.section(item, v, f"{dotted}.{k}") for k, v in value.items()}
        elif dataclasses.is_dataclass(hint):
            if not check:  # the default: an instance already
                return value
            result = self.section(hint, value, dotted)
        else:
            result = self.scalar(hint, value, f, dotted)
        checker = f.metadata.get("check")
        if check and checker is not None:
            problem = checker(result)
            if problem:
                raise self.fail(dotted, problem)
        return result

    def scalar(self, hint: Any, value: Any, f: dataclasses.Field, dotted: str) -> Any:
        ok = isinstance(value, hint if hint is not Path else str | Path)
        if hint is int and isinstance(value, bool):
            ok = False
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.fail(dotted, f"expected {_TYPE_NAMES[hint]}, got {_describe(value)}")
        if hint is Path:
            resolved = value if isinstance(value, Path) else Path(value)
            if not resolved.is_absolute():
                resolved = Path(os.path.normpath(self.base / resolved))
            if f.metadata.get("must_exist") and self.check_files and not resolved.exists():
                raise self.fail(dotted, f"file {resolved} does not exist")
            return resolved
        return value


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def read_sections(path: Path, sections: dict[str, type], *,
                  check_files: bool = True) -> dict[str, Any]:
    """Read and validate a configuration file into one instance per section class.

    Raises ConfigError with one clear line. ``[pki]`` is required.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), None, "configuration file does not exist") from None
    except OSError as e:
        raise ConfigError(str(path), None, f"cannot be read ({e.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), None, f"is not valid TOML ({e})") from None
    loader = _Loader(path, check_files)
    for name in data:
        if name not in sections:
            raise loader.fail(name, f"unknown section (known: {', '.join(sections)})")
    if "pki" not in data:
        raise loader.fail("pki", "section is required but missing")
    return {name: loader.section(cls, data.get(name, {}), name)
            for name, cls in sections.items()}
