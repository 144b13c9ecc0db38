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


class ConditionError(Exception):
    """A protocol error with a defined condition name and a text for people.

    Each protocol's error class sets `conditions`, the names its specification defines; a
    condition outside them is a programming error, caught where it is raised.
    """

    conditions: frozenset[str] = frozenset()

    def __init__(self, condition: str, text: str = "") -> None:
        if condition not in self.conditions:
            raise ValueError(f"{type(self).__name__}: {condition!r} is not a defined condition")
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text
