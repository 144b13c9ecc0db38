"""Configuration files for tests and benchmarks: written as an operator writes them, then
loaded by the real loader.

`sixnet_toml` builds the text from Python values (paths, numbers, lists, nested tables), so a
test says only the keys it is about; `problem` is the one line the loader reports for a bad
file, with the file's path as ``FILE``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sixnet.app.config import load_config
from sixnet.core.errors import ConfigError

from .pki import IdentityFiles, LabPKI


def toml_value(value: Any) -> str:
    """A TOML value: JSON's strings, numbers, booleans and arrays are TOML's too."""
    return json.dumps(value, default=str)


def toml_text(document: Mapping[str, Mapping[str, Any]]) -> str:
    """Tables in the order given; a nested mapping is a sub-table (``[grid.broker]``)."""
    lines: list[str] = []

    def table(name: str, body: Mapping[str, Any]) -> None:
        keys = [k for k, v in body.items() if not isinstance(v, Mapping)]
        if keys:
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {toml_value(body[k])}" for k in keys)
        for key, value in body.items():
            if isinstance(value, Mapping):
                table(f"{name}.{key}", value)

    for name, body in document.items():
        table(name, body)
    return "\n".join(lines) + "\n"


def sixnet_toml(ca: Path, identities: Mapping[str, IdentityFiles], *, lab_ca: bool = False,
                **sections: Mapping[str, Any]) -> str:
    """A whole ``sixnet.toml``: [sixnet] if given, [pki] trusting the lab CA in directory `ca`
    (its ``ca.pem`` and ``crl.pem``; ``lab_ca`` names the directory too), one
    ``[pki.identities.NAME]`` per identity, then the other sections as given."""
    pki: dict[str, Any] = {"trust_anchors": [ca / "ca.pem"], "crls": [ca / "crl.pem"]}
    if lab_ca:
        pki["lab_ca"] = ca
    pki["identities"] = {
        name: {"subject": files.subject, "certificate": files.certificate, "key": files.key}
        for name, files in identities.items()}
    document: dict[str, Mapping[str, Any]] = {}
    if "sixnet" in sections:
        document["sixnet"] = sections.pop("sixnet")
    document["pki"] = pki
    document.update(sections)
    return toml_text(document)


def config_file(directory: Path, text: str) -> Path:
    """``sixnet.toml`` in `directory` (made if missing) with `text`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sixnet.toml"
    path.write_text(text)
    return path


def problem(directory: Path, text: str) -> str:
    """The loader's one-line complaint about a config with `text`, its path as ``FILE``."""
    path = config_file(directory, text)
    try:
        load_config(path)
    except ConfigError as e:
        return str(e).replace(str(path), "FILE")
    raise AssertionError(f"the loader accepted:\n{text}")


def localhost_config(pki: LabPKI, **sections: Mapping[str, Any]) -> str:
    """`sixnet_toml` trusting the lab root CA, with the host identity ``localhost``."""
    return sixnet_toml(pki.root.directory, {"host": pki.files("host", "localhost")}, **sections)
