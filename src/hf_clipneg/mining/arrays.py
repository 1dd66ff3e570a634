"""The miner's numpy inputs: feature matrices read and checked, unit-normed rows, group and caption codes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset

from .._captions import normalise_caption


def as_float_matrix(values: Any, name: str) -> np.ndarray:
    """`values` as a C-contiguous (N, d) float32 array; NaN rows are kept (they mark skipped rows).

    Raises TypeError for ragged or non-numeric values, ValueError for another shape or any inf.
    """
    array = np.asarray(values)
    if array.dtype == object:
        raise TypeError(f"{name} must be an (N, d) numeric array; got ragged or non-numeric values.")
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dims), got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"{name} must be numeric, got dtype {array.dtype}.")
    array = np.ascontiguousarray(array, dtype=np.float32)
    # inf is not a marker of a skipped row (NaN is): it is a bug upstream.
    infinite = np.flatnonzero(_row_test(array, lambda block: np.isinf(block).any(1)))
    if infinite.size:
        raise ValueError(f"{name} has inf values in rows {infinite[:10].tolist()}: recompute those features.")
    return array


def _row_test(array: np.ndarray, test: Any, block: int = 65_536) -> np.ndarray:
    """(N,) bool `test` of row blocks: no N x d temporary (that would be 384 MB at 1M x 384)."""
    if not len(array):
        return np.zeros(0, dtype=bool)
    return np.concatenate([test(array[start : start + block]) for start in range(0, len(array), block)])


def finite_rows(array: np.ndarray) -> np.ndarray:
    """(N,) bool: rows with no NaN or inf."""
    return _row_test(array, lambda block: np.isfinite(block).all(1))


def may_overwrite(array: np.ndarray, given: Any, owned: bool) -> bool:
    """True when `array` is ours to normalise in place: a writable array we created, not the caller's
    memory (a view of a caller's array, memmap or tensor has owndata False)."""
    if not array.flags.writeable:
        return False
    return owned or (array is not given and array.flags.owndata)


def normalise_rows(features: np.ndarray, valid: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Unit-norm `features` (float32); invalid (NaN) rows become zeros.

    Works in place when `in_place` (the caller owns the array); otherwise copies, unless every row is
    valid and unit-norm already, in which case `features` itself is returned.
    """
    norms = np.sqrt(np.einsum("nd,nd->n", features, features))  # NaN in invalid rows
    norms[~valid] = 1.0
    zero = np.flatnonzero(norms <= 1e-12)
    if zero.size:
        raise ValueError(f"Features are all zero in rows {zero[:10].tolist()}: recompute them.")
    if not in_place and valid.all() and np.abs(norms - 1.0).max(initial=0.0) <= 1e-5:
        return features
    out = features if in_place else np.array(features, dtype=np.float32, copy=True)
    if not valid.all():
        out[~valid] = 0.0
    for start in range(0, len(out), 65_536):
        out[start : start + 65_536] /= norms[start : start + 65_536, None]
    return out


def group_codes(groups: Any, n_rows: int | None = None, column: str = "group") -> np.ndarray:
    """(N,) int64 codes of a group column: equal values share a code (in order of first appearance), a
    missing value (None, NaN) gets -1 (a group of its own: never the same group as another row).

    Values may be of any hashable type: strings ("SKU-000", "Wallets|Grey|Women"), integers, ... Computed
    once for a whole dataset, so codes agree across batches and processes.

    Example:
        >>> group_codes(["SKU-1", "SKU-2", None, "SKU-1"]).tolist()
        [0, 1, -1, 0]
    """
    values = groups.tolist() if isinstance(groups, np.ndarray) else list(groups)
    if n_rows is not None and len(values) != n_rows:
        raise ValueError(f"The group column {column!r} has {len(values)} values for {n_rows} rows.")
    codes = np.full(len(values), -1, dtype=np.int64)
    seen: dict[Any, int] = {}
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        try:
            codes[i] = seen.setdefault(value, len(seen))
        except TypeError:
            raise TypeError(
                f"The group column {column!r} holds {value!r} (a {type(value).__name__}) in row {i}, which cannot be "
                "a group value: use one scalar per row (a string or an integer id)."
            ) from None
    return codes



def caption_codes(captions: Any, n_rows: int) -> np.ndarray:
    """(N,) int64 codes: captions equal after :func:`~hf_clipneg._captions.normalise_caption` share a code.

    Example:
        >>> caption_codes(["A cat", "a  cat", "dog"], 3).tolist()
        [0, 0, 1]
    """
    values = list(captions)
    if len(values) != n_rows:
        raise ValueError(f"The caption column has {len(values)} values for {n_rows} rows.")
    seen: dict[str, int] = {}
    return np.fromiter((seen.setdefault(normalise_caption(v), len(seen)) for v in values), dtype=np.int64, count=n_rows)


def feature_matrix(dataset: Dataset, column: str) -> np.ndarray:
    """(N, d) float32 array of a list-of-floats `column`, read through Arrow without a Python list per row.

    Raises TypeError for a column that does not hold lists, ValueError for null rows or unequal lengths.
    """
    values = dataset.with_format("arrow")[column]
    if isinstance(values, pa.Table):
        values = values.column(0)
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type)):
        raise TypeError(f"Column {column!r} must hold lists of floats, got {values.type}.")
    if values.null_count:
        nulls = np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))
        raise ValueError(f"Column {column!r} is missing (null) in rows {nulls[:10].tolist()}.")
    lengths = np.asarray(pa.compute.list_value_length(values).to_numpy(zero_copy_only=False))
    if lengths.size and (lengths != lengths[0]).any():
        bad = np.flatnonzero(lengths != lengths[0])
        raise ValueError(
            f"Column {column!r} has vectors of different lengths ({lengths[0]} in row 0, {lengths[bad[0]]} in row "
            f"{bad[0]}): all rows must come from the same tower."
        )
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(values), int(lengths[0]) if lengths.size else 0)
