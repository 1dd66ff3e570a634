"""Decode any image value a dataset may hold into an RGB PIL image, with errors that name the row."""

from __future__ import annotations

import io
import logging
import os
import zlib
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names the row, column and what to do."""


def _describe(row: int | None, column: str) -> str:
    return f"column {column!r}" + (f", row {row}" if row is not None else "")


def to_rgb(value: Any, row: int | None = None, column: str = "image") -> Image.Image:
    """Turn a PIL image, a path, bytes, a `{"bytes", "path"}` dict or an HxW(xC) array into RGB.

    Files, bytes and dicts are decoded by `datasets.Image().decode_example`, exactly as a dataset's image
    column decodes them (EXIF orientation applied: a phone photo stored sideways comes out upright), so a
    row read as `ds[i]["image"]` and the same row decoded here give identical pixels. A PIL image that still
    carries an EXIF orientation (opened with `PIL.Image.open`) is turned upright the same way. A damaged
    EXIF block never fails decoding: the image is then used as stored, with a warning.

    Mode conversions handled: CMYK, RGBA/LA (composited on white), palette, 16-bit and 32-bit greyscale
    (scaled from the format's range, 0..65535 for 16-bit, to 0..255: brightness is kept, never stretched per
    image), float greyscale (0..1, or 0..255 when values exceed 1), 1-bit and greyscale.

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
    except Image.DecompressionBombError as err:
        raise BadImageError(
            f"Refused to decode the image in {where}: {err} The limit is PIL.Image.MAX_IMAGE_PIXELS "
            f"(now {Image.MAX_IMAGE_PIXELS} pixels; images over twice that are refused as possible decompression "
            "bombs). If you trust the file, raise it before loading, e.g. `PIL.Image.MAX_IMAGE_PIXELS = "
            "400_000_000` (None disables the check), or downscale the image, or pass `on_bad_image='skip'`."
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, zlib.error) as err:
        raise BadImageError(
            f"Cannot decode the image in {where}: {err}. Fix or remove that file, or pass "
            "`on_bad_image='skip'` to skip such rows (they are counted and reported)."
        ) from err
    if image.width < 1 or image.height < 1:
        raise BadImageError(f"The image in {where} is empty ({image.width}x{image.height}).")
    return _convert(image)


def _open(value: Any, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return _upright(value, where)
    if isinstance(value, dict):
        if value.get("bytes"):
            return _decode_like_datasets({"bytes": value["bytes"], "path": None}, where)
        if value.get("path"):
            value = value["path"]
        else:
            raise BadImageError(f"The image in {where} has neither bytes nor a path.")
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if "://" in path and not path.startswith("hf://"):
            raise BadImageError(
                f"The image in {where} is a URL ({path!r}); images are never downloaded at run time. Download "
                "them first and point the column at the local files (or embed the bytes, e.g. with "
                "`datasets.Image()` and `save_to_disk` on a machine that can reach them)."
            )
        if "://" not in path and not os.path.isfile(path):
            raise BadImageError(
                f"The image file {path!r} in {where} does not exist. Check the path "
                "(relative paths are resolved against the data file's folder)."
            )
        return _decode_like_datasets({"bytes": None, "path": path}, where)
    if isinstance(value, (bytes, bytearray)):
        return _decode_like_datasets({"bytes": bytes(value), "path": None}, where)
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if value is None:
        raise BadImageError(f"The image in {where} is missing (None).")
    raise BadImageError(f"The value in {where} is a {type(value).__name__}, not an image.")


def _decode_like_datasets(value: dict[str, Any], where: str) -> Image.Image:
    """`datasets.Image().decode_example(value)`: the library's own decoding (EXIF orientation included).

    When it fails, the file is opened plainly: if that fails too, the image itself is broken (the caller
    turns the error into a `BadImageError`); if it works, only the EXIF step failed, and the image is used
    as stored, with a warning.
    """
    from datasets import Image as ImageFeature

    try:
        return ImageFeature().decode_example(value)
    except Image.DecompressionBombError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised below unless only the EXIF step failed
        fallback = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        fallback.load()  # a broken image raises here, with PIL's own message
        logger.warning(
            "The EXIF block of the image in %s is damaged (%s: %s): using the image as stored, without "
            "turning it by its EXIF orientation.", where, type(err).__name__, err,
        )
        return fallback


def _upright(image: Image.Image, where: str) -> Image.Image:
    """`image` turned by its EXIF orientation, as `datasets.Image` decodes files (a no-op without one)."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation) is None:
            return image
        return ImageOps.exif_transpose(image)
    except Exception as err:  # noqa: BLE001 - damaged EXIF: keep the image as stored
        logger.warning(
            "The EXIF block of the image in %s is damaged (%s: %s): using the image as stored.",
            where, type(err).__name__, err,
        )
        return image


#: The full-scale value of each integer/float greyscale mode: pixel values are divided by it, times 255.
_FULL_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def _convert(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _FULL_SCALE or image.mode == "F":
        # Keep brightness relative to the format's range (a light-grey 16-bit scan stays light grey); no
        # per-image min..max stretch. Mode "I" (what older Pillow gives 16-bit PNGs) is read as 16-bit.
        array = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            full_scale = 1.0 if np.nanmax(array, initial=0.0) <= 1.0 else 255.0
        else:
            full_scale = _FULL_SCALE[image.mode]
        scaled = np.clip(np.nan_to_num(array) / full_scale, 0.0, 1.0) * 255.0
        return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")
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
