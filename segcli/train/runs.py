"""Run folders as a table (`seg runs`) and side by side (`seg runs compare`), read from the files
a run leaves: config.toml, metrics.jsonl, status.json and the checkpoint's metadata header.
Reading needs no torch, so listing a hundred runs is instant."""

from __future__ import annotations

import json
import math
import struct
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segcli.errors import UsageError

# Settings that name where a run lives rather than how it trained: never a "difference".
PLACE_KEYS = frozenset({"out", "resume"})
RUN_FILES = ("metrics.jsonl", "config.toml")


@dataclass
class RunRecord:
    """One run folder as `seg runs` shows it."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    status: str
    backbone: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def best(self) -> dict[str, Any] | None:
        scored = [r for r in self.records if _number(r.get("val", {}).get("miou")) is not None]
        return max(scored, key=lambda r: r["val"]["miou"]) if scored else None

    @property
    def best_miou(self) -> float | None:
        return self.best["val"]["miou"] if self.best else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        last = self.records[-1] if self.records else {}
        return {
            "run": str(self.path),
            "arch": self.config.get("arch"),
            "backbone": self.backbone or self.config.get("backbone"),
            "data": self.config.get("data") or "mock",
            "epochs_done": last.get("epoch", 0),
            "epochs_planned": last.get("epochs", self.config.get("epochs")),
            "best_miou": best["val"]["miou"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "best_val": best["val"] if best else None,
            "wall_seconds": last.get("wall_seconds"),
            "status": self.status,
        }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def checkpoint_metadata(path: Path) -> dict[str, Any] | None:
    """The segcli metadata of a safetensors file, read from its JSON header alone (8-byte
    length, then the header), without loading any tensor."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                return None
            header = json.loads(handle.read(length))
        return json.loads(header["__metadata__"]["segcli"])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """metrics.jsonl's records, and one problem line per corrupt line (skipped)."""
    records, problems = [], []
    if not path.is_file():
        return records, problems
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "epoch" not in record:
                raise ValueError("no epoch")
        except ValueError:
            problems.append(f"{path}:{number}: not a metrics record; skipped")
            continue
        records.append(record)
    return records, problems


def read_run(path: Path) -> RunRecord:
    config: dict[str, Any] = {}
    problems: list[str] = []
    if (path / "config.toml").is_file():
        try:
            config = tomllib.loads((path / "config.toml").read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            problems.append(f"{path / 'config.toml'}: not valid TOML; settings unknown")
    records, metric_problems = read_metrics(path / "metrics.jsonl")
    problems += metric_problems
    metadata = checkpoint_metadata(path / "last.safetensors") or {}
    if not config and isinstance(metadata.get("config"), dict):
        config = metadata["config"]
    backbone = metadata.get("model", {}).get("backbone") if metadata else None
    return RunRecord(path, config, records, _status(path, records), backbone, problems)


def _status(path: Path, records: list[dict[str, Any]]) -> str:
    """status.json's word; runs older than it: finished when every planned epoch ran."""
    try:
        status = json.loads((path / "status.json").read_text())["status"]
        if isinstance(status, str):
            return status
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if records and records[-1].get("epoch") == records[-1].get("epochs"):
        return "finished"
    return "interrupted"


def find_runs(root: Path, depth: int = 3) -> list[Path]:
    """Run folders (holding metrics.jsonl or config.toml) under `root`, `root` included, down
    to `depth` levels (cross-validation folds are runs inside a run folder)."""
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder; give the folder holding run folders")
    found = []
    level = [root]
    for _ in range(depth + 1):
        found += [folder for folder in level if any((folder / f).is_file() for f in RUN_FILES)]
        level = [child for folder in level for child in sorted(folder.iterdir()) if child.is_dir()]
    return found


def list_runs(root: Path) -> list[RunRecord]:
    """Every run under `root`, best val mIoU first (runs without a score last)."""
    runs = [read_run(path) for path in find_runs(root)]
    if not runs:
        raise UsageError(
            f"{root}: no run folders (folders with metrics.jsonl or config.toml); train with "
            "seg train --out DIR or give the folder holding the runs"
        )
    return sorted(runs, key=lambda run: -(run.best_miou if run.best_miou is not None else -1))


def config_differences(runs: list[RunRecord]) -> dict[str, list[Any]]:
    """Each setting whose value is not the same in every run, with each run's value."""
    differences = {}
    for key in sorted({key for run in runs for key in run.config} - PLACE_KEYS):
        values = [run.config.get(key) for run in runs]
        if len({json.dumps(value, sort_keys=True) for value in values}) > 1:
            differences[key] = values
    return differences


def plot_comparison(runs: list[RunRecord], labels: list[str], path: Path) -> None:
    """One PNG: every run's val loss and val mIoU against the epoch, overlaid."""
    from PIL import Image, ImageDraw

    from segcli.train.report import plot_panel

    image = Image.new("RGB", (900, 340), "white")
    draw = ImageDraw.Draw(image)
    pairs = list(zip(labels, runs, strict=True))
    loss = {label: [r.get("val_loss") for r in run.records] for label, run in pairs}
    miou = {label: [r.get("val", {}).get("miou") for r in run.records] for label, run in pairs}
    plot_panel(draw, (40, 30, 400, 290), "val loss", loss)
    plot_panel(draw, (480, 30, 840, 290), "val mIoU", miou)
    longest = max(len(run.records) for run in runs)
    draw.text((40, 318), f"epochs 1..{longest}", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
