"""A registry of named entries (methods, metrics), filled by a decorator in the modules of a package.

The modules are found with :func:`pkgutil.iter_modules` and imported, in sorted order, at the first
lookup (not at import, which keeps ``xai --help`` cheap): a new module needs no list to be edited.
Modules whose name starts with ``_`` are skipped. A module that fails to import stops the lookup
with its error instead of hiding the entries it would register.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Generic, TypeVar

from .errors import ConfigError, suggest

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one ``kind`` ("method", "metric") by name, registered by the modules of ``package``.

    ``listed_by``: the command that lists the entries, named in the hint of an unknown name."""

    def __init__(self, kind: str, package: str, listed_by: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self.listed_by = listed_by
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._module: dict[str, str] = {}
        self._rank: dict[str, int] | None = None  # module -> position, once loaded

    def register(self, name: str, entry: T, aliases: tuple[str, ...] = (), module: str = "") -> None:
        """Add ``entry`` under ``name`` and its aliases; a name or alias taken already fails.
        ``module``: where the entry is defined, which orders :meth:`all`."""
        for n in (name, *aliases):
            if n in self._entries or n in self._aliases:
                raise RuntimeError(f"{self.kind} {n!r} registered twice")
        self._entries[name] = entry
        self._module[name] = module
        for a in aliases:
            self._aliases[a] = name

    def _load(self) -> None:
        if self._rank is not None:
            return
        modules = self.modules()
        # Set first: a module that looks an entry up while it is imported sees the table so far.
        self._rank = {m: i for i, m in enumerate(modules)}
        try:
            for mod in modules:
                try:
                    importlib.import_module(mod)
                except Exception as e:
                    raise ImportError(
                        f"{mod} cannot be imported, so the {self.kind}s it registers are missing: "
                        f"{type(e).__name__}: {e}"
                    ) from e
        except BaseException:
            self._rank = None  # the next lookup fails the same way, never on a partial table
            raise

    def modules(self) -> list[str]:
        """The package's modules, in sorted order, without those whose name starts with ``_``."""
        package = importlib.import_module(self.package)
        names = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
        return [f"{self.package}.{n}" for n in names if not n.startswith("_")]

    def _ordered(self, names: Iterable[str]) -> list[str]:
        """Entry names (or aliases) by their entry's module in sorted order, then as registered:
        the same order whichever module happened to be imported first. Others come last."""
        rank = self._rank or {}

        def position(n: str) -> int:
            return rank.get(self._module[self._aliases.get(n, n)], len(rank))

        return sorted(names, key=position)

    def all(self) -> list[T]:
        """Every entry, by module in sorted order, then in the order each module registers them."""
        self._load()
        return [self._entries[n] for n in self._ordered(self._entries)]

    def get(self, name: str, path: str) -> T:
        """The entry for ``name`` (case, surrounding blanks and ``-`` vs ``_`` do not matter) or
        an alias of it; else a ConfigError at the key ``path`` naming the close matches."""
        self._load()
        key = name.strip().lower().replace("-", "_")
        key = self._aliases.get(key, key)
        if key not in self._entries:
            hint = suggest(name, [*self._ordered(self._entries), *self._ordered(self._aliases)])
            if self.listed_by:
                hint += f" (`{self.listed_by}` lists them)"
            raise ConfigError(f"{path}: unknown {self.kind} {name!r}", hint)
        return self._entries[key]
