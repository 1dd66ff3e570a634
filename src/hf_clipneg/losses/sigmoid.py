"""Pairwise sigmoid (SigLIP) loss with the same negative weights, extra positives and mined negatives as
`WeightedContrastiveLoss`."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loss_inputs import as_float_weights, check_positive_weights, check_weights, pair_batch

logger = logging.getLogger(__name__)

__all__ = [
    "SIGLIP_INIT_LOGIT_BIAS",
    "SIGLIP_INIT_LOGIT_SCALE",
    "SigmoidContrastiveLoss",
    "sigmoid_contrastive_loss",
]

#: SigLIP's initial log-temperature t' = log 10 (t = exp(t') = 10); set ``model.logit_scale`` to it.
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
#: SigLIP's initial bias b = -10: with B - 1 negatives per positive, every pair starts out predicted negative.
SIGLIP_INIT_LOGIT_BIAS = -10.0

CITATION = """@inproceedings{zhai2023sigmoid,
    title = {Sigmoid Loss for Language Image Pre-Training},
    author = {Zhai, Xiaohua and Mustafa, Basil and Kolesnikov, Alexander and Beyer, Lucas},
    booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
    pages = {11975--11986},
    year = {2023},
}"""


def _upcast(tensor: Tensor) -> Tensor:
    """float32 for half-precision inputs: the loss sums B * B terms."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _pair_weights(
    logits: Tensor, negative_weights: Tensor | None, positive_weights: Tensor | None
) -> tuple[Tensor, Tensor]:
    """`(labels, weights)` of every in-batch pair: label +1 and weight P where P > 0, else label -1 and weight W."""
    batch = logits.shape[0]
    if positive_weights is None:
        positives = torch.eye(batch, device=logits.device, dtype=logits.dtype)
    else:
        positives = check_positive_weights(positive_weights, logits)
    if negative_weights is None:
        negatives = torch.ones_like(logits)
    else:
        negatives = as_float_weights("negative_weights", negative_weights, logits)
        check_weights("negative_weights", negatives, (batch, batch))
    is_positive = positives > 0
    labels = torch.where(is_positive, torch.ones_like(logits), -torch.ones_like(logits))
    return labels, torch.where(is_positive, positives, negatives)


def sigmoid_contrastive_loss(
    logits_per_image: Tensor, negative_weights: Tensor | None = None, positive_weights: Tensor | None = None,
    mined_logits: Tensor | None = None, mined_weights: Tensor | None = None,
) -> Tensor:
    """The loss of `SigmoidContrastiveLoss`, from logits that already hold the temperature and the bias.

    Args:
        logits_per_image: `(B, B)`, entry `[i, j]` = `t * u_i . v_j + b` for image i and text j.
        negative_weights: `(B, B)` weights `W >= 0` of the negative pairs, or None (all ones). Entries where
            `positive_weights > 0` (always the diagonal) are ignored.
        positive_weights: `(B, B)` weights `P >= 0` with a positive diagonal, or None (identity). A pair with
            `P[i, j] > 0` is a positive: its term uses label +1 and weight `P[i, j]`.
        mined_logits: `(B, m)` logits of image i with its k-th mined negative text (label -1).
        mined_weights: `(B, m)` weights `>= 0` of the mined texts (0 = padding), or None (all ones).

    Returns:
        The scalar loss `sum_ij w_ij * -log sigmoid(z_ij * logits_ij) / B` (float32 for half-precision logits).

    Raises:
        ValueError: non-square logits, weights of the wrong shape, NaN/inf or negative weights, a diagonal
            positive weight <= 0, `mined_weights` without `mined_logits`.
        TypeError: a weight that is not a real-valued tensor.

    Example:
        >>> import torch
        >>> logits = torch.randn(4, 4)
        >>> labels = 2 * torch.eye(4) - 1  # SigLIP's pseudo-code
        >>> paper = -torch.nn.functional.logsigmoid(labels * logits).sum() / 4
        >>> torch.allclose(sigmoid_contrastive_loss(logits), paper)
        True
    """
    if logits_per_image.dim() != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(
            f"logits_per_image must be square (B, B) with one text per image, got {tuple(logits_per_image.shape)}."
        )
    logits = _upcast(logits_per_image)
    batch = logits.shape[0]
    labels, weights = _pair_weights(logits, negative_weights, positive_weights)
    # A weight of exactly 0 multiplies a finite term: the pair adds 0 to the loss and 0 to every gradient.
    total = (weights * -F.logsigmoid(labels * logits)).sum()

    if mined_logits is None:
        if mined_weights is not None:
            raise ValueError("mined_weights was given without mined_logits (mined text embeddings).")
        return total / batch
    mined = _upcast(mined_logits)
    if mined.dim() != 2 or mined.shape[0] != batch:
        raise ValueError(f"mined_logits must have shape ({batch}, m), got {tuple(mined.shape)}.")
    if mined_weights is None:
        mined_w = torch.ones_like(mined)
    else:
        mined_w = as_float_weights("mined_weights", mined_weights, mined)
        check_weights("mined_weights", mined_w, tuple(mined.shape))
    return (total + (mined_w * -F.logsigmoid(-mined)).sum()) / batch


class SigmoidContrastiveLoss(nn.Module):
    r"""SigLIP's pairwise sigmoid loss, where every in-batch pair carries a weight, with optional extra positives
    and explicitly mined negative texts.

    Every image/text pair is its own binary problem, "do these belong together?", so no softmax couples the
    pairs of a row: a masked pair (weight 0) simply drops out. With :math:`u_i`, :math:`v_j` the L2-normalised
    image and text embeddings, :math:`t = \exp(\text{logit\_scale})`, the bias :math:`b` and
    :math:`s_{ij} = t\, u_i \cdot v_j + b`::

        z_ij = +1 if P_ij > 0 else -1          (the paired text, and every extra positive, is a positive)
        w_ij = P_ij if P_ij > 0 else W_ij      (positive weight, or the negative weight of the pair)
        loss = ( sum_ij w_ij * -log sigmoid(z_ij * s_ij) + sum_ik w~_ik * -log sigmoid(-s~_ik) ) / B

    where :math:`\tilde s_{ik}` is the logit of image i with its k-th mined negative text and
    :math:`\tilde w_{ik}` that text's weight, and B the (global) batch size. With ``W`` all ones, ``P`` the
    identity and no mined texts this is exactly the pseudo-code of Zhai et al. (``labels = 2 * eye(n) - 1``,
    ``-sum(log_sigmoid(labels * logits)) / n``). A pair with weight 0 adds nothing to the loss and receives
    exactly zero gradient. Unlike InfoNCE the loss is symmetric by construction (one term per pair, no
    image->text / text->image directions); mined texts are simply more negative pairs of their image.

    Temperature and bias. The temperature is the model's own ``logit_scale`` (log space), passed to
    ``forward`` as for `WeightedContrastiveLoss`; SigLIP initialises it to :math:`\log 10`
    (`SIGLIP_INIT_LOGIT_SCALE`), not CLIP's :math:`\log(1/0.07)`: set
    ``model.logit_scale.data.fill_(SIGLIP_INIT_LOGIT_SCALE)`` before training. The dual encoder has no bias,
    so this module owns it: ``self.logit_bias`` is an ``nn.Parameter`` initialised to -10
    (`SIGLIP_INIT_LOGIT_BIAS`). `ClipNegTrainer` (``contrastive_loss="sigmoid"``) sets the scale, optimises the bias,
    clears its gradient after each step and checkpoints it; a training loop of your own must add
    ``loss.parameters()`` to its optimiser and move the loss to the model's device. ``forward(..., logit_bias=x)``
    uses ``x`` instead (a bias held elsewhere, or a fixed one).

    Multiple processes. As in `WeightedContrastiveLoss`: with ``gather_across_processes=True`` (default) and a
    world size > 1, embeddings and mined texts are all-gathered with gradient (`gather_features`, rank order)
    and every process computes the loss of the whole global batch (divided by the GLOBAL batch size), so the
    model's parameters receive the single-process gradient of the concatenated batch after DDP's averaging.
    ``logit_bias`` is not gathered: every process computes the same global-batch gradient for it, so it needs
    no all-reduce (and stays identical across processes). ``negative_weights`` and ``positive_weights`` must
    then be GLOBAL ``(B_global, B_global)`` matrices in rank order (`gather_metadata`).

    References:
        - Zhai, Mustafa, Kolesnikov and Beyer, "Sigmoid Loss for Language Image Pre-Training", ICCV 2023
          (`citation`).
        - Tagami et al., WSCG 2024, for the negative weights (see `WeightedContrastiveLoss`).

    Args:
        gather_across_processes: contrast against the global batch under multi-process training.
        init_logit_bias: initial value of the learnable bias (SigLIP: -10).

    Inputs (``forward``):
        image_embeds: ``(B, d)`` projected image embeddings, NOT normalised (normalised here).
        text_embeds: ``(B, d)`` projected text embeddings of the paired texts, NOT normalised.
        logit_scale: the model's LOG-space temperature (``model.logit_scale``), a tensor or a float.
        negative_weights: ``(B, B)`` or None (all ones): ``W[i, j]`` weights the negative pair (image i,
            text j); 0 masks it. Ignored where ``positive_weights > 0``.
        positive_weights: ``(B, B)`` or None (identity): ``P[i, j] > 0`` makes (image i, text j) a positive
            pair with weight ``P[i, j]``. The diagonal must be > 0.
        mined_text_embeds: ``(B, m, d)`` mined negative texts per image, NOT normalised.
        mined_text_weights: ``(B, m)`` weights of the mined texts, 0 = padding; None = all ones.
        logit_bias: a scalar bias to use instead of ``self.logit_bias``; None (default) uses the parameter.

    Returns:
        A scalar tensor (float32 under half-precision autocast).

    Raises:
        ValueError: embeddings that are not ``(B, d)`` of one shape, mined texts or weights of the wrong shape
            (under gathering: a local weight matrix), NaN/inf or negative weights (the message names the
            argument).

    Example:
        >>> import torch
        >>> loss_fn = SigmoidContrastiveLoss()  # owns logit_bias = -10
        >>> [name for name, _ in loss_fn.named_parameters()]  # give these to the optimiser too
        ['logit_bias']
        >>> image_embeds, text_embeds = torch.randn(4, 8), torch.randn(4, 8)
        >>> logit_scale = torch.tensor(SIGLIP_INIT_LOGIT_SCALE)  # the model's logit_scale at SigLIP's log 10
        >>> positives = torch.eye(4)
        >>> positives[2, 3] = 1.0  # text 3 also describes image 2: a positive pair, not a negative one
        >>> negatives = torch.ones(4, 4)
        >>> negatives[0, 1] = 0.0  # a likely false negative: the pair drops out of the loss
        >>> loss = loss_fn(image_embeds, text_embeds, logit_scale, negative_weights=negatives,
        ...                positive_weights=positives, mined_text_embeds=torch.randn(4, 2, 8))
        >>> loss.shape, loss.requires_grad
        (torch.Size([]), True)
    """

    #: BibTeX of the SigLIP paper, for model cards.
    citation = CITATION

    def __init__(self, gather_across_processes: bool = True, init_logit_bias: float = SIGLIP_INIT_LOGIT_BIAS) -> None:
        super().__init__()
        if not math.isfinite(init_logit_bias):
            raise ValueError(f"init_logit_bias must be finite, got {init_logit_bias}.")
        self.gather_across_processes = gather_across_processes
        self.init_logit_bias = float(init_logit_bias)
        self.logit_bias = nn.Parameter(torch.tensor(self.init_logit_bias))

    def get_config_dict(self) -> dict[str, Any]:
        """The options of this loss, for model cards and reproducibility (the learned bias is a parameter).

        Example:
            >>> SigmoidContrastiveLoss().get_config_dict()
            {'gather_across_processes': True, 'init_logit_bias': -10.0}
        """
        return {"gather_across_processes": self.gather_across_processes, "init_logit_bias": self.init_logit_bias}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.get_config_dict().items())

    def forward(
        self, image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float,
        negative_weights: Tensor | None = None, positive_weights: Tensor | None = None,
        mined_text_embeds: Tensor | None = None, mined_text_weights: Tensor | None = None,
        logit_bias: Tensor | float | None = None,
    ) -> Tensor:
        """The scalar sigmoid loss of the batch; inputs, shapes and errors as in the class docstring."""
        inputs = pair_batch(
            image_embeds, text_embeds, negative_weights, positive_weights, mined_text_embeds, mined_text_weights,
            gather_across_processes=self.gather_across_processes,
        )
        images = inputs.images
        scale = torch.as_tensor(logit_scale).float().to(images.device).exp()
        bias = self.logit_bias if logit_bias is None else torch.as_tensor(logit_bias)
        bias = bias.float().to(images.device)
        logits_per_image = scale * (images @ inputs.texts.T) + bias
        mined_logits = None
        if inputs.mined_texts is not None:
            mined_logits = scale * torch.einsum("bd,bmd->bm", images, inputs.mined_texts) + bias

        return sigmoid_contrastive_loss(
            logits_per_image,
            negative_weights=negative_weights,
            positive_weights=positive_weights,
            mined_logits=mined_logits,
            mined_weights=inputs.mined_weights,
        )
