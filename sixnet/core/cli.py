"""What every ``sixnet`` command group shares: one-line errors, --json output, --config.

The composition root (`sixnet.app.cli`) builds the parser and gives every command the loader
of the whole configuration file (``args.load_config``); a group reads it with `config_of`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from sixnet.core.config import DEFAULT_CONFIG
from sixnet.core.errors import EXIT_USAGE


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


def config_of(args: argparse.Namespace, *, check_files: bool = True) -> Any:
    """The whole configuration file, read by the loader the composition root put in `args`."""
    return args.load_config(args.config or DEFAULT_CONFIG, check_files=check_files)


class CommandGroup:
    """``sixnet NAME COMMAND ...``: every command gets ``--config``, ``--json`` (unless told
    otherwise) and the options the whole group shares."""

    def __init__(self, commands: Any, name: str, help_text: str,
                 options: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
        self.parser = commands.add_parser(name, help=help_text, description=help_text)
        self._commands = self.parser.add_subparsers(
            dest=f"{name}_command", metavar="COMMAND", required=True,
            parser_class=type(self.parser))
        self._options = options

    def command(self, name: str, run: Callable[[argparse.Namespace, Output], Any],
                help_text: str, *, json_output: bool = True) -> argparse.ArgumentParser:
        parser = self._commands.add_parser(name, help=help_text, description=help_text)
        add_common(parser, json_output=json_output)
        if self._options is not None:
            self._options(parser)
        parser.set_defaults(run=run)
        return parser

    def group(self, name: str, help_text: str,
              options: Callable[[argparse.ArgumentParser], None] | None = None) -> CommandGroup:
        """A group inside this one (``sixnet grid user add``)."""
        return CommandGroup(self._commands, name, help_text, options)
