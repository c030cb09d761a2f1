"""Errors for users: each says what is wrong and how to fix it, and carries the exit code.

Exit codes are stable and documented in README.md:
0 every image succeeded, 1 some images failed (or a check failed) and the rest completed,
2 usage or configuration error, 3 the run could not proceed (model, device or output failure).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3


class XaiError(Exception):
    """An error a user can act on. Only the CLI turns it into output and an exit code."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(XaiError):
    """The YAML config or a command-line override is invalid."""


class LayerError(ConfigError):
    """The target layer does not exist or cannot be used."""


class InputError(XaiError):
    """The input folder is missing or holds no images."""


class MethodError(XaiError):
    """A method cannot run on this model (e.g. CAM without a GAP + linear head)."""


class ModelError(XaiError):
    """The model, its weights or its checkpoint cannot be loaded."""

    exit_code = EXIT_RUNTIME


class OutputError(XaiError):
    """The output folder cannot be used."""


def suggest(value: str, choices: Iterable[str], n: int = 5) -> str:
    """A hint naming the closest valid choices, or all of them when they are few."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), choices, n=n, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(repr(c) for c in close) + "?"
    if len(choices) <= 20:
        return "valid choices: " + ", ".join(choices)
    return f"valid choices include: {', '.join(choices[:12])}, ... ({len(choices)} in all)"
