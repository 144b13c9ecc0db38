"""twistd plugins: ``sixnet`` (every enabled service) and ``sixnet-irp|chat|grid`` (one each).

Options are checked while twistd parses the command line, so a bad configuration stops the
process before it daemonizes, with one line on standard error and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from sixnet.app.config import DEFAULT_CONFIG, Config, load_config
from sixnet.app.root import make_root
from sixnet.core.errors import EXIT_USAGE, ConfigError
from sixnet.core.logs import LOG_FORMATS
from sixnet.core.runtime import settle_heap

log = Logger(namespace="sixnet")


def fail(message: str) -> None:
    print(f"sixnet: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


class Options(usage.Options):
    """Options of the ``sixnet`` plugin; the single-service plugins subclass it."""

    service: str | None = None
    optParameters = [
        ["config", "c", str(DEFAULT_CONFIG), "configuration file"],
        ["log-format", None, None, "text or json (default: [sixnet] log_format)"],
    ]

    def postOptions(self) -> None:
        if self["log-format"] is not None and self["log-format"] not in LOG_FORMATS:
            fail(f"--log-format: {self['log-format']!r} is not one of text, json")
        try:
            self.loaded: Config = load_config(Path(self["config"]))
            self.root = make_root(self.loaded, self.service)
        except ConfigError as e:
            fail(str(e))
        log_format = self["log-format"] or self.loaded.sixnet.log_format
        if log_format == "json" and self.parent is not None:
            # twistd resolves this name once this subcommand has been parsed
            self.parent["logger"] = "sixnet.core.logs.json_observer"


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    reactor.callWhenRunning(settle_heap)
    return options.root
