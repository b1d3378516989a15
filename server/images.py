"""Decoding untrusted images for /predict: base64 or raw bytes -> uint8 array [H, W, C].

Only a short list of PIL plugins may open request bytes; the pixel count is checked on the
header before anything is decoded; only the first frame of an animation is used. Every
mode becomes 8-bit L or RGB the way the data-set store converts training images
(storage.datasets): 16/32-bit and float greyscale are scaled to 8 bits, transparency is
composited on black, palette/CMYK/YCbCr/LAB/HSV become RGB. A task trained on greyscale
images gets greyscale (a colour image is converted to L), a colour task gets RGB (a
greyscale image is replicated, as `models.preprocess` replicates one channel).
"""
from __future__ import annotations

import base64
import binascii
import functools
import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from munet.storage.datasets import flatten_image

MAX_PIXELS = 40_000_000
_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "ICO")
_DATA_URL = re.compile(r"^data:[a-zA-Z0-9.+/-]*(;[a-zA-Z0-9=.+-]+)*;base64,")


class ImageError(ValueError):
    """An image a request sent that cannot be used; the message names the problem."""


@functools.cache
def _formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in _FORMATS if f in Image.OPEN)


def b64decode(text: str, what: str = "image") -> bytes:
    """Standard or URL-safe base64, optionally a data URL (`data:image/png;base64,...`)."""
    if not isinstance(text, str):
        raise ImageError(f"{what} must be a base64 string")
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end():]
    text = "".join(text.split())  # line breaks of MIME-style base64
    if not text:
        raise ImageError(f"{what} is empty")
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{what} is not valid base64") from None


def open_image(data: bytes, what: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Parse only the header: a lazy PIL image whose size is checked against `max_pixels`."""
    if not data:
        raise ImageError(f"{what} is empty")
    try:
        im = Image.open(io.BytesIO(data), formats=_formats())
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not an image in a supported format "
                         "(PNG, JPEG, GIF, BMP, TIFF, WebP, PPM, TGA or ICO)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{what} has more than {max_pixels:,} pixels") from None
    except Exception as exc:  # noqa: BLE001 - header parsers raise many types on hostile input
        raise ImageError(f"{what} is not a readable image ({type(exc).__name__})") from None
    w, h = im.size
    if w < 1 or h < 1:
        im.close()
        raise ImageError(f"{what} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        im.close()
        raise ImageError(f"{what} has {w}x{h} pixels, more than the {max_pixels:,} allowed")
    return im


def to_array(im: Image.Image, channels: int = 3, what: str = "image") -> np.ndarray:
    """Decode the first frame of an opened image -> uint8 [H, W, channels] (1 or 3)."""
    with im:
        try:
            im.seek(0)
            im.load()  # the first frame only
            # The data-set store's own conversion: served images look like trained ones.
            flat = flatten_image(im, "L" if channels == 1 else "RGB")
            pixels = np.asarray(flat, dtype=np.uint8)
        except Image.DecompressionBombError:
            raise ImageError(f"{what} has too many pixels") from None
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data surfaces here, in many types
            raise ImageError(f"{what} could not be decoded ({type(exc).__name__}: {str(exc)[:120]})") from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return np.ascontiguousarray(pixels)


def decode(data: bytes, channels: int = 3, what: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 [H, W, channels] (channels 1 or 3)."""
    return to_array(open_image(data, what, max_pixels), channels, what)


