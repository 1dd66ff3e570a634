"""Decode any image value a dataset may hold into an RGB PIL image, with errors that name the row."""

from __future__ import annotations

import io
import os
import zlib
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names the row, column and what to do."""


def _describe(row: int | None, column: str) -> str:
    return f"column {column!r}" + (f", row {row}" if row is not None else "")


def to_rgb(value: Any, row: int | None = None, column: str = "image") -> Image.Image:
    """Turn a PIL image, a path, bytes, a `{"bytes", "path"}` dict or an HxW(xC) array into RGB.

    Mode conversions handled: CMYK, RGBA/LA (composited on white), palette, 16-bit and 32-bit
    greyscale (rescaled to 8 bits), 1-bit and greyscale.

    Example:
        >>> from PIL import Image
        >>> to_rgb(Image.new("CMYK", (4, 3))).mode
        'RGB'
    """
    where = _describe(row, column)
    try:
        image = _open(value, where)
        image.load()
    except BadImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, zlib.error) as err:
        raise BadImageError(
            f"Cannot decode the image in {where}: {err}. Fix or remove that file, or pass "
            "`on_bad_image='skip'` to skip such rows (they are counted and reported)."
        ) from err
    if image.width < 1 or image.height < 1:
        raise BadImageError(f"The image in {where} is empty ({image.width}x{image.height}).")
    return _convert(image)


def _open(value: Any, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            value = value["path"]
        else:
            raise BadImageError(f"The image in {where} has neither bytes nor a path.")
    if isinstance(value, (str, os.PathLike)):
        if not os.path.isfile(value):
            raise BadImageError(
                f"The image file {os.fspath(value)!r} in {where} does not exist. Check the path "
                "(relative paths are resolved against the data file's folder)."
            )
        return Image.open(value)
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if value is None:
        raise BadImageError(f"The image in {where} is missing (None).")
    raise BadImageError(f"The value in {where} is a {type(value).__name__}, not an image.")


def _convert(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def without_image_decoding(dataset: Any, column: str = "image") -> Any:
    """`dataset` with its `datasets.Image` column left undecoded (`{"bytes", "path"}` dicts), so that
    `to_rgb` decodes each value and a corrupt file raises an error naming its row instead of a bare
    PIL error from inside datasets. Datasets without such a column are returned as they are.

    Example:
        >>> from datasets import Dataset, Image as ImageFeature
        >>> ds = Dataset.from_dict({"image": [None]}).cast_column("image", ImageFeature())
        >>> without_image_decoding(ds).features["image"].decode
        False
    """
    from datasets import Image as ImageFeature

    feature = getattr(dataset, "features", {}).get(column) if hasattr(dataset, "features") else None
    if isinstance(feature, ImageFeature) and feature.decode:
        return dataset.cast_column(column, ImageFeature(decode=False))
    return dataset
