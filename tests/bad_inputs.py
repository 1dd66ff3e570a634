"""The bad-input corpus of the reliability tests, generated on the fly (nothing is downloaded).

Each image case writes one file into a folder and says whether the library must convert it
(``convertible``) or refuse it (``undecodable``). Caption and feature cases are plain values.

    >>> import tempfile
    >>> case = IMAGE_CASES["cmyk_jpeg"]
    >>> path = case.write(tempfile.mkdtemp())
    >>> path.endswith(".jpg"), case.convertible
    (True, True)
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image


def _gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image with structure (so JPEG/PNG encoders produce non-trivial streams)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    noise = rng.integers(0, 32, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb_png(width: int = 24, height: int = 24, seed: int = 0) -> bytes:
    return _encode(Image.fromarray(_gradient(width, height, seed)), "PNG")


def rgb_jpeg(width: int = 48, height: int = 48, seed: int = 0) -> bytes:
    return _encode(Image.fromarray(_gradient(width, height, seed)), "JPEG", quality=90)


def truncated_jpeg() -> bytes:
    data = rgb_jpeg(64, 64)
    return data[: len(data) // 2]  # cut mid-scan: no EOI marker, missing entropy-coded data


def truncated_png() -> bytes:
    data = rgb_png(64, 64)
    return data[: len(data) // 2]  # IDAT cut in half, no IEND


def corrupt_jpeg() -> bytes:
    data = bytearray(rgb_jpeg(64, 64))
    # Keep SOI, smash the frame header (SOF) and the quantisation tables: the header cannot be parsed.
    for i in range(20, min(len(data), 400)):
        data[i] = 0xFF if i % 2 else 0x00
    return bytes(data)


def corrupt_png() -> bytes:
    data = bytearray(rgb_png(64, 64))
    start = data.find(b"IDAT") + 4
    for i in range(start, start + 40):  # garbage in the zlib stream (and a wrong CRC)
        data[i] ^= 0x5A
    return bytes(data)


def text_as_jpg() -> bytes:
    return b"this is a text file, not a JPEG\nsecond line\n"


def cmyk_jpeg() -> bytes:
    return _encode(Image.fromarray(_gradient(32, 32)).convert("CMYK"), "JPEG")


def rgba_png() -> bytes:
    rgba = np.concatenate([_gradient(32, 32), np.full((32, 32, 1), 128, np.uint8)], -1)
    rgba[:8, :8, 3] = 0  # a fully transparent corner
    return _encode(Image.fromarray(rgba, "RGBA"), "PNG")


def palette_png(transparency: bool = False) -> bytes:
    image = Image.fromarray(_gradient(32, 32)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    kwargs = {"transparency": 0} if transparency else {}
    return _encode(image, "PNG", **kwargs)


def grey16_png() -> bytes:
    values = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    return _encode(Image.fromarray(values), "PNG")


def grey_png() -> bytes:
    return _encode(Image.fromarray(_gradient(32, 32)[..., 0], "L"), "PNG")


def one_by_one_png() -> bytes:
    return _encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG")


def wide_png() -> bytes:
    """10000 x 10: an extreme aspect ratio (the processor resizes it to a square)."""
    return _encode(Image.fromarray(_gradient(10000, 10)), "PNG")


@dataclass(frozen=True)
class ImageCase:
    """One generated image file: `convertible` ones must load as RGB, the others must be refused."""

    name: str
    suffix: str
    make: Callable[[], bytes]
    convertible: bool
    mode: str | None = None  # the PIL mode the file opens as (convertible cases)

    def write(self, folder: str | os.PathLike) -> str:
        path = os.path.join(os.fspath(folder), f"{self.name}{self.suffix}")
        with open(path, "wb") as handle:
            handle.write(self.make())
        return path


_CASES = [
    ImageCase("truncated_jpeg", ".jpg", truncated_jpeg, convertible=False),
    ImageCase("truncated_png", ".png", truncated_png, convertible=False),
    ImageCase("corrupt_jpeg", ".jpg", corrupt_jpeg, convertible=False),
    ImageCase("corrupt_png", ".png", corrupt_png, convertible=False),
    ImageCase("text_named_jpg", ".jpg", text_as_jpg, convertible=False),
    ImageCase("empty_file", ".png", lambda: b"", convertible=False),
    ImageCase("cmyk_jpeg", ".jpg", cmyk_jpeg, convertible=True, mode="CMYK"),
    ImageCase("rgba_png", ".png", rgba_png, convertible=True, mode="RGBA"),
    ImageCase("palette_png", ".png", palette_png, convertible=True, mode="P"),
    ImageCase("palette_transparent_png", ".png", lambda: palette_png(True), convertible=True, mode="P"),
    ImageCase("grey16_png", ".png", grey16_png, convertible=True, mode="I;16"),
    ImageCase("grey_png", ".png", grey_png, convertible=True, mode="L"),
    ImageCase("one_by_one_png", ".png", one_by_one_png, convertible=True, mode="RGB"),
    ImageCase("wide_10000x10_png", ".png", wide_png, convertible=True, mode="RGB"),
]
IMAGE_CASES: dict[str, ImageCase] = {case.name: case for case in _CASES}
UNDECODABLE = [case.name for case in _CASES if not case.convertible]
CONVERTIBLE = [case.name for case in _CASES if case.convertible]

LONG_CAPTION = " ".join(["a red striped circle with a blue dotted square"] * 230)[:10_000]
EMPTY_CAPTIONS = {"empty": "", "spaces": "   ", "tabs_newlines": "\t\n \r\n", "none": None}
# Latin-1 / CP1252 bytes and a lone continuation byte: not valid UTF-8.
NON_UTF8_CAPTION = "caf\xe9 cr\xe8me \x96 na\xefve".encode("latin-1") + b" \x80\xff"

BAD_ROW = 2  # where the tests put the bad value, so messages must say "row 2"
GOOD_ROWS = 6


def good_images(folder: str | os.PathLike, n: int = GOOD_ROWS) -> list[str]:
    """`n` valid, distinct RGB PNG files written into `folder`."""
    paths = []
    for i in range(n):
        path = os.path.join(os.fspath(folder), f"good_{i}.png")
        with open(path, "wb") as handle:
            handle.write(rgb_png(24, 24, seed=i + 1))
        paths.append(path)
    return paths


CAPTIONS = ["a red circle", "a blue square", "a green star", "a small yellow ring", "a big black cross",
            "a white striped triangle", "a pink dotted circle", "a brown checked square"]


def pairs_with(folder: str | os.PathLike, bad_path: str | None = None, n: int = GOOD_ROWS) -> dict[str, list]:
    """Columns of `n` good (image path, caption) rows; `bad_path` replaces the image of row `BAD_ROW`."""
    images = good_images(folder, n)
    if bad_path is not None:
        images[BAD_ROW] = bad_path
    return {"image": images, "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]}


def features_with(kind: str, n: int = 12, dim: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Precomputed feature columns for `n` rows, the row `BAD_ROW` spoiled by `kind` ('nan', 'inf' or
    'nan_text' = NaN only in the text features of a row with a valid image)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, dim)).astype(np.float32)
    text = rng.normal(size=(n, dim)).astype(np.float32)
    if kind == "nan":
        image[BAD_ROW] = np.nan
        text[BAD_ROW] = np.nan
    elif kind == "inf":
        image[BAD_ROW, 0] = np.inf
    elif kind == "nan_text":
        text[BAD_ROW, 1] = np.nan
    elif kind != "none":
        raise ValueError(kind)
    return {"image_features": image, "text_features": text, "caption": [f"caption {i}" for i in range(n)]}
