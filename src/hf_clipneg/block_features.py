"""Cache the inputs of the first trainable tower block for every row, for partial-depth training.

With the last blocks of each tower training (`tower_training="partial"`), everything before them is frozen:
`compute_block_inputs` runs that frozen prefix once per distinct image and caption and stores its output, so
the trainer runs only the trainable tail of each tower (`tower_tails.run_tail`) on every step.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from datasets import Array2D, Array3D, Dataset, Features, concatenate_datasets
from datasets import Image as ImageFeature
from datasets.fingerprint import Hasher

from .data import map_cache_file, to_rgb
from .encoding import _eval_mode, as_clipneg_model, autocast, text_max_length
from .features import check_embeddable, feature_provenance, image_keys
from .tower_tails import block_inputs

logger = logging.getLogger(__name__)

IMAGE_BLOCK_INPUTS = "image_block_inputs"
TEXT_BLOCK_INPUTS = "text_block_inputs"
BLOCK_INPUT_COLUMNS = (IMAGE_BLOCK_INPUTS, TEXT_BLOCK_INPUTS)


@torch.inference_mode()
def image_block_inputs(model: Any, image_processor: Any, images: list[Any], start: int) -> np.ndarray:
    """(N,) RGB images -> (N, ...) float32 inputs of vision block `start` (frozen prefix, eval mode)."""
    device = next(model.parameters()).device
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
    with _eval_mode(model), autocast(device):
        hidden = block_inputs(model.vision_model, start, pixel_values=pixel_values)
    return hidden.float().cpu().numpy()


@torch.inference_mode()
def text_block_inputs(model: Any, tokenizer: Any, texts: list[str], start: int) -> list[np.ndarray]:
    """(N,) strings -> N float32 arrays (tokens_i, D_text): the input of text block `start` at each text's real
    tokens (cut at `text_max_length(model)`, padding dropped; the collator pads them again)."""
    device = next(model.parameters()).device
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=text_max_length(model, tokenizer),
                       return_tensors="pt")
    inputs = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with _eval_mode(model), autocast(device):
        hidden = block_inputs(model.text_model, start, **inputs).float().cpu().numpy()
    lengths = tokens["attention_mask"].sum(dim=1).tolist()
    return [hidden[i, :length] for i, length in enumerate(lengths)]


def block_input_provenance(model: Any, processor: Any, tail_starts: tuple[int | None, int | None]) -> dict[str, Any]:
    """`feature_provenance` plus the blocks whose inputs are cached: equal provenance, equal cached values."""
    return {**feature_provenance(model, processor), "tail_starts": list(tail_starts)}


class _BlockEmbedder:
    def __init__(self, model, processor, image_column, caption_column, tail_starts, keys):
        self.model, self.processor = model, processor
        self.image_column, self.caption_column = image_column, caption_column
        self.image_start, self.text_start = tail_starts
        self.keys = keys

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list[np.ndarray]]:
        out = {}
        if self.image_start is not None:
            first_row: dict[str, int] = {}
            for position, row in enumerate(indices):
                first_row.setdefault(self.keys[row], position)
            images = [
                to_rgb(batch[self.image_column][p], row=indices[p], column=self.image_column) for p in first_row.values()
            ]
            by_key = dict(zip(first_row, image_block_inputs(self.model, self.processor.image_processor, images,
                                                            self.image_start)))
            out[IMAGE_BLOCK_INPUTS] = [by_key[self.keys[row]] for row in indices]
        if self.text_start is not None:
            captions = [str(c) for c in batch[self.caption_column]]
            distinct = list(dict.fromkeys(captions))
            by_caption = dict(zip(distinct, text_block_inputs(self.model, self.processor.tokenizer, distinct,
                                                              self.text_start)))
            out[TEXT_BLOCK_INPUTS] = [by_caption[c] for c in captions]
        return out


def compute_block_inputs(
    dataset: Dataset,
    model: Any,
    processor: Any,
    tail_starts: tuple[int | None, int | None],
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> Dataset:
    """Add `image_block_inputs` (the input of vision block `tail_starts[0]`, e.g. (C, H, W) float32 for
    EfficientNet) and `text_block_inputs` ((tokens, D_text) float32 at each caption's real tokens, input of
    text block `tail_starts[1]`) to every row; a None start leaves that tower's column out.

    Each distinct image (same bytes, or same file with the same size and modification time) is run once per
    map batch, each distinct caption once per batch. The cache fingerprint covers every row's image identity
    and caption and `block_input_provenance` (tower weights, processor, text policy, precision, block
    indices), so a changed file or other weights give new values, and datasets with the same rows in the same
    order (one split mined with different rules) share one cache file.

    Raises:
        KeyError: a column is missing. ValueError: blank captions, an empty dataset.
        BadImageError: an unreadable image (naming the row).

    Example:
        >>> from datasets import Dataset
        >>> from PIL import Image
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> ds = Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "caption": ["a red circle"]})
        >>> row = compute_block_inputs(ds, model, processor, (1, 1), device="cpu").with_format("numpy")[0]
        >>> row["image_block_inputs"].shape, row["text_block_inputs"].shape
        ((17, 32), (5, 32))
    """
    check_embeddable(dataset, image_column, caption_column)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = as_clipneg_model(model).to(device)
    provenance = block_input_provenance(model, processor, tail_starts)
    keys = image_keys(dataset, image_column)
    captions = [str(c) for c in dataset.with_format("arrow")[caption_column].to_pylist()]
    # Content-addressed: the values depend only on each row's image identity, caption and the provenance, so
    # datasets with the same rows (e.g. the same split mined with different rules) share one cache file.
    fingerprint = Hasher.hash(
        ["hf_clipneg.compute_block_inputs", hashlib.sha256("\n".join(keys).encode()).hexdigest(),
         hashlib.sha256("\n".join(captions).encode()).hexdigest(), provenance]
    )
    image_feature = dataset.features.get(image_column)
    undecoded = isinstance(image_feature, ImageFeature) and image_feature.decode
    source = dataset.select_columns([image_column, caption_column])
    if undecoded:
        source = source.cast_column(image_column, ImageFeature(decode=False))
    columns = {}
    if tail_starts[0] is not None:
        probe = source.select([0])[image_column][0]
        image_shape = image_block_inputs(model, processor.image_processor, [to_rgb(probe, row=0, column=image_column)],
                                         tail_starts[0]).shape[1:]
        columns[IMAGE_BLOCK_INPUTS] = (Array3D if len(image_shape) == 3 else Array2D)(shape=image_shape, dtype="float32")
    if tail_starts[1] is not None:
        columns[TEXT_BLOCK_INPUTS] = Array2D(shape=(None, model.config.text_config.hidden_size), dtype="float32")
    if not columns:
        raise ValueError("tail_starts=(None, None): there is no block input to cache.")
    features = Features(columns)
    cached = source.map(
        _BlockEmbedder(model, processor, image_column, caption_column, tail_starts, keys),
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=[image_column, caption_column],
        features=features,
        new_fingerprint=fingerprint,
        cache_file_name=map_cache_file(dataset, fingerprint),
        desc="Caching the frozen prefix: " + ", ".join(
            f"{name} tower up to block {start}" for name, start in zip(("vision", "text"), tail_starts) if start is not None
        ),
    )
    out = concatenate_datasets([dataset.remove_columns([c for c in columns if c in dataset.column_names]), cached],
                               axis=1)
    return out
