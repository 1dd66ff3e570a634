"""The one place that runs the towers: precision by hardware, one text-length policy, one text pooling.

Everything that embeds (feature extraction for mining and for the trainer's cached-tower path, the
trainer's evaluation, `ClipNegRetriever`) calls `encode_images` / `encode_texts` here, so a vector means
the same thing wherever it was computed.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from PIL import Image

from .modeling import ClipNegDualEncoderModel

logger = logging.getLogger(__name__)

DEFAULT_TEXT_MAX_LENGTH = 64
_CLS_POOLED_TEXT_MODELS = {"clip_text_model", "siglip_text_model", "chinese_clip_text_model", "clip", "siglip"}


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for frozen-tower inference on `device`: bfloat16 where the hardware computes it
    natively (CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX), else None (float32).

    On CPUs without native bf16 (e.g. AVX2-only), bf16 autocast measured 3-5x slower than float32 for
    EfficientNet-Lite0. `HF_CLIPNEG_PRECISION=fp32|bf16` overrides the choice. The choice is logged once
    per device type.

    Example:
        >>> autocast_dtype("cpu") in (None, torch.bfloat16)
        True
    """
    return _autocast_dtype(torch.device(device).type, os.environ.get("HF_CLIPNEG_PRECISION", "").lower())


@functools.lru_cache(maxsize=None)
def _autocast_dtype(device_type: str, forced: str) -> torch.dtype | None:
    if forced in ("fp32", "float32"):
        dtype = None
    elif forced in ("bf16", "bfloat16"):
        dtype = torch.bfloat16
    elif device_type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    elif device_type == "cpu":
        dtype = torch.bfloat16 if _cpu_has_native_bf16() else None
    else:
        dtype = None
    logger.info("Tower inference on %s runs in %s.", device_type, "bfloat16 autocast" if dtype else "float32")
    return dtype


def autocast(device: str | torch.device) -> Any:
    """`torch.autocast` context for `autocast_dtype(device)`, or a no-op context in float32."""
    dtype = autocast_dtype(device)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else nullcontext()


def text_max_length(model: Any, tokenizer: Any = None) -> int:
    """The token length captions are cut to, everywhere: `config.text_max_length` (written by
    `build_dual_encoder` and by the trainer, so it travels with the saved model), else the tower's own limit
    (tokenizer `model_max_length` and text `max_position_embeddings`, at most 512).

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> text_max_length(build_tiny_dual_encoder()[0])
        64
    """
    configured = getattr(model.config, "text_max_length", None)
    if configured:
        return int(configured)
    limits = [512]
    positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and tokenizer_limit > 0:
        limits.append(tokenizer_limit)
    return min(limits)


def default_text_pooling(text_tower: str | os.PathLike | None, model_type: str) -> str:
    """How to pool a text tower: its sentence-transformers pooling config when it ships one
    (`1_Pooling/config.json`), else `"pooler"` for towers whose pooled output is trained as the sentence
    embedding (CLIP/SigLIP text models) and `"mean"` otherwise (BERT's pooler is a next-sentence head, not a
    sentence embedding).

    On fashion-products (validation, frozen towers, vanilla), mean pooling of all-MiniLM-L6-v2 beat BERT's CLS
    pooler by 3-6 R@1 (issue #14); see README.

    Example:
        >>> default_text_pooling(None, "bert"), default_text_pooling(None, "clip_text_model")
        ('mean', 'pooler')
    """
    if text_tower is not None:
        path = os.path.join(os.fspath(text_tower), "1_Pooling", "config.json")
        if os.path.isfile(path):
            import json

            with open(path, encoding="utf-8") as f:
                pooling = json.load(f)
            if pooling.get("pooling_mode_mean_tokens"):
                return "mean"
            if pooling.get("pooling_mode_cls_token"):
                return "pooler"
    return "pooler" if model_type in _CLS_POOLED_TEXT_MODELS else "mean"


def as_clipneg_model(model: Any) -> ClipNegDualEncoderModel:
    """`model` as a `ClipNegDualEncoderModel` (same object, class swapped) so it pools text as its config says.

    A plain `VisionTextDualEncoderModel` (config without `text_pooling`) keeps pooling with its tower's
    `pooler_output`, i.e. computes exactly what transformers computes.

    Raises:
        TypeError: `model` is not a `VisionTextDualEncoderModel`.
    """
    from transformers import VisionTextDualEncoderModel

    if isinstance(model, ClipNegDualEncoderModel):
        return model
    if not isinstance(model, VisionTextDualEncoderModel):
        raise TypeError(f"Expected a VisionTextDualEncoderModel, got {type(model).__name__}.")
    model.__class__ = ClipNegDualEncoderModel
    return model


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """No dropout or batch-norm updates while embedding; the model's training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def encode_images(
    model: Any, image_processor: Any, images: Sequence[Image.Image], project: bool = False, normalize: bool = True
) -> torch.Tensor:
    """(N,) RGB PIL images -> (N, D) float32 L2-normalised tower features (`project=False`, D = vision width)
    or joint-space embeddings (`project=True`, D = projection_dim), on the model's device.

    `normalize=False` returns the values before their final L2 normalisation: the vision tower's raw pooled
    output (`project=False`) or the projection of the tower features (`project=True`).

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> encode_images(model, processor.image_processor, [Image.new("RGB", (8, 8))]).shape
        torch.Size([1, 32])
    """
    model = as_clipneg_model(model)
    device = _device_of(model)
    pixel_values = image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(device)
    with _eval_mode(model), autocast(device):
        features, outputs = model._encode_image(pixel_values)
        if project:
            features = model.visual_projection(features)
        elif not normalize:
            features = outputs.pooler_output.reshape(len(features), -1)
    features = features.float()
    return torch.nn.functional.normalize(features, dim=-1) if normalize else features


@torch.inference_mode()
def encode_texts(
    model: Any, tokenizer: Any, texts: Sequence[str], project: bool = False, normalize: bool = True
) -> torch.Tensor:
    """(N,) strings -> (N, D) float32 L2-normalised text features (`project=False`) or joint-space embeddings
    (`project=True`), cut at `text_max_length(model, tokenizer)` tokens and pooled as the model's config says.
    `normalize=False` returns the joint-space embeddings before their final L2 normalisation.

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> encode_texts(model, processor.tokenizer, ["a red circle"], project=True).shape
        torch.Size([1, 16])
    """
    model = as_clipneg_model(model)
    device = _device_of(model)
    tokens = tokenizer(
        list(texts), padding=True, truncation=True, max_length=text_max_length(model, tokenizer), return_tensors="pt"
    )
    inputs = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with _eval_mode(model), autocast(device):
        features = model.text_tower_features(**inputs)
        if project:
            features = model.text_projection(features)
    features = features.float()
    return torch.nn.functional.normalize(features, dim=-1) if normalize else features
