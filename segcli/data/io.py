"""Reading images and masks from disk.

`torchvision.io.decode_image` decodes PNG, JPEG and GIF (fast, no PIL round trip); Pillow reads
the rest (BMP, TIFF) and the cases decode_image gets wrong for us (GIF masks, whose palette
indices it would expand to colours). Every failure becomes a one-line UsageError naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from segcli.data.layouts import IMAGE_EXTENSIONS
from segcli.errors import UsageError, first_line

# Formats torchvision decodes itself; the others go through Pillow.
_TORCHVISION_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PALETTE = 3  # IHDR colour type of an indexed PNG

# torchvision 0.29 deprecates its decoders in favour of TorchCodec, which segcli does not depend
# on; the decoders still work, so keep the warning out of every data loading step.
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision"


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
        yield


def is_image_file(path: Path) -> bool:
    """True for files whose extension segcli reads (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _read_bytes(path: Path) -> torch.Tensor:
    from torchvision.io import read_file

    try:
        with _quiet():
            return read_file(str(path))
    except (OSError, RuntimeError) as error:
        raise UsageError(f"{path}: cannot read the file ({error}); check it exists") from None


def _unreadable(path: Path, error: Exception) -> UsageError:
    return UsageError(
        f"{path}: not a readable image ({first_line(error)}); replace or remove the file"
    )


def _png_is_palette(data: torch.Tensor) -> bool:
    """Indexed PNGs would decode to palette indices with ImageReadMode.UNCHANGED; the IHDR colour
    type sits at byte 25 of every PNG, so checking it costs nothing."""
    return (
        data.numel() > 25
        and bytes(data[:8].tolist()) == _PNG_SIGNATURE
        and int(data[25]) == _PNG_PALETTE
    )


def _decode_torchvision(
    path: Path, data: torch.Tensor, *, as_mask: bool, file: BinaryIO | None = None
) -> torch.Tensor:
    """`file`: the encoded bytes as a file, when they come from memory rather than `path`."""
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.UNCHANGED
    if not as_mask and _png_is_palette(data):
        transparent = _pil_has_transparency(file if file is not None else path)
        mode = ImageReadMode.RGB_ALPHA if transparent else ImageReadMode.RGB
    try:
        with _quiet():
            tensor = decode_image(data, mode=mode)
    except (RuntimeError, ValueError) as error:
        raise _unreadable(path, error) from None
    if tensor.ndim == 4:  # animated GIF: the first frame is the image
        tensor = tensor[0]
    return tensor


def _pil_has_transparency(source: Path | BinaryIO) -> bool:
    with Image.open(source) as image:
        return "transparency" in image.info


def _open_pil(path: Path, file: BinaryIO | None = None) -> Image.Image:
    try:
        image = Image.open(file if file is not None else path)
        image.seek(0)  # first frame of a multi-page TIFF or animated GIF
        image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise _unreadable(path, error) from None
    return image


def _pil_image_array(image: Image.Image) -> np.ndarray:
    """A Pillow image as an H×W×C array, keeping 16-bit and float data as they are."""
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    array = np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays
    return array if array.ndim == 3 else array[:, :, None]


def _to_output(array_or_tensor: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 stays uint8; deeper integer data (16-bit) becomes float32 in [0, 1]; float stays."""
    tensor = (
        array_or_tensor
        if isinstance(array_or_tensor, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(array_or_tensor))
    )
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.dtype.is_floating_point:
        return tensor.float()
    # uint16 tensors support few ops, so widen before scaling.
    return tensor.to(torch.int32).float().div_(65535.0).clamp_(0.0, 1.0)


def read_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a C×H×W tensor with its own channel count (1, 2, 3 or 4).

    8-bit data comes back as uint8; 16-bit (and 32-bit integer) data as float32 scaled to [0, 1];
    float TIFFs as float32 unchanged. Palette images are expanded to RGB (RGBA with transparency).
    Use `to_channels` to match a model's `in_channels`.
    """
    path = Path(path)
    if path.suffix.lower() in _TORCHVISION_EXTENSIONS:
        return _to_output(_decode_torchvision(path, _read_bytes(path), as_mask=False))
    with _open_pil(path) as image:
        array = _pil_image_array(image)
    return _to_output(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))


def decode_image_bytes(data: bytes, source: str = "image") -> torch.Tensor:
    """`read_image` for an encoded image in memory (an upload): the same decoders, chosen by
    the bytes' signature instead of a file suffix, and the same conversions, so a served image
    becomes exactly the tensor `seg predict` makes of the same file. Errors name `source`."""
    import io

    path = Path(source)
    if data[:8] == _PNG_SIGNATURE or data[:3] == b"\xff\xd8\xff" or data[:4] == b"GIF8":
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        decoded = _decode_torchvision(path, tensor, as_mask=False, file=io.BytesIO(data))
        return _to_output(decoded)
    with _open_pil(path, io.BytesIO(data)) as image:
        array = _pil_image_array(image)
    return _to_output(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))


def image_from_array(image: np.ndarray | Image.Image) -> torch.Tensor:
    """An in-memory image (a Pillow image, or an H×W / H×W×C numpy array) as `read_image`
    returns files: C×H×W, uint8 kept, 16-bit scaled to [0, 1] float32, float kept."""
    if isinstance(image, Image.Image):
        array = _pil_image_array(image)
    else:
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] > 4:
            raise UsageError(
                f"expected an H x W or H x W x C image array (C up to 4), got shape "
                f"{list(array.shape)}"
            )
        if array.dtype == np.bool_:
            array = array.astype(np.uint8) * 255
    return _to_output(np.ascontiguousarray(array)).permute(2, 0, 1)


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask file to its raw values: H×W for single-channel masks (palette PNGs give their
    indices, 1-bit masks give 0/255, 16-bit masks uint16), H×W×3 uint8 for colour masks. Alpha
    channels are dropped. Mapping values to classes is `ClassMapping.encode`'s job."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _TORCHVISION_EXTENSIONS and suffix != ".gif":
        tensor = _decode_torchvision(path, _read_bytes(path), as_mask=True)
        array = tensor.permute(1, 2, 0).numpy()
    else:
        with _open_pil(path) as image:
            if image.mode == "1":
                image = image.convert("L")  # same 0/255 values decode_image gives for 1-bit PNGs
            elif image.mode == "PA":
                image = image.convert("P")
            array = np.asarray(image)
        if array.ndim == 2:
            return np.ascontiguousarray(array)
    if array.shape[2] in (1, 2):  # gray, or gray + alpha
        return np.ascontiguousarray(array[:, :, 0])
    return np.ascontiguousarray(array[:, :, :3])


def read_header(path: str | Path) -> tuple[str, tuple[int, int]]:
    """The Pillow mode ('L', 'P', 'RGB', '1', 'I;16', ...) and (H, W) of an image, reading only its
    header. Used to decide the mask kind and to spot size mismatches cheaply."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.mode, (image.height, image.width)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise _unreadable(path, error) from None


def read_palette(path: str | Path) -> list[tuple[int, int, int]]:
    """The RGB palette of an indexed image (256 entries), or [] when it has none."""
    with Image.open(path) as image:
        flat = image.getpalette() or []
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat) - 2, 3)]  # type: ignore[misc]


def to_channels(
    image: torch.Tensor, in_channels: int, *, source: str | Path = "image"
) -> torch.Tensor:
    """Convert a C×H×W image to `in_channels` channels: gray is repeated to RGB, RGB becomes gray
    by ITU-R 601 luma, alpha is dropped (or added opaque for 4-channel models)."""
    channels = image.shape[0]
    if channels == in_channels:
        return image
    if channels == 2:  # gray + alpha
        image, channels = image[:1], 1
    elif channels == 4 and in_channels in (1, 3):
        image, channels = image[:3], 3
    if channels == in_channels:
        return image
    opaque = 255 if image.dtype == torch.uint8 else 1.0
    if channels == 1 and in_channels in (3, 4):
        rgb = image.expand(3, -1, -1).clone()
        if in_channels == 3:
            return rgb
        return torch.cat([rgb, torch.full_like(image, opaque)])
    if channels == 3 and in_channels == 1:
        from torchvision.transforms.v2.functional import rgb_to_grayscale

        return rgb_to_grayscale(image)
    if channels == 3 and in_channels == 4:
        return torch.cat([image, torch.full_like(image[:1], opaque)])
    raise UsageError(
        f"{source}: has {channels} channels, cannot convert to `in_channels` {in_channels}; "
        "use 1, 3 or 4 input channels or images with that many channels"
    )
