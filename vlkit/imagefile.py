"""Decoding image files and bytes: the one step every path that reads an image shares (dataset kinds and the
pipeline's workers, probes, `compose run`, `serve`, export's verification inputs).

`open_image` decodes a file or bytes once and returns the PIL image in its own mode (RGB, L, RGBA, P, CMYK,
I;16, ...) with its metadata (a palette's transparency, ...). It converts nothing: the backbone's own transform
(`Backbone.image_transform`: open_clip's preprocess, the transformers image processor, torchvision's for `tiny`)
does all of the preprocessing, mode conversion included, exactly as its library does on `Image.open(file)`.

What decoding applies, once per file:

- the EXIF orientation tag (`ImageOps.exif_transpose`, as `datasets.Image` decoding does): photos come upright.
  open_clip's preprocess and transformers' image processors do not transpose a PIL image they are given, so on a
  file with an orientation tag other than 1 vlkit's input is the library's preprocessing of the upright image;
- a full decode (`load()`): a truncated or corrupt file fails here, with its name, not later in a model;
- the pixel limit: `max_pixels` when given (`vlkit serve --max-pixels`), and always PIL's decompression-bomb
  limit (`Image.MAX_IMAGE_PIXELS`, twice of which is refused before decoding).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from .errors import DataError

ORIENTATION = 0x0112


class ImageDecodeError(DataError):
    """Bytes or a file that are no readable image; `too_large` when refused for their pixel count."""

    def __init__(self, message: str, *, too_large: bool = False):
        super().__init__(message)
        self.too_large = bool(too_large)


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of an image file; ImageDecodeError naming the file when it is missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise ImageDecodeError(f"image file {p}: not found")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"image file {p}: {exc.strerror or exc}") from None


def open_image(source: bytes | bytearray | memoryview | str | os.PathLike, *, max_pixels: int | None = None):
    """The decoded PIL image of image bytes or a file, in its own mode, upright (see the module docstring).

    ImageDecodeError (a DataError) for an empty, unknown, truncated or corrupt image, or one over `max_pixels`
    (then `too_large` is set); the message names the file when `source` is a path."""
    from PIL import Image

    label = ""
    if isinstance(source, (str, os.PathLike)):
        label = f"image file {source}: "
        data = read_image_bytes(source)
    else:
        data = bytes(source)
    if not data:
        raise ImageDecodeError(f"{label}the image is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if max_pixels is not None and w * h > int(max_pixels):
            raise ImageDecodeError(
                f"{label}the image is {w}x{h} = {w * h:,} pixels, over the limit of {int(max_pixels):,}", too_large=True
            )
        im.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            f"{label}the image is over PIL's decompression-bomb limit ({_one_line(exc)})", too_large=True
        ) from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad bytes
        from PIL import UnidentifiedImageError

        reason = "not a known image format" if isinstance(exc, UnidentifiedImageError) else _one_line(exc)
        raise ImageDecodeError(f"{label}not a readable image ({reason})") from None
    return upright(im)


def upright(im: Any):
    """`im` turned by its EXIF orientation tag (itself when it has none, or 1); mode and metadata kept."""
    try:
        orientation = im.getexif().get(ORIENTATION)
    except Exception:  # unreadable EXIF: the pixels are still the image
        return im
    if orientation in (None, 1):
        return im
    from PIL import ImageOps

    return ImageOps.exif_transpose(im)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__
