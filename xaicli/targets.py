"""Per-image targets: the class each image's map explains, when it is not the same rule for every
image (config ``target:`` / ``xai explain --target``).

* ``FILE.csv``: a header row with the columns ``path`` and ``target`` (others are ignored), one row
  per image; ``FILE.json``: an object ``{"path": target, ...}``. ``path`` is the image's path
  relative to the input folder, with ``/``, as in scores.jsonl. ``target`` is a class index or a
  class name (case-insensitive). The file is read and every class checked once, at setup: a bad
  file is a usage error. An image the file does not list gets an error record (type ``target``),
  never a fallback to the prediction.
* ``folder``: the image's parent folder names its class (torchvision's ImageFolder layout,
  ``cats/chelsea.png`` -> ``cats``), by class name (case-insensitive) or index. An image whose
  folder is not a class gets an error record.

The run asks :meth:`ImageTargets.resolve` for each image before loading it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import TargetConfig
from .errors import ConfigError, suggest


def _key(path: str) -> str:
    p = path.strip().replace("\\", "/")
    return p[2:] if p.startswith("./") else p


@dataclass(frozen=True)
class ClassNames:
    """Class names and indices of a model: a name or index (as text or int) -> index, or why not."""

    labels: Sequence[str] | None
    n_classes: int

    def index(self, value: object) -> int | str:
        """The class index of ``value``, or an error message."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return f"expected a class index or name, got {value!r}"
        text = value.strip() if isinstance(value, str) else str(value)
        if text.isdigit():
            i = int(text)
            return i if i < self.n_classes else f"class index {i} out of range (the model has {self.n_classes} classes)"
        if self.labels is None:
            return f"class name {text!r} given but the model has no class names (set model.labels, or use indices)"
        found = {lab.lower(): i for i, lab in enumerate(self.labels)}.get(text.lower())
        return found if found is not None else f"unknown class name {text!r} ({suggest(text, self.labels)})"


@dataclass
class ImageTargets:
    """Where each image's class comes from (``file`` or ``folder``), resolved against the model."""

    source: str  # "file" | "folder"
    classes: ClassNames
    by_path: dict[str, int] = field(default_factory=dict)  # file: rel path -> class index
    origin: str = ""  # the file, for messages
    _folders: dict[str, int | str] = field(default_factory=dict)

    def resolve(self, rel: str, path: Path) -> int | str:
        """The class index of the image ``rel`` (at ``path`` on disk), or why it has none."""
        if self.source == "file":
            found = self.by_path.get(_key(rel))
            return found if found is not None else f"no target for {rel} in {self.origin}"
        folder = path.parent.name
        if folder not in self._folders:
            found = self.classes.index(folder)
            self._folders[folder] = found if isinstance(found, int) else f"folder {folder!r}: {found}"
        return self._folders[folder]


def load_image_targets(target: TargetConfig, labels: Sequence[str] | None, n_classes: int) -> ImageTargets | None:
    """The per-image targets of a ``file`` or ``folder`` target (None for the other modes)."""
    classes = ClassNames(labels, n_classes)
    if target.mode == "folder":
        return ImageTargets("folder", classes)
    if target.mode != "file":
        return None
    assert target.file is not None
    raw = _read_file(Path(target.file).expanduser(), target.file)
    by_path: dict[str, int] = {}
    problems = []
    for rel, value in raw.items():
        found = classes.index(value)
        if isinstance(found, int):
            by_path[rel] = found
        else:
            problems.append(f"{rel}: {found}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError(f"target: {target.file}: " + "; ".join(problems[:3]) + more,
                          "targets are class indices or the model's class names")
    return ImageTargets("file", classes, by_path, origin=target.file)


def _read_file(path: Path, name: str) -> dict[str, object]:
    """rel path -> target as written, from a CSV (header path,target) or a JSON object."""
    if not path.is_file():
        raise ConfigError(f"target: file not found: {name}", "give a CSV (path,target) or JSON ({path: target}) file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"target: cannot read {name}: {e}") from None
    rows = _json_rows(text, name) if path.suffix.lower() == ".json" else _csv_rows(text, name)
    out: dict[str, object] = {}
    for rel, value in rows:
        key = _key(rel)
        if key in out and out[key] != value:
            raise ConfigError(f"target: {name}: {key} is listed twice with different targets "
                              f"({out[key]!r} and {value!r})")
        out[key] = value
    if not out:
        raise ConfigError(f"target: {name} lists no images")
    return out


def _json_rows(text: str, name: str) -> list[tuple[str, object]]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"target: {name}: not valid JSON: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"target: {name}: expected a JSON object {{path: target}}, got {type(data).__name__}")
    return [(str(k), v) for k, v in data.items()]


def _csv_rows(text: str, name: str) -> list[tuple[str, object]]:
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    if "path" not in header or "target" not in header:
        raise ConfigError(f"target: {name}: the first row must be a header with the columns path and target, "
                          f"got {','.join(header) or 'nothing'}", "e.g. path,target / cats/chelsea.png,285")
    ip, it = header.index("path"), header.index("target")
    rows = []
    for line, row in enumerate(reader, start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(ip, it):
            raise ConfigError(f"target: {name}: line {line}: expected {len(header)} columns, got {len(row)}")
        rows.append((row[ip], row[it].strip()))
    return rows
