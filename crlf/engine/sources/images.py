"""Image decoding shared by every image source: bytes -> upright RGB, center crop (in-memory sets) or random-resized
crops of the full-resolution image (streaming); and printable names for ids and messages."""

from __future__ import annotations

import functools
import io
import math
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from crlf.engine.augment import crop_box
from crlf.errors import InputError, short_reason

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(name: str, backslashes: bool = True) -> str:
    """A file name as one printable line that encodes to UTF-8, for log lines, ids, caches and JSON.

    A name whose characters are all printable and that holds no backslash is returned as it is. Otherwise
    backslashes are doubled, newline, CR and tab become \\n, \\r, \\t, and every other unprintable character
    (controls, line separators, the undecodable bytes that os.scandir hands over as lone surrogates) is
    written as the \\xNN escapes of its bytes: b"bad\\xff.png" -> 'bad\\xff.png'. Distinct names never
    print alike. With backslashes=False (for messages that already quote names, such as exception texts)
    backslashes are kept as they are.
    """
    if name.isprintable() and "\\" not in name:
        return name
    return "".join(_escape(c) if not c.isprintable() or (c == "\\" and backslashes) else c for c in name)


_REPR = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")  # a Python object's repr: "<_io.BytesIO object at 0x7f...>"


def unreadable(e: BaseException) -> str:
    """Why an image cannot be read, as one printable line for 'id (reason)' without the object reprs Pillow puts in
    ("cannot identify image file <_io.BytesIO object at 0x7f...>" -> "cannot identify image file"): the id names it."""
    return printable(_REPR.sub("", short_reason(e)).strip() or type(e).__name__, backslashes=False)


def _escape(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    try:
        raw = c.encode("utf-8", "surrogateescape")  # an undecodable byte: the byte itself
    except UnicodeEncodeError:
        raw = c.encode("utf-8", "surrogatepass")
    return "".join(f"\\x{b:02x}" for b in raw)


@functools.cache
def formats_for(suffix: str) -> tuple[str, ...]:
    """Pillow formats to try on a file, its suffix's own first (guesses cost time).

    () for non-image suffixes; no EPS (Ghostscript)."""
    Image.init()
    readable, own = [f for f in Image.OPEN if f != "EPS"], Image.registered_extensions().get(suffix)
    return () if suffix and own not in readable else tuple(sorted(readable, key=lambda f: f != own))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; 16/32-bit integer grey is scaled to 8 bit, transparency composited on white."""
    if im.mode.startswith("I"):
        grey = np.clip(np.asarray(im).astype(np.float32), 0, 65535) / 257
        return Image.fromarray(grey.round().astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def decode(
    source: Path | BinaryIO, size: int, suffix: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """One image file or file object (an upload) -> uint8 (size, size, 3): RGB, upright, shorter side scaled to
    size, center-cropped. The folder source's guards: only the Pillow formats the suffix allows (default: the
    path's; none for a non-image suffix, no EPS) and Pillow's decompression-bomb check; with max_pixels, an
    InputError for an image of more pixels, before they are decoded."""
    if suffix is None:
        suffix = Path(source).suffix if isinstance(source, (str, Path)) else ""
    with Image.open(source, formats=formats_for(suffix.lower())) as im:
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise InputError(f"the image has {im.width}x{im.height} pixels, more than the {max_pixels:,} allowed")
        return square(im, size)


def square(im: Image.Image, size: int) -> np.ndarray:
    """An opened image -> uint8 (size, size, 3) exactly as the folder source decodes files (the Encoder's PIL input
    goes through here too, so its rows equal extract's)."""
    im.draft(None, (size, size))  # JPEG: decode at a reduced scale that is still >= size (a no-op for other formats)
    rgb = _upright(im)
    w, h = rgb.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR, box=box))


def _upright(im: Image.Image) -> Image.Image:
    """RGB, turned as its EXIF orientation says."""
    if "exif" in im.info or im.format == "TIFF":
        im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def orientation(im: Image.Image) -> int:
    """The EXIF orientation of an opened image, read from the header only: 1 as stored, 2-8 flipped or turned."""
    return im.getexif().get(0x0112, 1) if "exif" in im.info or im.format == "TIFF" else 1


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as shown, after its EXIF orientation (read from the header only)."""
    w, h = im.size
    return (h, w) if orientation(im) in (5, 6, 7, 8) else (w, h)


def crop_boxes(width: int, height: int, plan: list[tuple[int, float, float]], u: np.ndarray) -> np.ndarray:
    """Random resized crop boxes (V, 4) as (left, top, right, bottom) in pixels of a width x height image, one per
    view of `plan` ((out size, min area, max area) each) from the uniforms u (V, 4): augment.crop_box's draw."""
    t = torch.from_numpy(u).double()
    lo = torch.tensor([p[1] for p in plan], dtype=torch.float64)
    hi = torch.tensor([p[2] for p in plan], dtype=torch.float64)
    top, left, h, w = crop_box(t[:, 0], t[:, 1], t[:, 2], t[:, 3], height, width, lo, hi)
    return torch.stack([left, top, left + w, top + h], 1).numpy()


def decode_crops(data: bytes, suffix: str, plan: list[tuple[int, float, float]], u: np.ndarray) -> list[torch.Tensor]:
    """One encoded image -> one uint8 (3, size, size) random resized crop per view of `plan`, each cut from the
    full-resolution image and resized with antialiasing (cut_box). The boxes come from the uniforms u (V, 4) alone
    (see crop_boxes).

    A JPEG is decoded at the smallest DCT scale that keeps every box at least its output size (Pillow's draft). When
    that is full scale (the common case: no box is twice its output size), an RGB or gray JPEG is decoded by
    torchvision.io instead: the same libjpeg-turbo pixels, handed over as a tensor without Pillow's copy (one 500x375
    JPEG cut into two 224 px views: 3.6 -> 2.5 ms). Anything it cannot read goes to Pillow, whose errors are clearer."""
    with Image.open(io.BytesIO(data), formats=formats_for(suffix)) as im:
        width, height = upright_size(im)
        boxes = crop_boxes(width, height, plan, u)
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        factor = max(1.0, float(min(sides / np.array([p[0] for p in plan]))))  # the largest reduction allowed
        image = _torchvision_jpeg(data) if im.format == "JPEG" and im.mode in ("RGB", "L") and factor < 2 else None
        if image is None:
            im.draft(None, (math.ceil(im.size[0] / factor), math.ceil(im.size[1] / factor)))
            image = torch.from_numpy(np.array(_upright(im))).permute(2, 0, 1)  # (3, h, w), channels last in memory
    scale = np.array([image.shape[2] / width, image.shape[1] / height] * 2)
    return [cut_box(image, box * scale, p[0]) for p, box in zip(plan, boxes)]


def _torchvision_jpeg(data: bytes) -> torch.Tensor | None:
    """A JPEG -> uint8 (3, H, W) RGB, upright (EXIF), by torchvision.io; None when it cannot decode it or has no
    decoder (deprecated since torchvision 0.29 in favour of TorchCodec: silenced here, and Pillow once it is gone)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               apply_exif_orientation=True)  # fmt: skip
    except (ImportError, RuntimeError):
        return None


def cut_box(image: torch.Tensor, box: np.ndarray, side: int) -> torch.Tensor:
    """The box (left, top, right, bottom; rounded to whole pixels, at least one) of uint8 (3, H, W) resized to uint8
    (3, side, side): bilinear with antialiasing; on a CPU torch's uint8 kernel (Pillow's filter, a few times faster),
    elsewhere in float32, rounded (there is no uint8 kernel there)."""
    left, top, right, bottom = (int(round(c)) for c in box)
    crop = image[None, :, top : max(bottom, top + 1), left : max(right, left + 1)]
    if crop.device.type == "cpu":
        return F.interpolate(crop, size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
    out = F.interpolate(crop.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)
