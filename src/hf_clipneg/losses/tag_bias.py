"""Single-tag bias (Jo et al., ECCV 2024): how much of a caption's image scores one of its tags explains.

The measure `TagSelfDistillationLoss` is meant to lower; used by benchmarks/ttd.py and the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .tag_distillation import _unwrap

__all__ = ["single_tag_bias", "single_tag_bias_from_embeddings"]


def _r2(target: np.ndarray, design: np.ndarray) -> float:
    """R^2 of a least-squares fit of `target` (N,) on `design` (N, k) plus an intercept."""
    centred = target - target.mean()
    total = float(centred @ centred)
    if total <= 1e-12:
        return float("nan")
    x = design - design.mean(axis=0, keepdims=True)
    coef, *_ = np.linalg.lstsq(x, centred, rcond=None)
    residual = centred - x @ coef
    return float(1.0 - (residual @ residual) / total)


def single_tag_bias_from_embeddings(
    image_embeds: Tensor | np.ndarray,
    caption_embeds: Tensor | np.ndarray,
    tag_embeds: Tensor | np.ndarray,
    tag_mask: Tensor | np.ndarray,
    min_tags: int = 2,
    dominance: float = 0.9,
) -> dict[str, float]:
    """Single-tag bias from embeddings: how much of each caption's score over the images one tag explains.

    For every caption c with at least `min_tags` tags, take its cosine scores with all N images,
    :math:`y_c(j) = \\cos(\\text{image}_j, c)`, and those of each of its tags, :math:`x_{ct}(j)`. Then

    - ``best_tag_r2``: mean over captions of :math:`\\max_t R^2(y_c \\sim x_{ct})` (the best single tag);
    - ``all_tags_r2``: mean of :math:`R^2(y_c \\sim x_{c1} + \\dots + x_{cT})` (least squares on all tags);
    - ``single_tag_bias``: mean of the ratio best / all (1 = the caption's score follows one tag only);
    - ``single_tag_share``: share of captions whose ratio is at least `dominance`;
    - ``num_captions`` measured, ``skipped`` (fewer than `min_tags` tags, or constant scores).

    Lower ``single_tag_bias`` / ``single_tag_share`` = less single-tag bias. Needs N well above T images.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> images, tags = rng.normal(size=(200, 8)), rng.normal(size=(1, 2, 8))
        >>> one_tag = single_tag_bias_from_embeddings(images, tags[:, 0], tags, np.ones((1, 2), bool))
        >>> round(one_tag["single_tag_bias"], 3)
        1.0
        >>> both = single_tag_bias_from_embeddings(images, tags.sum(1), tags, np.ones((1, 2), bool))
        >>> both["single_tag_bias"] < 0.9
        True
    """
    def as_np(x: Any) -> np.ndarray:
        if isinstance(x, Tensor):
            x = x.detach().cpu()
            return (x.float() if x.is_floating_point() else x).numpy()
        return np.asarray(x)

    images, captions, tags, mask = as_np(image_embeds), as_np(caption_embeds), as_np(tag_embeds), as_np(tag_mask)
    if mask.dtype != bool:
        raise TypeError(f"tag_mask must be boolean, got {mask.dtype}.")
    if captions.ndim != 2 or tags.ndim != 3 or tags.shape[0] != captions.shape[0] or mask.shape != tags.shape[:2]:
        raise ValueError(
            f"Expected caption_embeds (M, d), tag_embeds (M, T, d), tag_mask (M, T); got {captions.shape}, "
            f"{tags.shape}, {mask.shape}."
        )

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    images, captions, tags = unit(images.astype(np.float64)), unit(captions.astype(np.float64)), unit(tags.astype(np.float64))
    best, full, ratios = [], [], []
    skipped = 0
    for c in range(captions.shape[0]):
        valid = np.flatnonzero(mask[c])
        if len(valid) < min_tags:
            skipped += 1
            continue
        y = images @ captions[c]
        x = images @ tags[c, valid].T  # (N, k)
        per_tag = [_r2(y, x[:, [k]]) for k in range(len(valid))]
        all_tags = _r2(y, x)
        if not np.isfinite(all_tags) or all_tags <= 1e-9:
            skipped += 1
            continue
        top = float(np.nanmax(per_tag))
        best.append(top)
        full.append(all_tags)
        ratios.append(min(1.0, top / all_tags))
    if not ratios:
        return {"best_tag_r2": float("nan"), "all_tags_r2": float("nan"), "single_tag_bias": float("nan"),
                "single_tag_share": float("nan"), "num_captions": 0, "skipped": skipped}
    ratio = np.asarray(ratios)
    return {
        "best_tag_r2": float(np.mean(best)),
        "all_tags_r2": float(np.mean(full)),
        "single_tag_bias": float(ratio.mean()),
        "single_tag_share": float((ratio >= dominance).mean()),
        "num_captions": len(ratios),
        "skipped": skipped,
    }


@torch.no_grad()
def single_tag_bias(
    model: nn.Module,
    processor: Any,
    images: Sequence[Any],
    captions: Sequence[str],
    tags: Sequence[Sequence[str]] | None = None,
    batch_size: int = 32,
    max_tags: int = 8,
    min_tags: int = 2,
    dominance: float = 0.9,
) -> dict[str, float]:
    """Embed images, captions and tags with `model` and measure `single_tag_bias_from_embeddings`.

    Args:
        model: a `VisionTextDualEncoderModel`; processor: its processor.
        images: the N images (PIL or anything `hf_clipneg.data.to_rgb` accepts).
        captions: the M captions to measure (usually the images' own captions).
        tags: per-caption tags; default `hf_clipneg.tags.extract_tags_batch(captions)` (single words only).

    Example:
        >>> from PIL import Image
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green", "white", "black", "yellow")]
        >>> report = single_tag_bias(model, processor, images, ["red circle", "blue square"])
        >>> report["num_captions"] + report["skipped"]
        2
    """
    from tqdm.auto import tqdm

    from ..data import to_rgb
    from ..tags import extract_tags_batch

    model = _unwrap(model)
    if tags is None:
        tags = extract_tags_batch(captions, max_tags=max_tags, phrases=False)
    if len(tags) != len(captions):
        raise ValueError(f"Got {len(tags)} tag lists for {len(captions)} captions.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def encode_texts(texts: list[str]) -> Tensor:
        parts = []
        for start in range(0, len(texts), batch_size):
            tokens = processor.tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                         max_length=64, return_tensors="pt").to(device)
            out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            parts.append(getattr(out, "pooler_output", out).float().cpu())
        return torch.cat(parts) if parts else torch.zeros(0, model.config.projection_dim)

    image_parts = []
    for start in tqdm(range(0, len(images), batch_size), desc="single-tag bias: images", disable=len(images) < 512):
        batch = [to_rgb(v, row=start + i) for i, v in enumerate(images[start : start + batch_size])]
        pixels = processor.image_processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        out = model.get_image_features(pixel_values=pixels)
        image_parts.append(getattr(out, "pooler_output", out).float().cpu())
    caption_embeds = encode_texts(list(captions))
    width = max(1, max((len(t[:max_tags]) for t in tags), default=1))
    flat = [row[t] if t < len(row) else "" for row in (list(r)[:max_tags] for r in tags) for t in range(width)]
    mask = torch.tensor([[t < len(list(r)[:max_tags]) for t in range(width)] for r in tags], dtype=torch.bool)
    tag_embeds = encode_texts(flat).reshape(len(captions), width, -1)
    if was_training:
        model.train()
    return single_tag_bias_from_embeddings(torch.cat(image_parts), caption_embeds, tag_embeds, mask,
                                           min_tags=min_tags, dominance=dominance)
