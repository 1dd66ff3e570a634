"""The canonical column names of loaded pairs, and vectorised tests on a column's values.

Every loader in this package renames the user's columns to these names, so later steps (features,
mining, training, retrieval) never need to be told which column holds what.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

IMAGE_COLUMN = "image"
CAPTION_COLUMN = "caption"
GROUP_COLUMN = "group"

#: Rows read per batch when a column is scanned through Arrow (images are never decoded by a scan).
SCAN_BATCH = 10_000


def blank_captions(captions: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Boolean numpy array: True where a caption is missing (null), empty or only whitespace.

    Example:
        >>> import pyarrow as pa
        >>> blank_captions(pa.array(["a cat", " ", None, ""])).tolist()
        [False, True, True, True]
    """
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(captions)), 0)
    return to_numpy(pc.fill_null(pc.or_kleene(pc.is_null(captions), blank), True)).astype(bool)


def to_numpy(array: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An Arrow array (chunked or not) as one numpy array (copied when Arrow cannot share its memory)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.to_numpy(zero_copy_only=False)
