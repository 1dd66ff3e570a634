"""The inputs every pairwise image-text loss shares: checked, gathered across processes and normalised.

`WeightedContrastiveLoss` and `SigmoidContrastiveLoss` take the same arguments (embeddings, per-pair weights,
mined texts); this module checks them with the same messages, gathers them the same way and hands back
L2-normalised float32 embeddings, so each loss only computes its own logits and terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .gather import gather_features, world_size_and_rank

__all__ = ["PairBatch", "as_float_weights", "check_positive_weights", "check_weights", "pair_batch"]


def as_float_weights(name: str, value: Tensor, like: Tensor) -> Tensor:
    """`value` on the device and in the dtype of `like`; a TypeError naming `name` for a non-tensor or complex one.

    Example:
        >>> import torch
        >>> as_float_weights("negative_weights", torch.ones(2, 2, dtype=torch.int64), torch.zeros(1)).dtype
        torch.float32
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if value.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {value.dtype}.")
    return value.to(device=like.device, dtype=like.dtype)


def check_weights(name: str, weights: Tensor, shape: tuple[int, ...], hint: str = "") -> None:
    """Raise a ValueError naming `name` unless `weights` has `shape` and only finite values >= 0.

    Example:
        >>> import torch
        >>> check_weights("mined_weights", torch.ones(2, 3), (2, 3))  # fine: returns None
        >>> check_weights("mined_weights", torch.ones(2, 2), (2, 3))
        Traceback (most recent call last):
        ...
        ValueError: mined_weights has shape (2, 2), expected (2, 3).
    """
    if tuple(weights.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(weights.shape)}, expected {shape}.{hint}")
    if not torch.isfinite(weights).all():
        bad = torch.nonzero(~torch.isfinite(weights))[0].tolist()
        raise ValueError(f"{name} contains NaN or inf (first at index {bad}); weights must be finite and >= 0.")
    if (weights < 0).any():
        bad = torch.nonzero(weights < 0)[0].tolist()
        raise ValueError(f"{name} contains negative values (first at index {bad}); weights must be >= 0.")


def check_positive_weights(positive_weights: Tensor, like: Tensor) -> Tensor:
    """`positive_weights` as a `(B, B)` float matrix like the square `like`, checked, with a positive diagonal.

    Example:
        >>> import torch
        >>> check_positive_weights(torch.zeros(2, 2), torch.zeros(2, 2))
        Traceback (most recent call last):
        ...
        ValueError: positive_weights[0, 0] must be > 0: every image's own text is a positive (put 1 on the diagonal and the extra positives elsewhere).
    """
    targets = as_float_weights("positive_weights", positive_weights, like)
    check_weights("positive_weights", targets, tuple(like.shape))
    if not (targets.diagonal() > 0).all():
        row = int(torch.nonzero(targets.diagonal() <= 0)[0])
        raise ValueError(
            f"positive_weights[{row}, {row}] must be > 0: every image's own text is a positive "
            "(put 1 on the diagonal and the extra positives elsewhere)."
        )
    return targets


@dataclass
class PairBatch:
    """The (global) batch a pairwise loss compares: L2-normalised float32 embeddings.

    Attributes:
        images: `(B, d)` normalised image embeddings (all processes' rows in rank order when gathered).
        texts: `(B, d)` normalised embeddings of the paired texts.
        mined_texts: `(B, m, d)` normalised mined negative texts, or None.
        mined_weights: `(B, m)` weights of the mined texts (all ones when none were given), or None.
    """

    images: Tensor
    texts: Tensor
    mined_texts: Tensor | None = None
    mined_weights: Tensor | None = None


def _check_mined(
    image_embeds: Tensor, mined_text_embeds: Tensor | None, mined_text_weights: Tensor | None
) -> Tensor | None:
    """The mined texts' weights (all ones when None), after checking both shapes against the images."""
    if mined_text_embeds is None:
        if mined_text_weights is not None:
            raise ValueError("mined_text_weights was given without mined_text_embeds.")
        return None
    batch, dim = image_embeds.shape
    shape = tuple(mined_text_embeds.shape)
    if len(shape) != 3 or shape[0] != batch or shape[2] != dim:
        raise ValueError(f"mined_text_embeds must have shape ({batch}, m, {dim}), got {shape}.")
    if mined_text_weights is None:
        return mined_text_embeds.new_ones(shape[:2])
    if tuple(mined_text_weights.shape) != shape[:2]:
        raise ValueError(
            f"mined_text_weights must have shape {shape[:2]} to match mined_text_embeds, "
            f"got {tuple(mined_text_weights.shape)}."
        )
    return mined_text_weights


def pair_batch(
    image_embeds: Tensor, text_embeds: Tensor,
    negative_weights: Tensor | None = None, positive_weights: Tensor | None = None,
    mined_text_embeds: Tensor | None = None, mined_text_weights: Tensor | None = None,
    gather_across_processes: bool = True,
) -> PairBatch:
    """Check a pairwise loss's inputs, all-gather them (with gradient) when distributed, and normalise them.

    With `gather_across_processes` and world size > 1 the embeddings and the mined texts (zero-padded, weight
    0, to the largest count of any process) are gathered with `gather_features`; the weight matrices must then
    already be the GLOBAL `(B_global, B_global)` ones. The weight matrices' values are checked by the losses
    (they know which entries count); here only their shape is.

    Args:
        image_embeds, text_embeds: `(B, d)` each, not normalised.
        negative_weights, positive_weights: `(B, B)` (global batch) or None.
        mined_text_embeds: `(B, m, d)` or None; mined_text_weights: `(B, m)` or None (all ones).
        gather_across_processes: contrast against the global batch under multi-process training.

    Returns:
        A `PairBatch` of float32 normalised embeddings.

    Raises:
        ValueError: embeddings that are not `(B, d)` of one shape, mined texts or weights of the wrong shape (with
            a hint when a local weight matrix is given under gathering).

    Example:
        >>> import torch
        >>> batch = pair_batch(torch.randn(3, 4), torch.randn(3, 4), mined_text_embeds=torch.randn(3, 2, 4))
        >>> batch.images.shape, batch.mined_weights.tolist()
        (torch.Size([3, 4]), [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    """
    if image_embeds.dim() != 2 or text_embeds.dim() != 2:
        raise ValueError(
            f"image_embeds and text_embeds must be (batch, dim), got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}."
        )
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must have "
            "the same shape: one paired text per image."
        )
    local_batch = image_embeds.shape[0]
    mined_text_weights = _check_mined(image_embeds, mined_text_embeds, mined_text_weights)

    world_size, _ = world_size_and_rank()
    gathering = gather_across_processes and world_size > 1
    if gathering:
        image_embeds, text_embeds = gather_features(image_embeds, text_embeds)
        if mined_text_embeds is not None:
            # processes may have mined a different number of texts: zero-pad (weight 0) to the largest
            mined_text_embeds, mined_text_weights = gather_features(
                mined_text_embeds, mined_text_weights.to(mined_text_embeds.dtype), pad_trailing_dims=True
            )
    batch = image_embeds.shape[0]
    for name, weights in (("negative_weights", negative_weights), ("positive_weights", positive_weights)):
        if weights is not None and tuple(weights.shape) != (batch, batch):
            hint = (
                f" This process has {local_batch} examples and contrasts against the global batch of {batch} "
                f"gathered from {world_size} processes, so {name} must be the GLOBAL matrix in rank order "
                "(gather the per-example metadata with hf_clipneg.losses.gather_metadata and build it from "
                "that), or construct the loss with gather_across_processes=False."
                if gathering
                else ""
            )
            raise ValueError(f"{name} has shape {tuple(weights.shape)}, expected ({batch}, {batch}).{hint}")

    # Normalise and compare in float32: half-precision sums over a large batch lose the loss signal.
    return PairBatch(
        images=F.normalize(image_embeds.float(), dim=-1),
        texts=F.normalize(text_embeds.float(), dim=-1),
        mined_texts=None if mined_text_embeds is None else F.normalize(mined_text_embeds.float(), dim=-1),
        mined_weights=mined_text_weights,
    )
