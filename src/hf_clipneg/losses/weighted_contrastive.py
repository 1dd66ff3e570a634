"""Symmetric CLIP (InfoNCE) loss with per-pair negative weights, soft multi-positive targets and mined negatives."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._citations import TAGAMI_2024
from .loss_inputs import as_float_weights, check_positive_weights, check_weights, pair_batch

logger = logging.getLogger(__name__)

__all__ = ["WeightedContrastiveLoss", "weighted_contrastive_loss"]


def _log_weights(weights: Tensor) -> Tensor:
    """log(w) with log(0) = -inf, and no NaN in the backward pass even if `weights` requires grad."""
    tiny = torch.finfo(weights.dtype).tiny
    return torch.where(weights > 0, weights.clamp_min(tiny).log(), torch.full_like(weights, -math.inf))


def weighted_contrastive_loss(
    logits_per_image: Tensor,
    negative_weights: Tensor | None = None,
    positive_weights: Tensor | None = None,
    mined_logits: Tensor | None = None,
    mined_weights: Tensor | None = None,
) -> Tensor:
    """The loss of `WeightedContrastiveLoss`, from already scaled similarity logits.

    Args:
        logits_per_image: `(B, B)`, entry `[i, j]` = scaled similarity of image i with text j.
        negative_weights: `(B, B)` weights `W >= 0` or None (all ones). Entries where `positive_weights > 0`
            (always the diagonal) are ignored: positives enter the denominators with weight 1.
        positive_weights: `(B, B)` target weights `P >= 0` with a positive diagonal, or None (identity).
        mined_logits: `(B, m)` scaled similarity of image i with its k-th mined negative text.
        mined_weights: `(B, m)` weights `>= 0` of the mined texts (0 = padding), or None (all ones).

    Returns:
        The scalar loss (float32 when the logits are half precision).

    Example:
        >>> import torch
        >>> logits = torch.randn(4, 4)
        >>> ce = torch.nn.functional.cross_entropy
        >>> clip = (ce(logits, torch.arange(4)) + ce(logits.T, torch.arange(4))) / 2
        >>> torch.allclose(weighted_contrastive_loss(logits), clip)
        True
    """
    if logits_per_image.dim() != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(
            f"logits_per_image must be square (B, B) with one text per image, got {tuple(logits_per_image.shape)}."
        )
    logits = logits_per_image.float() if logits_per_image.dtype in (torch.float16, torch.bfloat16) else logits_per_image
    batch = logits.shape[0]
    shape = (batch, batch)

    if negative_weights is None and positive_weights is None and mined_logits is None:
        if mined_weights is not None:
            raise ValueError("mined_weights was given without mined_logits (mined text embeddings).")
        # plain CLIP, computed exactly as transformers' image_text_contrastive_loss (same ops, same rounding)
        labels = torch.arange(batch, device=logits.device)
        return (F.cross_entropy(logits.T, labels) + F.cross_entropy(logits, labels)) / 2

    if positive_weights is None:
        targets = torch.eye(batch, device=logits.device, dtype=logits.dtype)
    else:
        targets = check_positive_weights(positive_weights, logits)

    if negative_weights is None and positive_weights is None:
        candidate_logits = logits
    else:
        if negative_weights is None:
            allowed = torch.ones_like(logits)
        else:
            allowed = as_float_weights("negative_weights", negative_weights, logits)
            check_weights("negative_weights", allowed, shape)
        allowed = torch.where(targets > 0, torch.ones_like(allowed), allowed)
        candidate_logits = logits + _log_weights(allowed)

    # image -> text: row i is a distribution over the B batch texts (+ the m mined texts of image i)
    image_candidates = candidate_logits
    if mined_logits is not None:
        mined = mined_logits.float() if mined_logits.dtype in (torch.float16, torch.bfloat16) else mined_logits
        if mined.dim() != 2 or mined.shape[0] != batch:
            raise ValueError(f"mined_logits must have shape ({batch}, m), got {tuple(mined.shape)}.")
        if mined_weights is not None:
            mined_w = as_float_weights("mined_weights", mined_weights, mined)
            check_weights("mined_weights", mined_w, tuple(mined.shape))
            mined = mined + _log_weights(mined_w)
        image_candidates = torch.cat([candidate_logits, mined], dim=1)
    elif mined_weights is not None:
        raise ValueError("mined_weights was given without mined_logits (mined text embeddings).")

    image_targets = targets / targets.sum(dim=1, keepdim=True)
    image_to_text = torch.logsumexp(image_candidates, dim=1) - (image_targets * logits).sum(dim=1)

    # text -> image: row j of the transposes is a distribution over the B batch images
    text_targets = targets.T / targets.T.sum(dim=1, keepdim=True)
    text_to_image = torch.logsumexp(candidate_logits.T, dim=1) - (text_targets * logits.T).sum(dim=1)

    return (image_to_text.mean() + text_to_image.mean()) / 2


class WeightedContrastiveLoss(nn.Module):
    r"""Symmetric CLIP loss where every in-batch negative pair carries a weight, with optional extra positives
    and explicitly mined negative texts.

    This is the loss of Tagami et al.: image/text pairs whose images fall in similar clusters are not pushed
    apart (weight 0: likely false negatives), and pairs are pushed apart more the less similar their images
    are (weight > 1), while mined "incorrect" texts join each image's candidate set.

    Formula. With :math:`u_i`, :math:`v_j` the L2-normalised image and text embeddings,
    :math:`t = \exp(\text{logit\_scale})` and :math:`s_{ij} = t\, u_i \cdot v_j`::

        a_ij   = 1 if P_ij > 0 else W_ij                      (positives always count with weight 1)
        q_ij   = P_ij / sum_k P_ik       (image->text target; identity P gives one-hot targets)
        r_ji   = P_ij / sum_k P_kj       (text->image target: P normalised per column)
        L_i2t(i) = log( sum_j a_ij exp(s_ij) + sum_k w_ik exp(s~_ik) ) - sum_j q_ij s_ij
        L_t2i(j) = log( sum_i a_ij exp(s_ij) )                         - sum_i r_ji s_ij
        loss   = ( mean_i L_i2t(i) + mean_j L_t2i(j) ) / 2

    where :math:`\tilde s_{ik}` is the scaled similarity of image i with its k-th mined negative text and
    :math:`w_{ik}` that text's weight. Each log-sum is a ``logsumexp`` of :math:`s + \log a` with
    :math:`\log 0 = -\infty`, so a masked pair contributes exactly nothing and receives exactly zero gradient;
    the positive is always in the sum, so a row whose negatives are all masked gives loss 0, never NaN.
    With a soft target the term is the cross entropy :math:`-\sum_j q_{ij} \log p_{ij}` (the same as
    ``torch.nn.functional.cross_entropy`` with probability targets), not the KL divergence: with two equally
    weighted positives its minimum is :math:`\log 2`, reached when both get half of the probability mass.
    Mined texts have no image of their own, so they only enter the image->text direction.
    With ``W`` all ones, ``P`` the identity and no mined texts this is exactly the loss of
    ``transformers.VisionTextDualEncoderModel(return_loss=True)`` (and of CLIP): that case takes a fast path
    with the same operations, so loss and gradients match bit for bit.

    Multiple processes. With ``gather_across_processes=True`` (default) and ``torch.distributed`` initialised
    with world size > 1, embeddings (and mined texts with their weights) are all-gathered with gradient
    (`gather_features`, rank order), and every process computes the loss of the WHOLE global batch, i.e. the
    same value everywhere: this is the loss to log. The all-gather backward sums the (identical) gradients of
    all N processes into each local shard (N times the global-batch gradient), and DDP's gradient averaging
    divides by N again, so every parameter, ``logit_scale`` included, receives exactly the single-process
    gradient of the loss on the concatenated batch. ``negative_weights`` and ``positive_weights`` must then be
    GLOBAL ``(B_global, B_global)`` matrices in the same rank order (build them from metadata gathered with
    `gather_metadata`); a local ``(B_local, B_local)`` matrix raises a ValueError.

    References:
        - Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021
          (CLIP).
        - Tagami et al., "Automatic data generation of incorrect image-text pairs for effective contrastive
          learning of CLIP model", WSCG 2024.

    Args:
        gather_across_processes: contrast against the global batch under multi-process training.
        max_logit_scale: clamp :math:`t = \exp(\text{logit\_scale})` to at most this value (CLIP uses 100);
            None (default) leaves it as is, like `VisionTextDualEncoderModel`.

    Inputs (``forward``):
        image_embeds: ``(B, d)`` projected image embeddings, NOT normalised (normalised here).
        text_embeds: ``(B, d)`` projected text embeddings of the paired texts, NOT normalised.
        logit_scale: the model's LOG-space temperature parameter (``model.logit_scale``); ``exp()`` is applied
            here, as in `VisionTextDualEncoderModel.forward`.
        negative_weights: ``(B, B)`` or None (all ones); ``W[i, j]`` (image i, text j) weights
            :math:`\exp(s_{ij})` in image i's image->text denominator and in text j's text->image
            denominator (that direction uses ``W.T``). The diagonal is ignored.
        positive_weights: ``(B, B)`` or None (identity): ``P[i, j] > 0`` makes text j a positive of image i,
            with target mass proportional to ``P[i, j]``. The diagonal must be > 0.
        mined_text_embeds: ``(B, m, d)`` mined negative texts per image, NOT normalised (zero vectors are
            fine as padding).
        mined_text_weights: ``(B, m)`` weights of the mined texts, 0 = padding; None = all ones.

    Returns:
        A scalar tensor (float32 under half-precision autocast).

    Example:
        >>> import torch
        >>> loss_fn = WeightedContrastiveLoss()
        >>> images, texts = torch.randn(4, 8), torch.randn(4, 8)
        >>> logit_scale = torch.tensor(2.6592)  # model.logit_scale, log(1 / 0.07)
        >>> weights = torch.ones(4, 4)
        >>> weights[0, 1] = weights[1, 0] = 0.0  # images 0 and 1 look alike: never push 0-1 apart
        >>> loss = loss_fn(images, texts, logit_scale, negative_weights=weights,
        ...                mined_text_embeds=torch.randn(4, 2, 8), mined_text_weights=torch.ones(4, 2))
        >>> loss.shape, bool(torch.isfinite(loss))
        (torch.Size([]), True)
    """

    #: BibTeX of the method this loss implements (in-batch negative weights from mined image similarity).
    citation = TAGAMI_2024

    def __init__(self, gather_across_processes: bool = True, max_logit_scale: float | None = None) -> None:
        super().__init__()
        if max_logit_scale is not None and not max_logit_scale > 0:
            raise ValueError(f"max_logit_scale must be > 0 or None, got {max_logit_scale}.")
        self.gather_across_processes = gather_across_processes
        self.max_logit_scale = max_logit_scale

    def get_config_dict(self) -> dict[str, Any]:
        """The options of this loss, for model cards and reproducibility.

        Example:
            >>> WeightedContrastiveLoss().get_config_dict()
            {'gather_across_processes': True, 'max_logit_scale': None}
        """
        return {"gather_across_processes": self.gather_across_processes, "max_logit_scale": self.max_logit_scale}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.get_config_dict().items())

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor,
        negative_weights: Tensor | None = None,
        positive_weights: Tensor | None = None,
        mined_text_embeds: Tensor | None = None,
        mined_text_weights: Tensor | None = None,
    ) -> Tensor:
        """The scalar weighted InfoNCE loss of the batch; inputs, shapes and errors as in the class docstring."""
        inputs = pair_batch(
            image_embeds, text_embeds, negative_weights, positive_weights, mined_text_embeds, mined_text_weights,
            gather_across_processes=self.gather_across_processes,
        )
        images, texts = inputs.images, inputs.texts
        if not isinstance(logit_scale, Tensor):
            logit_scale = torch.tensor(float(logit_scale))
        scale = logit_scale.float().to(images.device).exp()
        if self.max_logit_scale is not None:
            scale = scale.clamp(max=self.max_logit_scale)
        # text @ image.T, then transpose: the order VisionTextDualEncoderModel uses
        logits_per_image = ((texts @ images.T) * scale).T

        mined_logits = None
        if inputs.mined_texts is not None:
            mined_logits = scale * torch.einsum("bd,bmd->bm", images, inputs.mined_texts)

        return weighted_contrastive_loss(
            logits_per_image,
            negative_weights=negative_weights,
            positive_weights=positive_weights,
            mined_logits=mined_logits,
            mined_weights=inputs.mined_weights,
        )
