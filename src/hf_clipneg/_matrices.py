"""Validation of embedding matrices given by users (numpy or torch), shared by metrics and the TLDR heads."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_float_matrix(
    values: Any,
    name: str,
    *,
    dim: int | None = None,
    allow_vector: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return `values` as a 2-D floating tensor (half precision upcast to float32), or raise an error that names
    `name` and the first bad row: non-numeric dtype, wrong rank, empty, wrong width `dim`, NaN or inf.

    With `allow_vector` a 1-D input is read as one row.

    Example:
        >>> as_float_matrix([[1, 2], [3, 4]], "embeds").dtype
        torch.float32
    """
    if isinstance(values, torch.Tensor):
        tensor = values.detach()
    else:
        try:
            array = np.asarray(values)
        except ValueError as err:  # ragged nested lists
            raise TypeError(f"{name} must be a matrix of numbers: {err}") from err
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TypeError(f"{name} must hold numbers (a numeric matrix), got dtype {array.dtype}.")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers (a numeric matrix), got dtype {tensor.dtype}.")
    if allow_vector and tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x dimension), got shape {tuple(tensor.shape)}.")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)}); it needs at least one row of numbers.")
    if dim is not None and tensor.shape[1] != dim:
        raise ValueError(f"{name} has {tensor.shape[1]} features per row, expected {dim}.")
    if device is not None:
        tensor = tensor.to(device)
    if not tensor.is_floating_point() or tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    bad_rows = (~torch.isfinite(tensor)).any(dim=1).nonzero().flatten()
    if len(bad_rows):
        raise ValueError(
            f"{name} row {int(bad_rows[0])} contains NaN or inf ({len(bad_rows)} such rows in all). Check the model's "
            "outputs (a diverged model, or fp16 overflow), or remove or re-encode those rows."
        )
    return tensor
