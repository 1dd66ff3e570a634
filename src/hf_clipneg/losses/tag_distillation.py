"""Text-tag self-distillation (TTD) against single-tag bias.

CLIP-style text encoders tend to let one word ("tag") of a caption dominate its embedding, so the
image-text score follows that single tag. TTD (Jo et al., ECCV 2024) counters this in two steps,
which this module implements with its own design choices (documented per function):

1. pick the caption's tags that are really in the image, from the similarity between each tag and
   its most similar image locations (`tag_grounding_scores`, `select_tags`);
2. self-distil: the similarity map of the whole caption over the image locations is pulled towards
   the union of the selected tags' maps (`TagSelfDistillationLoss`), the tag side being a detached
   teacher.

`hf_clipneg.losses.tag_bias.single_tag_bias` measures how much of a caption's image-text score its best single
tag explains.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "TagSelfDistillationLoss",
    "dense_image_embeddings",
    "select_tags",
    "similarity_maps",
    "tag_grounding_scores",
    "ttd_loss_term",
]

# tag_grounding_scores works on (images, captions chunk, T, P) blocks of at most this many floats
_MAX_CHUNK_ELEMENTS = 1 << 24


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _num_prefix_tokens(config: Any, seq_len: int) -> int:
    """How many leading non-patch tokens (CLS, registers) a ViT-style sequence carries."""
    image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if isinstance(image_size, (tuple, list)):
        image_size = image_size[0]
    if isinstance(patch_size, (tuple, list)):
        patch_size = patch_size[0]
    if isinstance(image_size, int) and isinstance(patch_size, int) and patch_size > 0:
        extra = seq_len - (image_size // patch_size) ** 2
        if 0 <= extra <= 16:
            return extra
    # other input resolution than the config's: a square grid, with or without one CLS token
    for extra in (1, 0):
        side = math.isqrt(seq_len - extra)
        if side * side == seq_len - extra:
            return extra
    raise ValueError(
        f"Cannot tell the patch tokens from the CLS/register tokens in a sequence of {seq_len} tokens "
        f"({type(config).__name__}); pass patch features (B, P, hidden) of a square grid."
    )


def dense_image_embeddings(model: nn.Module, vision_last_hidden_state: Tensor) -> Tensor:
    """Project the vision tower's per-location features into the joint space, L2-normalised per location.

    Each location goes through the same head as the pooled feature, so that a location's embedding is
    comparable with text embeddings:

    - ViT-style ``(B, 1 + P, hidden)``: leading CLS/register tokens are dropped. `ViTModel`'s
      ``last_hidden_state`` is already layer-normed; when it has a pooler (``dense`` + ``tanh`` on CLS)
      that pooler is applied to every patch too. CLIP-family vision models apply ``post_layernorm`` only to
      the pooled CLS, so it is applied to the patches here. SigLIP-style towers (no CLS, normed
      ``last_hidden_state``) are used as they are.
    - Convolutional ``(B, C, H, W)`` (EfficientNet, ResNet, ...): flattened to ``(B, H*W, C)``. With
      EfficientNet's mean pooling and the bias-free ``visual_projection``, the mean of the location
      embeddings before normalisation equals the projected pooled feature.

    Args:
        model: a `VisionTextDualEncoderModel` (wrappers such as DDP are unwrapped).
        vision_last_hidden_state: ``outputs.vision_model_output.last_hidden_state`` of the dual encoder's
            forward, or ``model.vision_model(pixel_values).last_hidden_state``.

    Returns:
        ``(B, P, projection_dim)`` unit vectors.

    Example:
        >>> import torch
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, _ = build_tiny_dual_encoder(image_size=32)
        >>> hidden = model.vision_model(pixel_values=torch.randn(2, 3, 32, 32)).last_hidden_state  # (2, 1 + 16, 32)
        >>> dense_image_embeddings(model, hidden).shape
        torch.Size([2, 16, 16])
    """
    model = _unwrap(model)
    vision = model.vision_model
    hidden = vision_last_hidden_state
    if not isinstance(hidden, Tensor):
        raise TypeError(f"vision_last_hidden_state must be a Tensor, got {type(hidden).__name__}.")
    if hidden.dim() == 4:
        features = hidden.flatten(2).transpose(1, 2)
    elif hidden.dim() == 3:
        config = vision.config
        features = hidden[:, _num_prefix_tokens(config, hidden.shape[1]) :]
        model_type = str(getattr(config, "model_type", ""))
        if "clip" in model_type and "siglip" not in model_type and hasattr(vision, "post_layernorm"):
            features = vision.post_layernorm(features)
        pooler = getattr(vision, "pooler", None)
        if pooler is not None and hasattr(pooler, "dense") and hasattr(pooler, "activation"):
            features = pooler.activation(pooler.dense(features))
    else:
        raise ValueError(
            "vision_last_hidden_state must be (B, tokens, hidden) for ViT-style towers or (B, C, H, W) for "
            f"convolutional towers, got shape {tuple(hidden.shape)}."
        )
    expected = model.visual_projection.in_features
    if features.shape[-1] != expected:
        raise ValueError(
            f"The vision features have {features.shape[-1]} channels but visual_projection expects {expected}: "
            "pass the vision tower's last_hidden_state (not hidden_states of an inner layer)."
        )
    return F.normalize(model.visual_projection(features), dim=-1)


def similarity_maps(patch_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Cosine similarity of every image location with its row's text(s).

    Args:
        patch_embeds: ``(B, P, d)`` location embeddings.
        text_embeds: ``(B, d)`` one text per image, or ``(B, T, d)`` several texts (tags) per image.

    Returns:
        ``(B, P)`` or ``(B, T, P)``.

    Example:
        >>> import torch
        >>> patches = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
        >>> similarity_maps(patches, torch.tensor([[3.0, 0.0]])).tolist()
        [[1.0, 0.0]]
    """
    if patch_embeds.dim() != 3:
        raise ValueError(f"patch_embeds must be (B, P, d), got {tuple(patch_embeds.shape)}.")
    patches = F.normalize(patch_embeds, dim=-1)
    texts = F.normalize(text_embeds, dim=-1)
    if texts.dim() == 2 and texts.shape[0] == patches.shape[0] and texts.shape[1] == patches.shape[2]:
        return torch.einsum("bpd,bd->bp", patches, texts)
    if texts.dim() == 3 and texts.shape[0] == patches.shape[0] and texts.shape[2] == patches.shape[2]:
        return torch.einsum("bpd,btd->btp", patches, texts)
    raise ValueError(
        f"text_embeds must be (B, d) or (B, T, d) matching patch_embeds {tuple(patch_embeds.shape)}, got "
        f"{tuple(text_embeds.shape)}."
    )


def _check_tags(patch_embeds: Tensor, tag_embeds: Tensor, tag_mask: Tensor) -> None:
    if tag_embeds.dim() != 3 or tag_embeds.shape[0] != patch_embeds.shape[0] or (
        tag_embeds.shape[2] != patch_embeds.shape[-1]
    ):
        raise ValueError(
            f"tag_embeds must be (B, T, d) = ({patch_embeds.shape[0]}, T, {patch_embeds.shape[-1]}), got "
            f"{tuple(tag_embeds.shape)}."
        )
    if tuple(tag_mask.shape) != tuple(tag_embeds.shape[:2]):
        raise ValueError(f"tag_mask must have shape {tuple(tag_embeds.shape[:2])}, got {tuple(tag_mask.shape)}.")
    if tag_mask.dtype != torch.bool:
        raise TypeError(f"tag_mask must be a bool tensor (True = real tag), got {tag_mask.dtype}.")


@torch.no_grad()
def tag_grounding_scores(patch_embeds: Tensor, tag_embeds: Tensor, tag_mask: Tensor) -> Tensor:
    """How much better each tag fits its own image than the other images of the batch.

    ``peak[i, j, t] = max_p cos(patch_p of image i, tag t of caption j)`` (the tag's most similar location);
    the score of tag t of caption i is ``peak[i, i, t] - mean_{k != i} peak[k, i, t]``: a tag that is in the
    image peaks higher there than on unrelated images, while a tag the model finds everywhere (or nowhere)
    scores about 0 whatever its absolute similarity. With a batch of one image the reference is the mean
    peak of the caption's own valid tags instead. Padding tags get ``-inf``.

    Returns:
        ``(B, T)`` float scores (no gradient).

    Example:
        >>> import torch
        >>> patches = torch.eye(3)[None].repeat(2, 1, 1)          # both images show directions 0, 1, 2
        >>> patches[1, :, :] = torch.tensor([0.0, 0.0, 1.0])      # image 1 shows only direction 2
        >>> tags = torch.eye(3)[[0, 2]][None].repeat(2, 1, 1)     # tags "0" and "2" for both captions
        >>> tag_grounding_scores(patches, tags, torch.ones(2, 2, dtype=torch.bool))[0].tolist()
        [1.0, 0.0]
    """
    _check_tags(patch_embeds, tag_embeds, tag_mask)
    patches = F.normalize(patch_embeds.float(), dim=-1)
    tags = F.normalize(tag_embeds.float(), dim=-1)
    batch, num_patches, _ = patches.shape
    num_tags = tags.shape[1]
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, batch * num_tags * num_patches))
    peaks = []
    for start in range(0, batch, chunk):  # captions j in chunks: (B images, chunk, T, P) at most
        sims = torch.einsum("ipd,jtd->ijtp", patches, tags[start : start + chunk])
        peaks.append(sims.amax(dim=-1))
    peak = torch.cat(peaks, dim=1)  # (images, captions, T)
    own = peak.diagonal(dim1=0, dim2=1).T  # (B, T)
    if batch > 1:
        reference = (peak.sum(dim=0) - own) / (batch - 1)
    else:
        valid = tag_mask.float()
        reference = ((own * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1)).expand_as(own)
    scores = own - reference
    return scores.masked_fill(~tag_mask, -math.inf)


@torch.no_grad()
def select_tags(
    patch_embeds: Tensor, tag_embeds: Tensor, tag_mask: Tensor, margin: float = 0.0, min_selected: int = 1
) -> Tensor:
    """Pick the tags that are present in their image.

    Rule: tag t of caption i is selected when its `tag_grounding_scores` value (peak similarity on image i
    minus its mean peak on the other images of the batch) exceeds `margin`. Every caption with at least one
    valid tag keeps its `min_selected` best-scoring tags even below the margin, so the distillation target
    is never empty.

    Args:
        patch_embeds: ``(B, P, d)`` location embeddings (`dense_image_embeddings`).
        tag_embeds: ``(B, T, d)`` tag text embeddings.
        tag_mask: ``(B, T)`` bool, False for padding slots.
        margin: score threshold in cosine units.
        min_selected: tags kept per caption regardless of the margin.

    Returns:
        ``(B, T)`` bool, always False on padding.

    Example:
        >>> import torch
        >>> patches = torch.eye(4)[None, :2].repeat(2, 1, 1)  # both images: directions 0 and 1
        >>> patches[1] = torch.eye(4)[2:]                     # image 1: directions 2 and 3
        >>> tags = torch.eye(4)[None, [0, 3]].repeat(2, 1, 1) # captions mention directions 0 and 3
        >>> select_tags(patches, tags, torch.ones(2, 2, dtype=torch.bool)).tolist()
        [[True, False], [False, True]]
    """
    scores = tag_grounding_scores(patch_embeds, tag_embeds, tag_mask)
    selected = (scores > margin) & tag_mask
    if min_selected > 0:
        keep = min(min_selected, scores.shape[1])
        top = scores.topk(keep, dim=1).indices
        forced = torch.zeros_like(selected).scatter_(1, top, True) & tag_mask
        selected |= forced
    return selected


def _standardise(maps: Tensor, eps: float = 1e-6) -> Tensor:
    mean = maps.mean(dim=-1, keepdim=True)
    std = maps.std(dim=-1, keepdim=True, unbiased=False)
    return (maps - mean) / (std + eps)


class TagSelfDistillationLoss(nn.Module):
    r"""Pull a caption's similarity map over the image towards the union of its present tags' maps.

    For image i with location embeddings :math:`x_{ip}` (`dense_image_embeddings`), caption embedding
    :math:`c_i` and tag embeddings :math:`g_{it}`:

    1. maps: :math:`s_i(p) = \cos(x_{ip}, c_i)` (student) and :math:`m_{it}(p) = \cos(x_{ip}, g_{it})`;
    2. tags present in the image are selected with `select_tags` (margin rule, at least one per caption);
    3. teacher: the union of the selected tags' maps, the pixel-wise maximum
       :math:`u_i(p) = \max_{t \in S_i} m_{it}(p)`, computed without gradient (self-distillation: the model
       teaches itself, only the caption side learns);
    4. both maps are standardised over the locations (zero mean, unit variance: only the SHAPE of the map
       matters; a caption embedding naturally has lower absolute similarities than a single word) and turned
       into soft masks :math:`\sigma(z / \tau)`;
    5. loss per caption: the mean over locations of the Bernoulli KL divergence
       :math:`\mathrm{KL}(\sigma(z_u/\tau) \,\|\, \sigma(z_s/\tau))` (``mode="kl"``), or the mean squared
       difference of the standardised maps (``mode="mse"``); averaged over captions with at least
       `min_tags` valid tags. It is exactly 0 when the caption map is an affine (positive-scale) copy of
       the tag union, in particular when it equals it.

    Gradient reaches the caption embedding and, unless ``detach_image=True``, the location embeddings of
    the student map (the vision projection/tower).

    Reference:
        Jo et al., "TTD: Text-Tag Self-Distillation Enhancing Image-Text Alignment in CLIP to Alleviate Single
        Tag Bias", ECCV 2024.

    Args:
        temperature: :math:`\tau` of the soft masks (on standardised maps).
        margin: tag selection margin (`select_tags`).
        min_tags: captions with fewer valid tags get no term (single-tag bias needs two tags).
        mode: ``"kl"`` or ``"mse"``.
        detach_image: stop the gradient into the location embeddings (only the text side learns).

    Inputs (``forward``):
        patch_embeds: ``(B, P, d)``; caption_embeds: ``(B, d)``; tag_embeds: ``(B, T, d)`` (detached here);
        tag_mask: ``(B, T)`` bool; temperature: overrides the constructor's value.

    Returns:
        A scalar tensor (0 with a graph when no caption qualifies).

    Example:
        >>> import torch
        >>> loss_fn = TagSelfDistillationLoss()
        >>> patches, tags = torch.randn(4, 9, 8), torch.randn(4, 3, 8)
        >>> caption = torch.randn(4, 8, requires_grad=True)
        >>> loss = loss_fn(patches, caption, tags, torch.ones(4, 3, dtype=torch.bool))
        >>> loss.backward(); bool(loss > 0) and caption.grad is not None
        True
        >>> float(TagSelfDistillationLoss(min_tags=1)(patches, tags[:, 0], tags[:, :1], torch.ones(4, 1, dtype=torch.bool)))
        0.0
    """

    def __init__(
        self,
        temperature: float = 0.5,
        margin: float = 0.0,
        min_tags: int = 2,
        mode: Literal["kl", "mse"] = "kl",
        detach_image: bool = False,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if mode not in ("kl", "mse"):
            raise ValueError(f"mode must be 'kl' or 'mse', got {mode!r}.")
        if min_tags < 1:
            raise ValueError(f"min_tags must be >= 1, got {min_tags}.")
        self.temperature = float(temperature)
        self.margin = float(margin)
        self.min_tags = int(min_tags)
        self.mode = mode
        self.detach_image = bool(detach_image)

    #: BibTeX of the paper this loss follows.
    citation = """@inproceedings{jo2024ttd,
  title     = {{TTD}: Text-Tag Self-Distillation Enhancing Image-Text Alignment in {CLIP} to Alleviate Single Tag Bias},
  author    = {Jo and others},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024}
}"""

    def get_config_dict(self) -> dict[str, Any]:
        """The options of this loss, for model cards and reproducibility.

        Example:
            >>> TagSelfDistillationLoss().get_config_dict()["mode"]
            'kl'
        """
        return {
            "temperature": self.temperature,
            "margin": self.margin,
            "min_tags": self.min_tags,
            "mode": self.mode,
            "detach_image": self.detach_image,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.get_config_dict().items())

    def teacher_maps(self, patch_embeds: Tensor, tag_embeds: Tensor, tag_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The detached union map ``(B, P)`` of the selected tags and the selection ``(B, T)``."""
        with torch.no_grad():
            patches = patch_embeds.detach().float()
            tags = tag_embeds.detach().float()
            selected = select_tags(patches, tags, tag_mask, margin=self.margin)
            maps = similarity_maps(patches, tags).masked_fill(~selected[..., None], -math.inf)
            union = maps.amax(dim=1)
            return torch.where(torch.isfinite(union), union, torch.zeros_like(union)), selected

    def forward(
        self,
        patch_embeds: Tensor,
        caption_embeds: Tensor,
        tag_embeds: Tensor,
        tag_mask: Tensor,
        temperature: float | None = None,
    ) -> Tensor:
        """The scalar TTD loss; inputs, shapes and errors as in the class docstring."""
        _check_tags(patch_embeds, tag_embeds, tag_mask)
        if caption_embeds.dim() != 2 or caption_embeds.shape != (patch_embeds.shape[0], patch_embeds.shape[2]):
            raise ValueError(
                f"caption_embeds must be ({patch_embeds.shape[0]}, {patch_embeds.shape[2]}), got "
                f"{tuple(caption_embeds.shape)}."
            )
        tau = self.temperature if temperature is None else float(temperature)
        if not tau > 0:
            raise ValueError(f"temperature must be > 0, got {tau}.")
        union, _ = self.teacher_maps(patch_embeds, tag_embeds, tag_mask)
        student_patches = patch_embeds.detach() if self.detach_image else patch_embeds
        student = similarity_maps(student_patches.float(), caption_embeds.float())
        rows = tag_mask.sum(dim=1) >= self.min_tags
        if not bool(rows.any()):
            return student.sum() * 0.0
        z_student = _standardise(student[rows])
        z_teacher = _standardise(union[rows])
        if self.mode == "mse":
            per_row = (z_student - z_teacher).pow(2).mean(dim=1)
        else:
            s, t = z_student / tau, z_teacher / tau
            p_t = torch.sigmoid(t)
            kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
            per_row = kl.mean(dim=1)
        return per_row.mean()


def ttd_loss_term(
    model: nn.Module,
    outputs: Any,
    caption_embeds: Tensor,
    tag_batch: dict[str, Tensor],
    loss_fn: TagSelfDistillationLoss | None = None,
) -> Tensor:
    """The TTD term of one training batch, for the trainer to add as ``ttd_weight * ttd_loss_term(...)``.

    Embeds the tags (``tag_input_ids``, ``tag_attention_mask``, ``tag_mask`` from
    `hf_clipneg.tags.tag_token_batch`) with the text tower WITHOUT gradient (they are the teacher), projects
    the vision tower's spatial output ``outputs.vision_model_output.last_hidden_state`` with
    `dense_image_embeddings`, and applies `loss_fn` with the batch's captions.

    Args:
        model: the (possibly DDP/accelerate-wrapped) `VisionTextDualEncoderModel`.
        outputs: the model's forward output with ``return_dict=True``.
        caption_embeds: ``(B, d)`` caption embeddings of the B images (``outputs.text_embeds[:B]``).
        tag_batch: the three tag tensors.
        loss_fn: default `TagSelfDistillationLoss()`.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> from hf_clipneg.tags import tag_token_batch
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> captions = ["red circle on blue square", "green star with white ring"]
        >>> batch = processor(text=captions, images=[Image.new("RGB", (32, 32))] * 2, return_tensors="pt", padding=True)
        >>> outputs = model(**batch, return_dict=True)
        >>> tags = tag_token_batch(processor.tokenizer, captions)
        >>> ttd_loss_term(model, outputs, outputs.text_embeds, tags).shape
        torch.Size([])
    """
    for key in ("tag_input_ids", "tag_attention_mask", "tag_mask"):
        if key not in tag_batch:
            raise KeyError(f"tag_batch lacks {key!r}: build it with hf_clipneg.tags.tag_token_batch.")
    loss_fn = loss_fn if loss_fn is not None else TagSelfDistillationLoss()
    core = _unwrap(model)
    vision_output = getattr(outputs, "vision_model_output", None)
    if vision_output is None or getattr(vision_output, "last_hidden_state", None) is None:
        raise ValueError("outputs has no vision_model_output.last_hidden_state: call the model with return_dict=True.")
    tag_mask = tag_batch["tag_mask"].to(caption_embeds.device).bool()
    batch, num_tags = tag_mask.shape
    if caption_embeds.shape[0] != batch:
        raise ValueError(f"caption_embeds has {caption_embeds.shape[0]} rows but tag_mask has {batch} captions.")
    with torch.no_grad():
        features = core.get_text_features(
            input_ids=tag_batch["tag_input_ids"].to(caption_embeds.device),
            attention_mask=tag_batch["tag_attention_mask"].to(caption_embeds.device),
        )
        features = getattr(features, "pooler_output", features)
        tag_embeds = F.normalize(features.float(), dim=-1).reshape(batch, num_tags, -1)
    patches = dense_image_embeddings(core, vision_output.last_hidden_state)
    return loss_fn(patches, caption_embeds, tag_embeds, tag_mask)
