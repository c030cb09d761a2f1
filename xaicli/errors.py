"""Errors for users: each says what is wrong and how to fix it, and carries the exit code.

Exit codes are stable and documented in README.md:
0 every image succeeded, 1 some images failed (or a check failed) and the rest completed,
2 usage or configuration error, 3 the run could not proceed (model, device or output failure).
"""

from __future__ import annotations

import difflib
import reprlib
import unicodedata
from collections.abc import Iterable
from typing import Any

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
    """The output folder cannot be used (another run holds it, it is not a folder, no permission)."""


class StorageError(XaiError):
    """The output cannot be written: disk full, read-only file system, I/O error."""

    exit_code = EXIT_RUNTIME


_QUOTE = reprlib.Repr()
_QUOTE.maxstring = 80
_QUOTE.maxother = 80
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 6
_QUOTE.maxlevel = 3
QUOTE_LIMIT = 200  # characters of a value shown in a message


def quote(value: Any) -> str:
    """``repr(value)`` bounded in size, for error messages: a huge or deeply nested value (a YAML
    alias bomb) is shown by its beginning, never expanded whole."""
    text = _QUOTE.repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


def suggest(value: str, choices: Iterable[str], n: int = 5) -> str:
    """A hint naming the closest valid choices, or all of them when they are few."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), choices, n=n, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(repr(c) for c in close) + "?"
    if len(choices) <= 20:
        return "valid choices: " + ", ".join(choices)
    return f"valid choices include: {', '.join(choices[:12])}, ... ({len(choices)} in all)"


def printable(text: str) -> str:
    """User-supplied text (a file name, a value from a config) made safe to show on a terminal:
    control and format characters, and the undecodable bytes of a non-UTF-8 name (Python keeps
    them as lone surrogates), become visible escapes such as ``\\x1b`` or ``\\xff``. Line
    breaks and tabs stay. Rich markup is escaped separately (the CLI prints these as plain text)."""
    out = []
    for ch in str(text):
        o = ord(ch)
        if ch in "\n\t":
            out.append(ch)
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)
