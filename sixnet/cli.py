"""The sixnet command: administration of the suite (the services themselves run in twistd).

Exit status: 0 success; 1 the operation failed (the message says why); 2 a bad command line or
configuration file. Errors are one line on standard error, never a traceback. Every command
that prints results takes ``--json`` and then prints one JSON document on standard output.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sixnet import __version__
from sixnet.config import DEFAULT_CONFIG, Config, load_config
from sixnet.errors import EXIT_USAGE, CommandError, ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class Output:
    """Prints a command's result for people, or as JSON for scripts."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def result(self, data: Any, text: str | Callable[[], str]) -> None:
        if self.as_json:
            print(json.dumps(data, indent=None, sort_keys=True))
        else:
            print(text() if callable(text) else text)


def add_common(parser: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    parser.add_argument("--config", "-c", type=Path, default=None,
                        help=f"configuration file (default: {DEFAULT_CONFIG})")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print results as JSON")


def config_of(args: argparse.Namespace, *, check_files: bool = True) -> Config:
    return load_config(args.config or DEFAULT_CONFIG, check_files=check_files)


#: Modules that add a command group with ``register(commands)``; a service's module appears
#: when that service is built.
COMMAND_MODULES = ("sixnet.pki.cli", "sixnet.irp.cli", "sixnet.chat.cli", "sixnet.grid.cli")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="sixnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sixnet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=ArgumentParser)
    check = commands.add_parser("check-config", help="validate the configuration file")
    add_common(check)
    check.set_defaults(run=run_check_config)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(commands)
    return parser


def run_check_config(args: argparse.Namespace, out: Output) -> int:
    config = config_of(args)
    enabled = [n for n in ("irp", "chat", "grid") if config.service(n).enabled]
    out.result({"config": str(config.path), "enabled": enabled},
               f"{config.path}: ok (enabled: {', '.join(enabled) or 'none'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(getattr(args, "json", False))
    try:
        return int(args.run(args, out) or 0)
    except ConfigError as e:
        print(f"sixnet: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as e:
        if out.as_json:
            print(json.dumps({"error": str(e)}))
        print(f"sixnet: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
