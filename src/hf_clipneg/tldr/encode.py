"""Embeddings for TLDR from a `VisionTextDualEncoderModel`: texts through `hf_clipneg.encoding`, in batches;
images together with the vision tower's raw pooled output (the target space of an `ImageSpaceProjector`).

`hf_clipneg.encoding` is imported on first use, so importing `hf_clipneg.tldr` does not load transformers.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def model_device(model: torch.nn.Module, device: str | torch.device | None = None) -> torch.device:
    """`device` when given, else the device of the model's first parameter (CPU for a model without any).

    Example:
        >>> model_device(torch.nn.Linear(2, 2)), model_device(torch.nn.Linear(2, 2), "meta")
        (device(type='cpu'), device(type='meta'))
    """
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def encode_texts(model: Any, processor: Any, texts: Sequence[str], batch_size: int = 64,
                 device: str | torch.device | None = None, normalize: bool = True) -> torch.Tensor:
    """(N,) strings -> (N, projection_dim) float32 joint-space text embeddings on the CPU, through
    `hf_clipneg.encoding.encode_texts` (pooled and cut as the model was trained); L2-normalised unless
    `normalize=False`. `device` is unused: the model's own device is used.

    Raises:
        ValueError: a text is empty, blank or not a string (its row is named).

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> encode_texts(model, processor, ["a red shirt", "a blue shoe"]).shape
        torch.Size([2, 16])
    """
    from tqdm.auto import tqdm

    from ..encoding import encode_texts as encode_batch

    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Text {row} is empty or not a string ({text!r}); give every description some words.")
    tokenizer = getattr(processor, "tokenizer", processor)
    batches = range(0, len(texts), batch_size)
    embeds = [
        encode_batch(model, tokenizer, list(texts[start:start + batch_size]), project=True, normalize=normalize).cpu()
        for start in tqdm(batches, desc="Encoding texts", disable=len(texts) <= batch_size)
    ]
    return torch.cat(embeds)


@torch.no_grad()
def encode_images(model: Any, processor: Any, images: Sequence[Any], batch_size: int = 32,
                  device: str | torch.device | None = None, normalize: bool = True,
                  return_tower_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(N,) images -> (N, projection_dim) float32 joint-space image embeddings on the CPU (L2-normalised unless
    `normalize=False`), with `return_tower_features` also the (N, vision hidden size) raw, unnormalised pooled
    output of the vision tower (the target space of an :class:`ImageSpaceProjector`). Images may be anything
    :func:`hf_clipneg.data.to_rgb` decodes.

    Example:
        >>> from PIL import Image
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> joint, tower = encode_images(model, processor, [Image.new("RGB", (32, 32))], return_tower_features=True)
        >>> tuple(joint.shape), tuple(tower.shape)
        ((1, 16), (1, 32))
    """
    from tqdm.auto import tqdm

    from ..data import to_rgb
    from ..encoding import encode_images as encode_batch

    model = model.to(model_device(model, device))
    image_processor = getattr(processor, "image_processor", processor)
    joint, tower = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="Encoding images", disable=len(images) <= batch_size):
        batch = [to_rgb(image, row=start + i) for i, image in enumerate(images[start:start + batch_size])]
        pooled = encode_batch(model, image_processor, batch, normalize=False)
        tower.append(pooled.cpu())
        with torch.no_grad():  # the projection is linear and bias-free: of the raw or the normalised output alike
            joint.append(model.visual_projection(pooled.to(model.visual_projection.weight.dtype)).float().cpu())
    embeds = torch.cat(joint)
    if normalize:
        embeds = torch.nn.functional.normalize(embeds, dim=1)
    return (embeds, torch.cat(tower)) if return_tower_features else embeds
