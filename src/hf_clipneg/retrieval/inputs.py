"""Checks of what callers hand `ClipNegRetriever` (targets, ids, texts, vectors) and batching of image inputs.

Every check raises an error naming the offending row or value, before any model or faiss work starts.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from hf_clipneg._normalize import l2_normalize
from hf_clipneg.data import without_image_decoding

from .faiss_index import IndexType


def prepare_vectors(vectors: Any, name: str, dim: int) -> np.ndarray:
    """`vectors` (one vector or an ``(N, dim)`` matrix, numpy or torch) as contiguous float32 unit rows.

    Raises a TypeError for non-numeric input and a ValueError for an empty matrix, another dimension than
    `dim`, a row with NaN or inf, or a zero row (`name` is named in each message).

    Example:
        >>> prepare_vectors([3.0, 4.0], "queries", dim=2)
        array([[0.6, 0.8]], dtype=float32)
    """
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().to("cpu", torch.float32).numpy()
    matrix = np.asarray(vectors)
    if matrix.dtype == object or not np.issubdtype(matrix.dtype, np.number):
        raise TypeError(f"{name} must be a numeric matrix, got dtype {matrix.dtype}.")
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, {dim}) matrix, got shape {matrix.shape}.")
    if matrix.shape[1] != dim:
        raise ValueError(f"{name} have dimension {matrix.shape[1]} but the model embeds into {dim} dimensions.")
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if len(bad):
        raise ValueError(f"{name} row {bad[0]} contains NaN or inf ({len(bad)} such rows in all).")
    return l2_normalize(matrix, name)


def check_target(target: str) -> str:
    """`target` itself when it names a collection ("images" or "texts"); anything else raises a ValueError."""
    if target not in ("images", "texts"):
        raise ValueError(f"target must be 'images' or 'texts', got {target!r}.")
    return target


def coerce_index_type(value: str | IndexType) -> IndexType:
    """`value` as an `IndexType` (strings in any case); an unknown kind raises a ValueError listing the kinds."""
    try:
        return IndexType(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"index_type must be one of {[t.value for t in IndexType]}, got {value!r}.") from None


def check_batch_size(batch_size: int) -> None:
    """Raise a ValueError unless `batch_size` is a positive int (not a bool)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def check_ids(ids: Sequence[Hashable] | None, n: int) -> list[Hashable]:
    """`ids` as a list of `n` unique hashable ids (``0..n-1`` when None); a bad, missing or repeated id raises.

    Example:
        >>> check_ids(None, 3), check_ids(("a", "b"), 2)
        ([0, 1, 2], ['a', 'b'])
    """
    if ids is None:
        return list(range(n))
    ids = ids.tolist() if isinstance(ids, (np.ndarray, torch.Tensor)) else list(ids)
    if len(ids) != n:
        raise ValueError(f"Got {len(ids)} ids for {n} vectors; give exactly one id per item.")
    seen: dict[Hashable, int] = {}
    for row, item_id in enumerate(ids):
        if not isinstance(item_id, Hashable) or item_id is None:
            raise TypeError(f"id row {row} ({item_id!r}) cannot be used as an id; use strings or integers.")
        if item_id in seen:
            raise ValueError(f"id {item_id!r} appears at rows {seen[item_id]} and {row}; ids must be unique.")
        seen[item_id] = row
    return ids


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """`texts` (one string or several) as a non-empty list of non-blank strings; anything else raises."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("No texts to embed: the input is empty.")
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"Text row {row} is a {type(text).__name__}, not a string.")
        if not text.strip():
            raise ValueError(f"Text row {row} is empty; remove it or give it some words.")
    return texts


def _is_single_image(value: Any) -> bool:
    return isinstance(value, (Image.Image, str, os.PathLike, bytes, bytearray)) or (
        isinstance(value, np.ndarray) and value.ndim in (2, 3) and value.dtype != object
        and (value.ndim == 2 or value.shape[-1] in (1, 3, 4))
    )


def count_images(images: Any) -> int | None:
    """How many images `images` holds (1 for a single image), or None for an iterable without a length."""
    try:
        return 1 if _is_single_image(images) else len(images)
    except TypeError:
        return None


def image_batches(images: Any, batch_size: int, image_column: str) -> Iterable[tuple[int, list[Any]]]:
    """Yield ``(first_row, values)`` batches from a list, a single image or a `datasets.Dataset` column."""
    from datasets import Dataset

    if isinstance(images, Dataset):
        if image_column not in images.column_names:
            raise KeyError(
                f"The dataset has no column {image_column!r} (columns: {images.column_names}); pass image_column=..."
            )
        column = without_image_decoding(images.select_columns([image_column]), image_column)
        for start in range(0, len(column), batch_size):
            yield start, column[start : start + batch_size][image_column]
        return
    if _is_single_image(images):
        images = [images]
    batch: list[Any] = []
    start = 0
    for value in images:
        batch.append(value)
        if len(batch) == batch_size:
            yield start, batch
            start += len(batch)
            batch = []
    if batch:
        yield start, batch
