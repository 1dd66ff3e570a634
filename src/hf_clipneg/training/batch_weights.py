"""The in-batch weights the trainer adds to the mining rule's: the model-guided filter, copies of one row in a
gathered batch, and the warning for batches the rule leaves without negatives."""

from __future__ import annotations

import logging

import torch

from ..losses import gather_metadata
from ..mining import DEGENERATE_MASKED_FRACTION, DuplicateAction, MiningConfig, describe_evidence, model_guided_flags

logger = logging.getLogger(__name__)


def guided_weights(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, negative_weights: torch.Tensor | None, margin: float,
    gather: bool = False,
) -> torch.Tensor:
    """`negative_weights` ((B, B); None: all ones) with 0 where the model scores a negative like a positive
    (`mining.model_guided_flags` with `margin`), on the global batch when `gather` (multi-process training)."""
    if gather:
        image_embeds, text_embeds = gather_metadata(image_embeds.detach(), text_embeds.detach())
    flags = model_guided_flags(image_embeds, text_embeds, margin)
    if negative_weights is None:
        negative_weights = torch.ones(flags.shape, device=flags.device)
    return negative_weights.masked_fill(flags.to(negative_weights.device), 0.0)


def without_repeated_rows(row_index: torch.Tensor | None, weights: torch.Tensor | None) -> torch.Tensor | None:
    """Weights with 0 wherever two positions of the (gathered) batch hold the same row: accelerate pads an uneven
    last batch by repeating rows, and a row must never be its own negative. Unchanged when no row repeats (the
    plain CLIP loss keeps its fast path).

    Example:
        >>> without_repeated_rows(torch.tensor([0, 1, 0]), None).tolist()
        [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    """
    if row_index is None:
        return weights
    row_index = row_index.flatten()
    same = row_index[:, None] == row_index[None, :]
    same.fill_diagonal_(False)
    if not bool(same.any()):
        return weights
    if weights is None:
        weights = torch.ones(same.shape, device=same.device)
    return weights.masked_fill(same.to(weights.device), 0.0)


def warn_if_degenerate(
    negative_weights: torch.Tensor | None, positive_weights: torch.Tensor | None, config: MiningConfig
) -> None:
    """Warn when the rule leaves most in-batch pairs of a batch without a negative (the trainer checks its first
    training batch)."""
    if negative_weights is None or negative_weights.shape[0] < 2:
        return
    off = ~torch.eye(negative_weights.shape[0], dtype=torch.bool, device=negative_weights.device)
    masked = (negative_weights == 0) & off
    if positive_weights is not None:
        masked |= (positive_weights > 0) & off
    if config.duplicate_action is DuplicateAction.DOWNWEIGHT:
        masked |= (negative_weights <= config.downweight_factor) & off
    fraction = float(masked.sum()) / float(off.sum())
    if fraction > DEGENERATE_MASKED_FRACTION:
        logger.warning(
            "Degenerate batches: the first training batch (%d rows) has %.0f%% of its in-batch negatives "
            "masked or down-weighted by the rule (%s), so the loss is near 0 and teaches little. Check for "
            "identical or placeholder images and towers whose features are all alike (MiningStats.median_pair_"
            "image_cosine), make the evidence stricter, or train with negative_strategy='vanilla'.",
            negative_weights.shape[0], 100 * fraction, describe_evidence(config),
        )
