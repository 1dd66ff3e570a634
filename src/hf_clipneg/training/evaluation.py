"""What the trainer's evaluation computes from the embeddings: relevance groups and the whole-set loss."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..metrics import groups_from_captions
from ..mining import group_codes


def eval_groups(dataset: Any, column: str | None, caption_column: str) -> list[Any]:
    """One relevance label per eval row: the value of `column` (`retrieval_group_column`: any type; a row
    without a value is a group of its own), or, with `column=None`, the normalised caption.

    Raises:
        KeyError: `column` is not a column of `dataset`.
    """
    if column is not None:
        if column not in dataset.column_names:
            raise KeyError(
                f"retrieval_group_column {column!r} is not a column of the eval dataset (columns: "
                f"{dataset.column_names})."
            )
        values = dataset.select_columns([column]).with_format("arrow")[column]
        values = (values.column(0) if hasattr(values, "column") else values).to_pylist()
        codes = group_codes(values, len(values), column=column)
        # a missing value is a group of its own: codes past the used ones, one per such row
        missing = np.flatnonzero(codes < 0)
        codes[missing] = codes.max(initial=-1) + 1 + np.arange(missing.size)
        return codes.tolist()
    return groups_from_captions(dataset[caption_column])


def whole_set_clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                        chunk_size: int = 4096) -> float:
    """The plain CLIP loss of N pairs with all N - 1 other rows as negatives (`weighted_contrastive_loss`
    without weights), computed in row chunks so no N x N matrix is held at once."""
    if len(image_embeds) == 0:
        return float("nan")
    images = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    texts = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    scale = logit_scale.exp().to(images.device)
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    for queries, gallery in ((images, texts), (texts, images)):
        for start in range(0, len(queries), chunk_size):
            logits = scale * queries[start : start + chunk_size] @ gallery.T
            labels = torch.arange(start, start + len(logits), device=logits.device)
            total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
    return float(total / (2 * len(images)))
