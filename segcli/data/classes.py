"""The class mapping: how raw mask values become class indices.

Decided once per dataset (never per split) and stored in the checkpoint, so evaluation and
prediction use exactly the classes training saw. Four kinds:

- ``index``: single-channel masks holding class indices 0..C-1 (255 = ignore). A class table
  may give each class an explicit raw ``value`` (e.g. masks stored as 0/128/255). Other raw
  values may be ignored too (``ignore_values``: CamVid's void 11; ``reduce_zero_label``: ADE20K's
  0 = other, with raw k read as class k-1).
- ``binary``: masks holding two values (0/255 by default); class 1 is the foreground value
  (255 unless ``foreground_value`` says otherwise, e.g. 0 for ISBI membranes).
- ``palette``: indexed (palette) PNGs; the indices are the classes, the palette gives colours.
- ``rgb``: colour masks; each class has a colour in the class table.

Class tables (``classes.json`` in the dataset root, or ``--classes-file``) may be:

- JSON: ``{"classes": [{"name": "road", "color": [128, 64, 128], "value": 0}, ...],
  "ignore_color": [0, 0, 0], "ignore_values": [11]}`` (or just the list); ``color`` is needed
  for RGB masks, ``value`` defaults to the class's position; a list of plain names also works;
  an entry with ``"ignore": true`` (e.g. ``{"name": "void", "value": 11, "ignore": true}``)
  marks a raw value or colour as ignored instead of making a class;
- CSV with a header naming ``value`` and/or ``name`` and optionally ``r,g,b`` and ``ignore``
  columns (a row with ignore = 1/true/yes is an ignored value, not a class);
- text: one class name per line (labelme's ``class_names.txt``; ``__ignore__`` lines skipped).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segcli.errors import UsageError

KINDS = ("index", "binary", "palette", "rgb")
IGNORE_INDEX = 255
# Table file names looked for in a dataset root, in order.
CLASS_TABLE_NAMES = ("classes.json", "classes.csv", "class_names.txt", "classes.txt")

Color = tuple[int, int, int]


def default_palette(num_classes: int) -> list[Color]:
    """The PASCAL VOC colour map: distinct colours for any class count, background black."""
    colors: list[Color] = []
    for index in range(num_classes):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colors.append((r, g, b))
    return colors


@dataclass
class ClassMapping:
    """How raw mask values map to class indices; JSON-able for checkpoint metadata."""

    kind: str
    names: list[str]
    palette: list[Color] = field(default_factory=list)
    # Raw mask value of each class (index/binary/palette kinds); None means class i is value i.
    values: list[int] | None = None
    ignore_index: int = IGNORE_INDEX
    # RGB masks: colours that mean "ignore" rather than a class.
    ignore_colors: list[Color] = field(default_factory=list)
    foreground_value: int | None = None
    # Raw values that mean "ignore" besides `ignore_index` (CamVid's void 11, a dataset's 0).
    ignore_values: list[int] = field(default_factory=list)
    # Values of no class are ignored instead of refused: formats whose masks hold more ids
    # than they train on (Cityscapes' 34 label ids for 19 classes).
    ignore_unlisted: bool = False
    # ADE20K's convention: raw 0 is "other" (ignored) and raw k is class k-1; predictions are
    # written back as raw values (class + 1).
    reduce_zero_label: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"unknown mask kind '{self.kind}'; valid: {', '.join(KINDS)}")
        if not self.names:
            raise UsageError("a class mapping needs at least one class")
        self.palette = [tuple(int(c) for c in color) for color in self.palette]  # type: ignore[misc]
        if len(self.palette) < len(self.names):
            extra = default_palette(len(self.names))[len(self.palette) :]
            self.palette = [*self.palette, *extra]
        self.palette = self.palette[: len(self.names)]
        self.ignore_colors = [tuple(int(c) for c in color) for color in self.ignore_colors]  # type: ignore[misc]
        self.ignore_values = sorted({int(value) for value in self.ignore_values})
        clash = set(self.ignore_values) & set(self.raw_values())
        if clash and self.kind != "rgb":
            value = min(clash)
            name = self.names[self.raw_values().index(value)]
            raise UsageError(
                f"value {value} is both class '{name}' and ignored; drop it from "
                "`ignore_values` or from the class table"
            )
        self._lut_cache: dict[int, np.ndarray] = {}

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def raw_values(self) -> list[int]:
        """The raw mask value of each class."""
        return list(self.values) if self.values is not None else list(range(self.num_classes))

    def describe(self) -> str:
        """One line for logs: kind, classes, and raw values read as ignore besides 255."""
        ignored = [str(value) for value in self.ignore_values]
        if self.ignore_unlisted:
            ignored.append("any value of no class")
        note = f"; also ignored: {', '.join(ignored)}" if ignored else ""
        if self.reduce_zero_label:
            note += "; raw k is class k-1 (reduce-zero-label)"
        return f"{self.kind} masks, {self.num_classes} classes: {', '.join(self.names)}{note}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "names": list(self.names),
            "palette": [list(color) for color in self.palette],
            "values": None if self.values is None else list(self.values),
            "ignore_index": self.ignore_index,
            "ignore_colors": [list(color) for color in self.ignore_colors],
            "foreground_value": self.foreground_value,
            "ignore_values": list(self.ignore_values),
            "ignore_unlisted": self.ignore_unlisted,
            "reduce_zero_label": self.reduce_zero_label,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassMapping:
        return cls(
            kind=data["kind"],
            names=list(data["names"]),
            palette=[tuple(color) for color in data.get("palette", [])],
            values=None if data.get("values") is None else [int(v) for v in data["values"]],
            ignore_index=int(data.get("ignore_index", IGNORE_INDEX)),
            ignore_colors=[tuple(color) for color in data.get("ignore_colors", [])],
            foreground_value=data.get("foreground_value"),
            ignore_values=[int(v) for v in data.get("ignore_values", [])],
            ignore_unlisted=bool(data.get("ignore_unlisted", False)),
            reduce_zero_label=bool(data.get("reduce_zero_label", False)),
        )

    def _lut(self, size: int) -> np.ndarray:
        """Raw value -> class lookup table; -1 marks values that map to no class."""
        if size not in self._lut_cache:
            lut = np.full(size, -1, dtype=np.int64)
            if self.kind != "binary" and self.ignore_index < size:
                lut[self.ignore_index] = self.ignore_index
            for value in self.ignore_values:
                if 0 <= value < size:
                    lut[value] = self.ignore_index
            for index, value in enumerate(self.raw_values()):
                if 0 <= value < size:
                    lut[value] = index
            if self.ignore_unlisted:
                lut[lut < 0] = self.ignore_index
            self._lut_cache[size] = lut
        return self._lut_cache[size]

    def encode(self, mask: np.ndarray, source: str | Path = "mask") -> np.ndarray:
        """Map a raw mask (H×W values or H×W×3 colours) to an int64 H×W class-index array, with
        `ignore_index` for ignored pixels. Raises UsageError naming `source` and the first value
        that maps to no class."""
        if self.kind == "rgb":
            return self._encode_rgb(mask, source)
        if mask.ndim == 3:
            if not (mask == mask[:, :, :1]).all():
                raise UsageError(
                    f"{source}: is a colour mask but the dataset's masks are {self.kind} masks; "
                    "save it as a single-channel mask"
                )
            mask = mask[:, :, 0]  # a gray mask saved as RGB
        if mask.dtype.kind == "b":
            mask = mask.astype(np.uint8) * 255
        if mask.dtype.kind not in "ui":
            raise UsageError(f"{source}: mask has {mask.dtype} values; masks must hold integers")
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 65535):
            bad = int(mask.min()) if int(mask.min()) < 0 else int(mask.max())
            raise self._no_class(source, bad)
        lut = self._lut(256 if mask.dtype == np.uint8 else 65536)
        encoded = lut[mask]
        if (encoded < 0).any():
            raise self._no_class(source, int(mask[encoded < 0][0]))
        return encoded

    def _encode_rgb(self, mask: np.ndarray, source: str | Path) -> np.ndarray:
        if mask.ndim != 3:
            raise UsageError(
                f"{source}: is a single-channel mask but the class table maps colours; "
                "save it as an RGB colour mask or use a table without colours"
            )
        rgb = mask[:, :, :3].astype(np.int64)
        keys = (rgb[:, :, 0] << 16) | (rgb[:, :, 1] << 8) | rgb[:, :, 2]
        uniques, inverse = np.unique(keys, return_inverse=True)
        table = {(r << 16) | (g << 8) | b: index for index, (r, g, b) in enumerate(self.palette)}
        for r, g, b in self.ignore_colors:
            table[(r << 16) | (g << 8) | b] = self.ignore_index
        classes = np.empty(len(uniques), dtype=np.int64)
        for position, key in enumerate(uniques.tolist()):
            if key not in table:
                color = (key >> 16, (key >> 8) & 255, key & 255)
                raise UsageError(
                    f"{source}: colour {color} maps to no class; add it to the class table "
                    "(classes.json or `classes_file`) or fix the mask"
                )
            classes[position] = table[key]
        return classes[inverse.reshape(keys.shape)]

    def _no_class(self, source: str | Path, value: int) -> UsageError:
        values = self.raw_values()
        if self.values is None:
            known = f"classes 0..{self.num_classes - 1}"
        else:
            known = "values " + ", ".join(str(v) for v in values)
        ignore = f", {self.ignore_index} = ignore" if self.kind != "binary" else ""
        return UsageError(
            f"{source}: value {value} maps to no class ({self.kind} masks, {known}{ignore}); "
            "fix the mask or the class table (classes.json or `classes_file`)"
        )


def parse_ignore_values(text: str | Sequence[int] | None) -> list[int]:
    """`--ignore-values` ("11" or "0,11"; a TOML file may give a list) as integers."""
    if not text:
        return []
    parts = str(text).split(",") if isinstance(text, str) else list(text)
    try:
        values = [int(part) for part in parts if str(part).strip()]
    except ValueError:
        raise UsageError(f"`ignore_values` {text}: give raw mask values, e.g. 11 or 0,11") from None
    if any(not 0 <= value <= 65535 for value in values):
        raise UsageError(f"`ignore_values` {text}: raw mask values are 0..65535")
    return values


@dataclass
class ClassTable:
    """A class table as read from a file: names, optional raw values and colours."""

    names: list[str]
    values: list[int] | None = None
    colors: list[Color] | None = None
    ignore_colors: list[Color] = field(default_factory=list)
    ignore_values: list[int] = field(default_factory=list)


def find_class_table(root: Path) -> Path | None:
    """The class table file in a dataset root, if any."""
    for name in CLASS_TABLE_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def _color(value: Any, path: Path) -> Color:
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if len(text) == 6:
            try:
                return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
            except ValueError:
                pass
    elif isinstance(value, Sequence) and len(value) >= 3:
        try:
            color = tuple(int(c) for c in value[:3])
        except (TypeError, ValueError):
            color = ()
        if len(color) == 3 and all(0 <= c <= 255 for c in color):
            return color  # type: ignore[return-value]
    raise UsageError(f"{path}: bad colour {value!r}; write [r, g, b] with 0..255 or '#rrggbb'")


def _int(value: Any, path: Path, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{path}: bad {what} {value!r}; write an integer") from None


def _read_json_table(path: Path) -> ClassTable:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: not a readable JSON class table ({error})") from None
    ignore: list[Color] = []
    ignore_values: list[int] = []
    if isinstance(data, dict):
        raw_ignore = data.get("ignore_color", data.get("ignore_colors", []))
        if raw_ignore and not isinstance(raw_ignore[0], (list, tuple, str)):
            raw_ignore = [raw_ignore]
        ignore = [_color(color, path) for color in raw_ignore]
        raw_values = data.get("ignore_values", [])
        if not isinstance(raw_values, list):
            raw_values = [raw_values]
        ignore_values = [_int(value, path, "ignore value") for value in raw_values]
        data = data.get("classes")
    if not isinstance(data, list) or not data:
        raise UsageError(
            f"{path}: expected a list of classes, e.g. "
            '{"classes": [{"name": "background", "color": [0, 0, 0]}, ...]}'
        )
    names: list[str] = []
    values: list[int] = []
    colors: list[Color] = []
    for position, entry in enumerate(data):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise UsageError(f"{path}: class {position} needs a 'name'")
        if entry.get("ignore"):
            # An entry such as {"name": "void", "value": 11, "ignore": true} names a raw value
            # (or colour) that is ignored, not a class.
            if "value" in entry:
                ignore_values.append(_int(entry["value"], path, "value"))
            if "color" in entry:
                ignore.append(_color(entry["color"], path))
            if "value" not in entry and "color" not in entry:
                raise UsageError(f"{path}: ignore entry '{entry['name']}' needs a 'value'")
            continue
        names.append(str(entry["name"]))
        values.append(_int(entry.get("value", len(names) - 1), path, "value"))
        if "color" in entry:
            colors.append(_color(entry["color"], path))
    if colors and len(colors) != len(names):
        raise UsageError(f"{path}: give a 'color' for every class or for none")
    if not names:
        raise UsageError(f"{path}: every entry is an ignore entry; list at least one class")
    return ClassTable(
        names,
        values if values != list(range(len(names))) else None,
        colors or None,
        ignore,
        ignore_values,
    )


_TRUE = frozenset({"1", "true", "yes", "y", "x"})


def _read_csv_table(path: Path) -> ClassTable:
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UsageError(f"{path}: not a readable CSV class table ({error})") from None
    if not rows:
        raise UsageError(f"{path}: no classes; write a header 'value,name' and one row per class")
    fields = {name.strip().lower(): name for name in rows[0] if name}
    if "name" not in fields and "value" not in fields:
        raise UsageError(f"{path}: the header needs a 'name' or 'value' column")
    names: list[str] = []
    values: list[int] = []
    colors: list[Color] = []
    ignore_values: list[int] = []
    for row in rows:
        position = len(names)
        value = _int(row[fields["value"]], path, "value") if "value" in fields else position
        if "ignore" in fields and row[fields["ignore"]].strip().lower() in _TRUE:
            ignore_values.append(value)
            continue
        values.append(value)
        names.append(row[fields["name"]].strip() if "name" in fields else str(value))
        if all(channel in fields for channel in "rgb"):
            colors.append(_color([row[fields[c]] for c in "rgb"], path))
        elif "color" in fields:
            colors.append(_color(row[fields["color"]], path))
    if not names:
        raise UsageError(f"{path}: every row is an ignore row; list at least one class")
    return ClassTable(
        names,
        values if values != list(range(len(names))) else None,
        colors or None,
        ignore_values=ignore_values,
    )


def _read_text_table(path: Path) -> ClassTable:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: not a readable class list ({error})") from None
    # labelme writes "__ignore__" first for the ignore label; it is not a class.
    names = [line.strip() for line in lines if line.strip() and line.strip() != "__ignore__"]
    if not names:
        raise UsageError(f"{path}: no class names; write one name per line")
    return ClassTable(names)


def read_class_table(path: str | Path) -> ClassTable:
    """Read a class table (.json, .csv, or a text file of names)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: class table not found; check `classes_file`")
    suffix = path.suffix.lower()
    if suffix == ".json":
        table = _read_json_table(path)
    elif suffix == ".csv":
        table = _read_csv_table(path)
    else:
        table = _read_text_table(path)
    if table.values is not None and len(set(table.values)) != len(table.values):
        raise UsageError(f"{path}: two classes share a value; give each class its own value")
    return table
