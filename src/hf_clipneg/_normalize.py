"""Scale the rows of a matrix to unit length: the one L2 normaliser for numpy arrays and torch tensors."""

from __future__ import annotations

import sys
from typing import TypeVar

import numpy as np

Rows = TypeVar("Rows")


def l2_normalize(rows: Rows, name: str = "rows", *, eps: float = 0.0, hint: str = "") -> Rows:
    """`rows` (an ``(N, D)`` numpy array or torch tensor) divided by their L2 norms; a zero row raises.

    The result has the type, dtype and device of `rows` (a float input stays float; callers choose the
    precision before calling). A row whose norm is at most `eps` has no direction, so its cosine is
    undefined: it raises a `ValueError` naming `name`, the first such row and how many there are, followed
    by `hint` (what the caller's user should do). NaN rows are not checked here.

    Example:
        >>> import numpy as np
        >>> l2_normalize(np.array([[3.0, 4.0]], dtype=np.float32))
        array([[0.6, 0.8]], dtype=float32)
        >>> l2_normalize(np.zeros((2, 2)), "queries")
        Traceback (most recent call last):
        ...
        ValueError: queries row 0 is the zero vector (2 such rows in all); it has no direction, so cosine similarity is undefined.
    """
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; numpy-only callers never import it
    if torch is not None and isinstance(rows, torch.Tensor):
        norms = rows.norm(dim=1, keepdim=True)
        zero = (norms.squeeze(1) <= eps).nonzero().flatten().tolist()
    else:
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        zero = np.flatnonzero(norms[:, 0] <= eps).tolist()
    if zero:
        raise ValueError(
            f"{name} row {zero[0]} is the zero vector ({len(zero)} such rows in all); it has no direction, so cosine "
            f"similarity is undefined.{' ' + hint if hint else ''}"
        )
    return rows / norms


__all__ = ["l2_normalize"]
