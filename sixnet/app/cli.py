"""The sixnet command: administration of the suite (the services themselves run in twistd).

Exit status: 0 success; 1 the operation failed (the message says why); 2 a bad command line or
configuration file. Errors are one line on standard error, never a traceback. Every command
that prints results takes ``--json`` and then prints one JSON document on standard output.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from sixnet import __version__
from sixnet.app.config import SERVICES, load_config
from sixnet.chat import cli as chat_cli
from sixnet.core.cli import ArgumentParser, Output, add_common, config_of
from sixnet.core.errors import EXIT_USAGE, CommandError, ConfigError
from sixnet.grid import cli as grid_cli
from sixnet.irp import cli as irp_cli
from sixnet.pki import cli as pki_cli

#: The command groups, each adding its commands with ``register(commands)``.
COMMAND_GROUPS = (pki_cli, irp_cli, chat_cli, grid_cli)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="sixnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sixnet {__version__}")
    parser.set_defaults(load_config=load_config)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=ArgumentParser)
    check = commands.add_parser("check-config", help="validate the configuration file")
    add_common(check)
    check.set_defaults(run=run_check_config)
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser


def run_check_config(args: argparse.Namespace, out: Output) -> int:
    config = config_of(args)
    enabled = [n for n in SERVICES if config.service(n).enabled]
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
