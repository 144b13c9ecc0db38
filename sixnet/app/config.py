"""The whole configuration file: every section, the only place that knows all services."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

from sixnet.bridge.config import BridgeConfig
from sixnet.chat.config import ChatConfig
from sixnet.core.config import (
    DEFAULT_CONFIG,
    CoreConfig,
    MetricsConfig,
    PKIConfig,
    read_sections,
)
from sixnet.core.errors import ConfigError
from sixnet.core.settings import ServiceConfig
from sixnet.grid.config import GridConfig
from sixnet.irp.config import IRPConfig

__all__ = ["DEFAULT_CONFIG", "SECTIONS", "SERVICES", "Config", "load_config"]


@dataclass(frozen=True)
class Config:
    """The whole file."""

    path: Path
    sixnet: CoreConfig
    pki: PKIConfig
    irp: IRPConfig
    chat: ChatConfig
    grid: GridConfig
    bridge: BridgeConfig
    metrics: MetricsConfig

    def service(self, name: str) -> ServiceConfig:
        return typing.cast(ServiceConfig, getattr(self, name))


SECTIONS: dict[str, type] = {
    "sixnet": CoreConfig,
    "pki": PKIConfig,
    "irp": IRPConfig,
    "chat": ChatConfig,
    "grid": GridConfig,
    "bridge": BridgeConfig,
    "metrics": MetricsConfig,
}
#: In the order they are built: a service comes after those it is handed (`root.NEEDS`).
SERVICES = ("irp", "chat", "grid", "bridge")


def load_config(path: Path = DEFAULT_CONFIG, *, check_files: bool = True) -> Config:
    """Read and validate a configuration file; raise ConfigError with one clear line."""
    config = Config(path=path, **read_sections(path, SECTIONS, check_files=check_files))
    for name in SERVICES:
        service = config.service(name)
        if service.enabled and service.identity not in config.pki.identities:
            raise ConfigError(str(path), f"{name}.identity",
                              f"no [pki.identities.{service.identity}] table defines it")
    problem = config.grid.problem() if config.grid.enabled else None
    if problem is not None:
        raise ConfigError(str(path), *problem)
    problem = config.bridge.problem(config.pki.identities, config.grid.enabled)
    if problem is not None:
        raise ConfigError(str(path), *problem)
    return config
