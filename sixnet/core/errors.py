"""Errors meant for people: each prints as one line, and the command exits with status 2."""

from __future__ import annotations

#: Exit status for a bad configuration file or command line.
EXIT_USAGE = 2
#: Exit status when a command's operation failed (the target refused, a file is missing...).
EXIT_FAILED = 1


class ConfigError(Exception):
    """A configuration file problem: which file, which key, what is wrong."""

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + problem)


class CommandError(Exception):
    """A command could not do what was asked; the message is the whole explanation."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status
