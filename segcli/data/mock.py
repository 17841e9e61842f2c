"""The bundled mock dataset: deterministic synthetic shapes, small enough to ship in the package.

Three classes: 0 background, 1 circles, 2 rectangles (tilted). Triangles and elongated ellipses
are drawn too but labelled background and take any colour, so colour alone never decides the
class (circles lean warm and rectangles cool, which makes the set learnable in CPU minutes).
Backgrounds are random gradients with Gaussian noise; images are JPEG (small), masks
single-channel index PNGs.

Regenerate with ``python -m segcli.data.mock OUT_DIR [--seed N]``; the same seed gives the same
bytes with the same Pillow/libjpeg/zlib.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = [
    {"name": "background", "color": [0, 0, 0]},
    {"name": "circle", "color": [220, 20, 60]},
    {"name": "rectangle", "color": [30, 144, 255]},
]
SPLITS = {"train": 24, "val": 8}
SIZE_RANGE = (180, 320)
JPEG_QUALITY = 88


# Hue ranges (fractions of the colour wheel): circles lean warm and rectangles cool, which
# helps a small model start learning, while distractors take any hue so colour alone never
# decides the class.
HUES = {"circle": (-0.12, 0.18), "rectangle": (0.38, 0.72)}


def _shape_color(
    rng: np.random.Generator, kind: str, background: np.ndarray
) -> tuple[int, int, int]:
    """A saturated colour for a shape of `kind`, clearly different from the background."""
    low, high = HUES.get(kind, (0.0, 1.0))
    while True:
        hue = float(rng.uniform(low, high)) % 1.0
        rgb = colorsys.hsv_to_rgb(hue, float(rng.uniform(0.45, 1.0)), float(rng.uniform(0.6, 1.0)))
        color = np.round(np.array(rgb) * 255)
        if np.abs(color - background).sum() > 150:
            return tuple(int(c) for c in color)  # type: ignore[return-value]


def _polygon(
    cx: float, cy: float, radii: tuple[float, float], angle: float, points: list[float]
) -> list[tuple[float, float]]:
    """Vertices at the given angles (radians) on an ellipse with radii (rx, ry), rotated."""
    cos, sin = math.cos(angle), math.sin(angle)
    vertices = []
    for theta in points:
        x, y = radii[0] * math.cos(theta), radii[1] * math.sin(theta)
        vertices.append((cx + x * cos - y * sin, cy + x * sin + y * cos))
    return vertices


def _sample(rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    # Aspect ratios stay near square so that resizing to a square input cannot squash a circle
    # into something like the (much flatter) distractor ellipses.
    height = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    width = int(np.clip(round(height * rng.uniform(0.8, 1.25)), *SIZE_RANGE))
    # Background: a linear gradient between two dark-to-mid colours.
    start, end = rng.integers(15, 140, size=(2, 3))
    direction = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = xs * math.cos(direction) + ys * math.sin(direction)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    background = start + (end - start) * ramp[..., None]
    image = Image.fromarray(background.astype(np.uint8), "RGB")
    mask = Image.new("L", (width, height), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    mean_color = (start + end) / 2

    # Shapes in random order: later ones occlude earlier ones in image and mask alike.
    kinds = ["circle"] * int(rng.integers(1, 4)) + ["rectangle"] * int(rng.integers(1, 4))
    kinds += [str(k) for k in rng.choice(["triangle", "ellipse"], size=int(rng.integers(0, 3)))]
    rng.shuffle(kinds)
    for kind in kinds:
        color = _shape_color(rng, kind, mean_color)
        size = float(rng.uniform(20, 46))
        cx = float(rng.uniform(size, width - size))
        cy = float(rng.uniform(size, height - size))
        angle = float(rng.uniform(0, math.pi))
        if kind == "circle":
            box = (cx - size, cy - size, cx + size, cy + size)
            draw_image.ellipse(box, fill=color)
            draw_mask.ellipse(box, fill=1)
            continue
        if kind == "rectangle":
            aspect = float(rng.uniform(0.5, 1.0))
            half_diagonal = math.atan(aspect)
            corners = [half_diagonal, math.pi - half_diagonal]
            corners += [math.pi + half_diagonal, 2 * math.pi - half_diagonal]
            tilt = (angle - math.pi / 2) / 4  # within about 22 degrees of upright
            vertices = _polygon(cx, cy, (size * 1.3, size * 1.3), tilt, corners)
            label = 2
        elif kind == "triangle":
            vertices = _polygon(cx, cy, (size, size), angle, [0, 2 * math.pi / 3, 4 * math.pi / 3])
            label = 0
        else:  # an ellipse elongated enough not to pass for a circle
            steps = [2 * math.pi * i / 48 for i in range(48)]
            ratio = float(rng.uniform(0.25, 0.45))
            vertices = _polygon(cx, cy, (size, size * ratio), angle, steps)
            label = 0
        draw_image.polygon(vertices, fill=color)
        draw_mask.polygon(vertices, fill=label)

    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 7, size=(height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB"), mask


def generate(out_dir: str | Path, seed: int = 0, splits: dict[str, int] | None = None) -> Path:
    """Write the mock dataset to `out_dir` (train/ and val/ with images/ and masks/, plus
    classes.json) and return it; `splits` overrides the image count per split (benchmarks use
    bigger sets). Existing files of the same names are overwritten."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for split, count in (splits or SPLITS).items():
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "masks").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, mask = _sample(rng)
            stem = f"{split}_{index:03d}"
            image.save(out / split / "images" / f"{stem}.jpg", quality=JPEG_QUALITY)
            mask.save(out / split / "masks" / f"{stem}.png")
    table = {"classes": CLASSES}
    (out / "classes.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m segcli.data.mock", description="Regenerate the segcli mock dataset."
    )
    parser.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0, as shipped)")
    args = parser.parse_args(argv)
    generate(args.out_dir, args.seed)


if __name__ == "__main__":
    main()
