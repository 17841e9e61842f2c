"""What a run leaves for people to read: the metrics log, the curves PNG and preview images.
Drawn with Pillow alone, so training needs no plotting library."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

CURVE_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it, so a crash keeps every finished epoch's record."""
    with path.open("a") as handle:
        handle.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: dict[str, Sequence[float | None]],
) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left + 4, top - 14), title, fill=(0, 0, 0))
    values = [v for ys in series.values() for v in ys if v is not None and math.isfinite(v)]
    if not values:
        return
    low, high = min(values), max(values)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    draw.text((right + 4, top), f"{high:.3g}", fill=(0, 0, 0))
    draw.text((right + 4, bottom - 10), f"{low:.3g}", fill=(0, 0, 0))
    length = max(len(ys) for ys in series.values())
    for index, (name, ys) in enumerate(series.items()):
        color = CURVE_COLORS[index % len(CURVE_COLORS)]
        points = [
            (
                left + (right - left) * (i / max(length - 1, 1)),
                bottom - (bottom - top) * ((y - low) / (high - low)),
            )
            for i, y in enumerate(ys)
            if y is not None and math.isfinite(y)
        ]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        draw.text((left + 8 + 90 * index, bottom + 6), name, fill=color)


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Loss (train and val) and val mIoU against the epoch, side by side."""
    image = Image.new("RGB", (900, 340), "white")
    draw = ImageDraw.Draw(image)
    train_loss = [r.get("train_loss") for r in records]
    val_loss = [r.get("val_loss") for r in records]
    miou = [r.get("val", {}).get("miou") for r in records]
    plot_panel(draw, (40, 30, 400, 290), "loss", {"train": train_loss, "val": val_loss})
    plot_panel(draw, (480, 30, 840, 290), "val mIoU", {"mIoU": miou})
    draw.text((40, 318), f"epochs 1..{len(records)}", fill=(0, 0, 0))
    image.save(path)


# Ignored pixels: white, unless a class already is white (binary foreground), then mid-gray.
IGNORE_COLORS = ((255, 255, 255), (128, 128, 128), (255, 0, 255))


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int) -> np.ndarray:
    """H x W class indices to H x W x 3 colours; ignored pixels in the first of IGNORE_COLORS
    that no class uses, so they never look like a class."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    used = {tuple(int(c) for c in color) for color in palette}
    ignore = next((color for color in IGNORE_COLORS if color not in used), IGNORE_COLORS[-1])
    table[ignore_index % 256] = ignore
    return table[labels.clip(0, 255).astype(np.uint8)]


def save_preview(
    path: Path,
    image: torch.Tensor,
    target: torch.Tensor,
    prediction: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    palette: Sequence[Sequence[int]],
    ignore_index: int,
) -> None:
    """One PNG: the (de-normalised) image | ground truth | prediction."""
    pixels = image.float().cpu() * torch.tensor(std)[:, None, None]
    pixels = pixels + torch.tensor(mean)[:, None, None]
    pixels = pixels[:3] if pixels.shape[0] >= 3 else pixels[:1].expand(3, -1, -1)
    rgb = (pixels.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    truth = colorize(target.cpu().numpy(), palette, ignore_index)
    predicted = colorize(prediction.cpu().numpy(), palette, ignore_index)
    Image.fromarray(np.concatenate([rgb, truth, predicted], axis=1)).save(path)
