"""The data layer: decoding, mask kinds, class mapping, checks, augmentation, loader, mock data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from segcli.data import (
    AugmentConfig,
    ClassMapping,
    SegmentationDataset,
    build_loader,
    check_dataset,
    default_normalization,
    mock_root,
    parse_size,
    read_image,
    read_mask,
    scan_dataset,
)
from segcli.data.dataset import DatasetError
from segcli.data.io import to_channels
from segcli.errors import UsageError


def _save(path: Path, array: np.ndarray, mode: str | None = None, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path, **kwargs)
    return path


def _index_mask(height: int = 48, width: int = 64) -> np.ndarray:
    """Left third class 0, middle class 1, right class 2, a strip of 255 (ignore) at the top."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 3 :] = 1
    mask[:, 2 * width // 3 :] = 2
    mask[:4] = 255
    return mask


def _image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_dataset(
    root: Path,
    masks: dict[str, list[np.ndarray]] | None = None,
    mask_ext: str = ".png",
    image_ext: str = ".png",
    mask_mode: str | None = None,
    **save_kwargs: object,
) -> Path:
    """A dataset with train and val splits of 64x48 images and the given raw masks."""
    masks = masks or {"train": [_index_mask()] * 2, "val": [_index_mask()]}
    for split, arrays in masks.items():
        for index, mask in enumerate(arrays):
            height, width = mask.shape[:2]
            _save(root / split / "images" / f"{index:02d}{image_ext}", _image(height, width, index))
            _save(root / split / "masks" / f"{index:02d}{mask_ext}", mask, mask_mode, **save_kwargs)
    return root


# --- sizes and normalisation -------------------------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("256") == (256, 256)
    assert parse_size("256x320") == (256, 320)
    assert parse_size(128) == (128, 128)
    for bad in ("", "abc", "256x", "0", "4x4", "256x320x3"):
        with pytest.raises(UsageError, match="`size`"):
            parse_size(bad)


def test_default_normalization() -> None:
    assert default_normalization(3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for channels in (1, 4, 5):
        mean, std = default_normalization(channels)
        assert len(mean) == len(std) == channels


# --- decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff", ".gif"])
def test_read_image_lossless_formats(tmp_path: Path, ext: str) -> None:
    rgb = _image(20, 30)
    if ext == ".gif":  # GIF has a 256-colour palette: use few colours so it stays lossless
        rgb = (rgb // 128 * 255).astype(np.uint8)
    tensor = read_image(_save(tmp_path / f"x{ext}", rgb))
    assert tensor.dtype == torch.uint8
    assert tensor.shape == (3, 20, 30)
    assert torch.equal(tensor, torch.from_numpy(rgb).permute(2, 0, 1))


def test_read_image_modes(tmp_path: Path) -> None:
    rgb = _image(20, 30)
    assert read_image(_save(tmp_path / "gray.png", rgb, "L")).shape == (1, 20, 30)
    assert read_image(_save(tmp_path / "rgba.png", rgb, "RGBA")).shape == (4, 20, 30)
    jpeg = read_image(_save(tmp_path / "x.jpeg", rgb))
    assert jpeg.shape == (3, 20, 30) and jpeg.dtype == torch.uint8
    # Palette images are expanded to their colours, not left as indices.
    palette = read_image(_save(tmp_path / "pal.png", (rgb // 128 * 255).astype(np.uint8), "P"))
    assert palette.shape == (3, 20, 30)
    assert set(palette.unique().tolist()) <= {0, 255}


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_read_image_16_bit(tmp_path: Path, ext: str) -> None:
    array = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    tensor = read_image(_save(tmp_path / f"deep{ext}", array))
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 20, 30)
    assert torch.allclose(tensor[0], torch.from_numpy(array.astype(np.float32) / 65535))


def test_read_image_unreadable(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(UsageError, match=r"broken\.png: not a readable image"):
        read_image(bad)
    text = tmp_path / "notes.tif"
    text.write_text("hello")
    with pytest.raises(UsageError, match=r"notes\.tif"):
        read_image(text)


def test_to_channels() -> None:
    gray = torch.full((1, 4, 4), 100, dtype=torch.uint8)
    assert torch.equal(to_channels(gray, 3), gray.expand(3, -1, -1))
    rgba = to_channels(gray, 4)
    assert rgba.shape == (4, 4, 4) and rgba[3].eq(255).all()
    rgb = torch.stack([torch.full((4, 4), v, dtype=torch.uint8) for v in (200, 100, 50)])
    assert to_channels(rgb, 1).shape == (1, 4, 4)
    assert torch.equal(to_channels(torch.cat([rgb, rgb[:1]]), 3), rgb)
    with pytest.raises(UsageError, match="`in_channels` 2"):
        to_channels(rgb, 2)


# --- mask kinds --------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif"])
def test_index_masks(tmp_path: Path, ext: str) -> None:
    root = make_dataset(tmp_path, mask_ext=ext)
    info = scan_dataset(root)
    assert info.mapping.kind == "index" and info.mapping.num_classes == 3
    assert list(info.splits) == ["train", "val"]
    encoded = info.mapping.encode(read_mask(info.splits["train"][0][1]))
    assert encoded.dtype == np.int64
    assert np.array_equal(encoded, _index_mask().astype(np.int64))


def test_binary_masks_and_foreground(tmp_path: Path) -> None:
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 10:40] = 255
    root = make_dataset(tmp_path, {"train": [mask], "val": [mask]})
    mapping = scan_dataset(root).mapping
    assert mapping.kind == "binary" and mapping.names == ["background", "foreground"]
    assert np.array_equal(mapping.encode(mask), (mask == 255).astype(np.int64))
    # ISBI style: 0 is the structure of interest.
    flipped = scan_dataset(root, foreground_value=0).mapping
    assert np.array_equal(flipped.encode(mask), (mask == 0).astype(np.int64))
    with pytest.raises(UsageError, match="`foreground` 7: no mask holds that value"):
        scan_dataset(root, foreground_value=7)


def test_one_bit_masks(tmp_path: Path) -> None:
    mask = np.zeros((48, 64), bool)
    mask[5:20, 5:20] = True
    root = make_dataset(tmp_path, {"train": [mask], "val": [mask]}, mask_mode="1")
    assert Image.open(root / "train/masks/00.png").mode == "1"
    info = scan_dataset(root)
    assert info.mapping.kind == "binary"
    encoded = info.mapping.encode(read_mask(root / "train/masks/00.png"))
    assert np.array_equal(encoded, mask.astype(np.int64))


def _palette_png(path: Path, indices: np.ndarray, colors: list[tuple[int, int, int]]) -> Path:
    image = Image.fromarray(indices, "P")
    flat = [c for color in colors for c in color]
    image.putpalette(flat + [0] * (768 - len(flat)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_palette_masks(tmp_path: Path) -> None:
    colors = [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
    for split, count in (("train", 2), ("val", 1)):
        for index in range(count):
            _save(tmp_path / split / "images" / f"{index}.jpg", _image(48, 64, index))
            _palette_png(tmp_path / split / "masks" / f"{index}.png", _index_mask(), colors)
    mapping = scan_dataset(tmp_path).mapping
    assert mapping.kind == "palette" and mapping.num_classes == 3
    assert mapping.palette == colors
    # A names file fixes the class count even for classes no mask shows.
    (tmp_path / "class_names.txt").write_text("__ignore__\nbg\na\nb\nc\nd\n")
    with_names = scan_dataset(tmp_path).mapping
    assert with_names.names == ["bg", "a", "b", "c", "d"] and with_names.kind == "palette"
    assert np.array_equal(
        with_names.encode(read_mask(tmp_path / "val/masks/0.png")), _index_mask().astype(np.int64)
    )


def test_rgb_masks_with_class_table(tmp_path: Path) -> None:
    colors = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]
    index = _index_mask()
    rgb = np.zeros((*index.shape, 3), np.uint8)
    for value, color in enumerate(colors):
        rgb[index == value] = color
    rgb[index == 255] = (255, 255, 255)
    make_dataset(tmp_path, {"train": [rgb], "val": [rgb]})
    with pytest.raises(UsageError, match="RGB colour mask; give a class table"):
        scan_dataset(tmp_path)
    table = {
        "classes": [{"name": n, "color": list(c)} for n, c in zip("xyz", colors, strict=True)],
        "ignore_color": [255, 255, 255],
    }
    table_path = tmp_path.parent / f"{tmp_path.name}-classes.json"
    table_path.write_text(json.dumps(table))
    info = scan_dataset(tmp_path, table_path)
    assert info.mapping.kind == "rgb" and info.mapping.names == ["x", "y", "z"]
    encoded = info.mapping.encode(read_mask(tmp_path / "train/masks/00.png"), "m.png")
    assert np.array_equal(encoded, index.astype(np.int64))
    rgb[0, 0] = (1, 2, 3)
    with pytest.raises(UsageError, match=r"m.png: colour \(1, 2, 3\) maps to no class"):
        info.mapping.encode(rgb, "m.png")


def test_gray_masks_saved_as_rgb(tmp_path: Path) -> None:
    mask = _index_mask()
    root = make_dataset(tmp_path, {"train": [mask], "val": [mask]}, mask_mode="RGB")
    info = scan_dataset(root)
    assert info.mapping.kind == "index" and info.mapping.num_classes == 3
    assert np.array_equal(info.mapping.encode(read_mask(root / "val/masks/00.png")), mask)


def test_sixteen_bit_index_masks(tmp_path: Path) -> None:
    mask = _index_mask().astype(np.uint16)
    root = make_dataset(tmp_path, {"train": [mask], "val": [mask]})
    assert Image.open(root / "train/masks/00.png").mode.startswith("I")
    info = scan_dataset(root)
    assert info.mapping.kind == "index" and info.mapping.num_classes == 3
    assert np.array_equal(info.mapping.encode(read_mask(root / "val/masks/00.png")), mask)


def test_class_csv_with_values(tmp_path: Path) -> None:
    mask = np.zeros((48, 64), np.uint8)
    mask[:, 20:] = 128
    mask[:, 40:] = 200
    root = make_dataset(tmp_path, {"train": [mask], "val": [mask]})
    (root / "classes.csv").write_text("value,name\n0,sky\n128,grass\n200,road\n")
    mapping = scan_dataset(root).mapping
    assert mapping.names == ["sky", "grass", "road"] and mapping.values == [0, 128, 200]
    assert set(np.unique(mapping.encode(mask)).tolist()) == {0, 1, 2}


def test_mapping_roundtrip_and_unknown_value() -> None:
    mapping = ClassMapping("index", ["a", "b", "c"])
    restored = ClassMapping.from_dict(json.loads(json.dumps(mapping.to_dict())))
    assert restored.to_dict() == mapping.to_dict() and restored.num_classes == 3
    with pytest.raises(UsageError, match=r"bad.png: value 7 maps to no class"):
        mapping.encode(np.array([[0, 7]], np.uint8), "bad.png")


# --- dataset checks ----------------------------------------------------------------------------


def test_check_valid_report(tmp_path: Path) -> None:
    report = check_dataset(make_dataset(tmp_path))
    assert report.counts == {"train": 2, "val": 1}
    assert report.splits["train"].sizes == {(48, 64): 2}
    frequencies = report.class_frequencies()
    assert len(frequencies) == 3 and abs(sum(frequencies) - 1) < 1e-9
    data = report.to_dict()
    assert data["mapping"]["kind"] == "index" and data["splits"]["val"]["images"] == 1
    assert data["splits"]["train"]["ignored_pixels"] == 2 * 4 * 64


def _break(root: Path, problem: str) -> str:
    """Damage a valid dataset in one way; return a fragment the error must contain."""
    if problem == "image without mask":
        (root / "train/masks/01.png").unlink()
        return "01.png: image without a mask"
    if problem == "mask without image":
        (root / "train/images/01.png").unlink()
        return "01.png: mask without an image"
    if problem == "non-image file":
        (root / "train/images/notes.txt").write_text("hi")
        return "notes.txt: not an image file"
    if problem == "unreadable":
        (root / "val/images/00.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
        return "00.png: not a readable image"
    if problem == "unmapped value":
        mask = _index_mask()
        mask[20, 20] = 9
        _save(root / "val/masks/00.png", mask)
        (root / "classes.json").write_text(json.dumps(["a", "b", "c"]))
        return "00.png: value 9 maps to no class"
    if problem == "size mismatch":
        _save(root / "train/masks/00.png", _index_mask(40, 64))
        return "mask is 40x64 but 00.png is 48x64"
    if problem == "empty split":
        for path in (root / "val/images").iterdir():
            path.unlink()
        for path in (root / "val/masks").iterdir():
            path.unlink()
        return "val/images: empty"
    if problem == "missing split":
        for path in sorted((root / "val").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (root / "val").rmdir()
        return "no 'val' split"
    raise AssertionError(problem)


PROBLEMS = [
    "image without mask",
    "mask without image",
    "non-image file",
    "unreadable",
    "unmapped value",
    "size mismatch",
    "empty split",
    "missing split",
]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_check_problems(tmp_path: Path, problem: str) -> None:
    root = make_dataset(tmp_path / "ds")
    expected = _break(root, problem)
    with pytest.raises(DatasetError) as caught:
        check_dataset(root)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_check_cli_bad_dataset(tmp_path: Path, seg) -> None:
    root = make_dataset(tmp_path / "ds")
    expected = _break(root, "size mismatch")
    result = seg("check", str(root))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seg: error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_check_cli_mock_json(seg) -> None:
    result = seg("check", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["valid"] is True
    assert data["mapping"]["names"] == ["background", "circle", "rectangle"]
    assert {name: split["images"] for name, split in data["splits"].items()} == {
        "train": 24,
        "val": 8,
    }
    assert len(data["class_frequencies"]) == 3


# --- dataset items and augmentation ------------------------------------------------------------


def test_dataset_items_resize(tmp_path: Path) -> None:
    info = scan_dataset(make_dataset(tmp_path))
    dataset = SegmentationDataset(info, "train", size=(32, 40), in_channels=1)
    image, mask = dataset[0]
    assert image.shape == (1, 32, 40) and image.dtype == torch.float32
    assert mask.shape == (32, 40) and mask.dtype == torch.int64
    # Nearest neighbour only: no value appears that the mask did not hold.
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255}
    again_image, again_mask = dataset[0]
    assert torch.equal(image, again_image) and torch.equal(mask, again_mask)


def test_augmentation_moves_image_and_mask_together(tmp_path: Path) -> None:
    """The image encodes its mask (gray level = 60 * class), so after any joint geometric
    augmentation the class read back from the image must match the mask almost everywhere."""
    mask = np.zeros((64, 64), np.uint8)
    mask[:24, :40] = 1  # asymmetric, so a flip or rotation of one but not the other shows
    mask[40:, 16:] = 2
    mask[44:56, 4:12] = 3
    for split in ("train", "val"):
        _save(tmp_path / split / "images" / "a.png", (mask * 60).astype(np.uint8))
        _save(tmp_path / split / "masks" / "a.png", mask)
    info = scan_dataset(tmp_path)
    augment = AugmentConfig(scale=(0.3, 1.0), hflip=True, vflip=True, rotate=40, color_jitter=0)
    dataset = SegmentationDataset(
        info, "train", size=(48, 48), in_channels=1, augment=augment, mean=(0.0,), std=(1.0,)
    )
    outcomes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = dataset[0]
        from_image = torch.round(image[0] * 255 / 60).long()
        valid = target != 255
        agreement = (from_image[valid] == target[valid]).float().mean().item()
        assert agreement > 0.93, f"seed {seed}: image and mask disagree on {1 - agreement:.0%}"
        assert ((image[0] == 0) | valid).all()  # rotation padding is ignore in the mask
        outcomes.add(tuple(target.flatten().tolist()))
    assert len(outcomes) > 6  # the augmentation really varies


def test_color_jitter_changes_image_only(tmp_path: Path) -> None:
    info = scan_dataset(make_dataset(tmp_path))
    jitter = AugmentConfig(scale=None, hflip=False, vflip=False, rotate=0, color_jitter=0.5)
    plain = SegmentationDataset(info, "val", size=(48, 64))
    jittered = SegmentationDataset(info, "val", size=(48, 64), augment=jitter)
    torch.manual_seed(0)
    image, mask = jittered[0]
    plain_image, plain_mask = plain[0]
    assert torch.equal(mask, plain_mask) and not torch.allclose(image, plain_image)


def test_augment_from_flags() -> None:
    assert AugmentConfig.from_flags(augment=False) is None
    off = AugmentConfig.from_flags(hflip=False, rotate=0, color_jitter=0, zoom="1,1")
    assert off is None
    config = AugmentConfig.from_flags(scale_min=0.25, vflip=True, rotate=5)
    assert config is not None and config.scale == (0.25, 1.0) and config.vflip
    assert config.zoom is None  # the random resized crop replaces the zoom
    assert AugmentConfig.from_dict(config.to_dict()) == config
    default = AugmentConfig.from_flags()
    assert default is not None and default.zoom == (0.75, 1.25) and default.scale is None
    assert AugmentConfig.from_dict(default.to_dict()) == default
    with pytest.raises(UsageError, match="`rotate`"):
        AugmentConfig(rotate=400)
    for bad in ("2,1", "0,1", "big"):
        with pytest.raises(UsageError, match="`zoom`"):
            AugmentConfig.from_flags(zoom=bad)


def test_zoom_jitter_scales_objects_and_pads_with_ignore(tmp_path: Path) -> None:
    """Guards against the zoom resizing image and mask differently, cropping without padding
    (a zoom below 1 must pad with the ignore index, not stretch), or never varying the scale:
    a 16-pixel square in a 64-pixel image trained at 64 must come out 12 to 20 pixels wide."""
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 24:40] = 1
    for split in ("train", "val"):
        _save(tmp_path / split / "images" / "a.png", (mask * 200).astype(np.uint8))
        _save(tmp_path / split / "masks" / "a.png", mask)
    info = scan_dataset(tmp_path)
    augment = AugmentConfig(hflip=False, zoom=(0.75, 1.25))
    dataset = SegmentationDataset(
        info, "train", size=(64, 64), in_channels=1, augment=augment, mean=(0.0,), std=(1.0,)
    )
    widths, padded = set(), 0
    for seed in range(16):
        torch.manual_seed(seed)
        image, target = dataset[0]
        assert tuple(target.shape) == (64, 64)
        width = int((target == 1).any(dim=0).sum())
        assert 11 <= width <= 21, width
        widths.add(width)
        padded += int((target == 255).any())
        from_image = (image[0] > 0.5).long()
        valid = target != 255
        assert (from_image[valid] == target[valid]).float().mean() > 0.97
    assert len(widths) >= 4 and padded > 0


def test_loader_is_reproducible(tmp_path: Path) -> None:
    info = scan_dataset(make_dataset(tmp_path, {"train": [_index_mask()] * 6, "val": []}))
    dataset = SegmentationDataset(info, "train", size=(32, 32), augment=AugmentConfig())

    def first_epoch(workers: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        loader = build_loader(dataset, 2, True, workers, seed=3, device_type="cpu")
        assert loader.persistent_workers == (workers > 0) and not loader.pin_memory
        return [mask for _, mask in loader]

    assert all(torch.equal(a, b) for a, b in zip(first_epoch(1), first_epoch(1), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first_epoch(0), first_epoch(0), strict=True))


# --- mock data ---------------------------------------------------------------------------------


def test_batches_by_size_groups_equal_sizes_in_input_order() -> None:
    from segcli.data import batches_by_size

    sizes = [(4, 5), (6, 7), (4, 5), None, (4, 5), (6, 7), None, (4, 5)]
    assert batches_by_size(sizes, 2) == [[0, 2], [4, 7], [1, 5], [3], [6]]
    batches = batches_by_size(sizes, 3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    assert all(len({sizes[i] for i in batch}) == 1 and len(batch) <= 3 for batch in batches)


def test_image_sizes_from_headers(tmp_path: Path) -> None:
    from segcli.data import image_sizes

    Image.new("RGB", (30, 20)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert image_sizes([tmp_path / "a.png", tmp_path / "bad.png"]) == [(20, 30), None]


def test_mock_dataset_is_bundled_and_valid() -> None:
    root = mock_root()
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 2 * 1024 * 1024
    report = check_dataset(root)
    assert report.counts == {"train": 24, "val": 8}
    assert report.mapping.names == ["background", "circle", "rectangle"]
    for stats in report.splits.values():
        for height, width in stats.sizes:
            assert 180 <= height <= 320 and 180 <= width <= 320
    assert all(f > 0.02 for f in report.class_frequencies())
    top_level = Path(__file__).resolve().parents[1] / "data" / "mock"
    if top_level.exists():
        assert top_level.resolve() == root.resolve()


def test_mock_generation_is_deterministic(tmp_path: Path) -> None:
    from segcli.data.mock import generate

    first, second = generate(tmp_path / "a"), generate(tmp_path / "b")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 2 * 32 + 1
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
        shipped = mock_root() / name
        if name.suffix == ".png":  # masks: exactly the shipped labels
            assert np.array_equal(
                np.asarray(Image.open(first / name)), np.asarray(Image.open(shipped))
            )
        elif name.suffix == ".jpg":  # JPEG bytes may differ across libjpeg builds, pixels barely
            new, old = (np.asarray(Image.open(p), np.float32) for p in (first / name, shipped))
            assert new.shape == old.shape and np.abs(new - old).mean() < 1.0
        else:
            assert (first / name).read_bytes() == shipped.read_bytes()


def test_color_jitter_shifts_hue_as_documented() -> None:
    """Guards against the documented hue jitter (a quarter of --color-jitter) being dropped:
    brightness, contrast and saturation keep a pure red pixel's green and blue equal; only a
    hue shift makes them differ."""
    from segcli.data.transforms import build_transforms

    red = torch.zeros(3, 8, 8, dtype=torch.uint8)
    red[0] = 200
    jitter = AugmentConfig(hflip=False, zoom=None, color_jitter=0.8)
    transform = build_transforms(None, jitter, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    shifted = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = transform(tv_tensors.Image(red))
        shifted += int((out[1] - out[2]).abs().max() > 0.02)
    assert shifted >= 4


def test_previews_draw_ignored_pixels_unlike_any_class() -> None:
    """Guards against binary previews drawing ignored pixels and the white foreground alike."""
    from segcli.train.report import colorize

    labels = np.array([[0, 1, 255]])
    for palette in ([(0, 0, 0), (255, 255, 255)], [(0, 0, 0), (128, 0, 0)]):
        colors = colorize(labels, palette, 255)[0]
        assert tuple(colors[2]) not in {tuple(c) for c in palette}
        assert [tuple(c) for c in colors[:2]] == palette
