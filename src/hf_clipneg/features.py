"""Embed every (image, caption) row of a dataset with the frozen towers of a dual encoder.

The features are the towers' own pooled outputs (vision ``pooler_output``; text = masked mean of
``last_hidden_state``, the sentence-transformers convention), L2-normalised, not the freshly
initialised projections, so that clusters reflect what the pretrained towers already know.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from datasets.fingerprint import Hasher

from .data import blank_captions
from .images import BadImageError, to_rgb
from .towers import mean_pool

logger = logging.getLogger(__name__)

IMAGE_FEATURES = "image_features"
TEXT_FEATURES = "text_features"
_FEATURES_VERSION = "1"  # bump when the embedding procedure changes, to invalidate cached results


def has_feature_columns(dataset: Dataset) -> bool:
    """True when `dataset` already carries both `image_features` and `text_features` columns."""
    return IMAGE_FEATURES in dataset.column_names and TEXT_FEATURES in dataset.column_names


def model_digest(model: torch.nn.Module) -> str:
    """A stable digest of a model's weights (names, dtypes, shapes and bytes of every state_dict tensor).

    Hashing the tensors directly is fast and stable across processes, unlike pickling the module.

    Example:
        >>> len(model_digest(torch.nn.Linear(2, 2)))
        64
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def processor_digest(processor: Any) -> str:
    """A stable digest of a processor's configuration (image processor settings and tokenizer vocabulary)."""
    parts: list[str] = []
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        parts.append(json.dumps(image_processor.to_dict(), sort_keys=True, default=str))
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # Calling the tokenizer stores its last padding/truncation settings in the backend: drop them.
            state = json.loads(backend.to_str())
            state.pop("padding", None)
            state.pop("truncation", None)
            parts.append(json.dumps(state, sort_keys=True))
        else:
            parts.append(json.dumps(sorted(tokenizer.get_vocab().items())))
        parts.append(type(tokenizer).__name__)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def check_captions(dataset: Dataset, caption_column: str) -> None:
    """Raise a ValueError naming the rows whose caption is missing, empty or only whitespace."""
    if caption_column not in dataset.column_names:
        raise KeyError(
            f"Caption column {caption_column!r} not found (columns: {dataset.column_names}); pass caption_column=."
        )
    column = dataset.with_format("arrow")[caption_column]
    if isinstance(column, pa.Table):
        column = column.column(0)
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise TypeError(f"Caption column {caption_column!r} must hold strings, got {column.type}.")
    bad = np.flatnonzero(blank_captions(column))
    if bad.size:
        raise ValueError(
            f"{bad.size} row(s) have an empty or missing caption in column {caption_column!r}, first rows: "
            f"{bad[:10].tolist()}. Fill them in or drop them, e.g. `ds.filter(lambda c: bool(c and c.strip()), "
            f"input_columns={caption_column!r})`."
        )


class _Embedder:
    """The batched map function: decode, preprocess and run both towers (kept picklable for num_proc)."""

    def __init__(self, model, processor, image_column, caption_column, device, max_length, on_bad_image):
        self.model = model
        self.processor = processor
        self.image_column = image_column
        self.caption_column = caption_column
        self.device = device
        self.max_length = max_length
        self.on_bad_image = on_bad_image

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, np.ndarray]:
        images, bad = [], []
        for position, (value, row) in enumerate(zip(batch[self.image_column], indices)):
            try:
                images.append(to_rgb(value, row=row, column=self.image_column))
            except BadImageError as err:
                if self.on_bad_image == "error":
                    raise
                logger.warning("Skipping row %d: %s", row, err)
                bad.append(position)
                images.append(None)
        placeholder = next((im for im in images if im is not None), None)
        if placeholder is None:
            from PIL import Image

            placeholder = Image.new("RGB", (32, 32))
        images = [placeholder if im is None else im for im in images]
        with torch.inference_mode():
            pixel_values = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            vision_out = self.model.vision_model(pixel_values=pixel_values.to(self.device))
            image_features = vision_out.pooler_output.reshape(len(images), -1).float()
            tokens = self.processor.tokenizer(
                list(batch[self.caption_column]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            text_inputs = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            text_out = self.model.text_model(**text_inputs)
            text_features = mean_pool(text_out.last_hidden_state.float(), text_inputs["attention_mask"])
            image_features = torch.nn.functional.normalize(image_features, dim=-1).cpu().numpy()
            text_features = torch.nn.functional.normalize(text_features, dim=-1).cpu().numpy()
        if bad:
            image_features[bad] = np.nan
            text_features[bad] = np.nan
        return {IMAGE_FEATURES: image_features.astype(np.float32), TEXT_FEATURES: text_features.astype(np.float32)}


def compute_features(
    dataset: Dataset,
    model: Any = None,
    processor: Any = None,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    batch_size: int = 64,
    num_proc: int | None = None,
    device: str | torch.device | None = None,
    max_length: int = 64,
    on_bad_image: Literal["error", "skip"] = "error",
) -> Dataset:
    """Add L2-normalised float32 `image_features` and `text_features` columns computed by the frozen towers.

    Image features are the vision tower's ``pooler_output``; text features the attention-masked mean of
    the text tower's ``last_hidden_state`` (the projections of the dual encoder are not used: they are
    random before training). A dataset that already has both columns is returned unchanged.

    Caching: the map is fingerprinted from the input dataset's fingerprint, a digest of the model
    weights, the processor configuration and the arguments, so a second identical call on a dataset
    backed by cache files (loaded from disk, parquet, the Hub...) loads the result instead of
    re-embedding. In-memory datasets (e.g. `Dataset.from_dict`) have no cache directory, so `datasets`
    caches nothing for them: save and reload them first if you need caching.

    Args:
        dataset: rows with an image column (PIL images, paths, bytes, ...) and a caption column.
        model: a `VisionTextDualEncoderModel`; None builds the packaged towers
            (`hf_clipneg.towers.build_dual_encoder()`: EfficientNet-Lite0 + all-MiniLM-L6-v2).
        processor: its `VisionTextDualEncoderProcessor` (required when `model` is given).
        batch_size: rows per forward pass.
        num_proc: processes for `Dataset.map` (CPU only; each process holds a copy of the model).
        device: defaults to CUDA when available.
        max_length: token truncation length for captions.
        on_bad_image: "error" raises on the first unreadable image, naming the row; "skip" gives such
            rows NaN features and logs them (the mining step excludes and counts them).

    Example:
        >>> from datasets import Dataset
        >>> from PIL import Image
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> ds = Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2, "caption": ["a red circle", "a blue star"]})
        >>> out = compute_features(ds, model, processor, device="cpu")
        >>> len(out[0]["image_features"]), len(out[0]["text_features"])
        (32, 32)
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}.")
    if has_feature_columns(dataset):
        logger.info("Dataset already has %r and %r: using them.", IMAGE_FEATURES, TEXT_FEATURES)
        return dataset
    present = [c for c in (IMAGE_FEATURES, TEXT_FEATURES) if c in dataset.column_names]
    if present:
        raise ValueError(
            f"The dataset has {present} but not both feature columns: remove it (`ds.remove_columns({present})`) "
            "to recompute both, or add the other one."
        )
    if image_column not in dataset.column_names:
        raise KeyError(f"Image column {image_column!r} not found (columns: {dataset.column_names}); pass image_column=.")
    check_captions(dataset, caption_column)
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to embed.")
    if model is None:
        from .towers import build_dual_encoder

        model, processor = build_dual_encoder()
    elif processor is None:
        raise ValueError("Pass the model's `processor` (a VisionTextDualEncoderProcessor) along with `model`.")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.eval().to(device)

    fingerprint = Hasher.hash(
        [
            "hf_clipneg.compute_features",
            _FEATURES_VERSION,
            dataset._fingerprint,
            model_digest(model),
            processor_digest(processor),
            image_column,
            caption_column,
            int(max_length),
            on_bad_image,
        ]
    )
    embedder = _Embedder(model, processor, image_column, caption_column, torch.device(device), max_length, on_bad_image)
    # Decode images ourselves (to_rgb), so a broken file becomes a BadImageError naming the row, or a
    # skipped row, instead of an error inside datasets' formatter.
    image_feature = dataset.features.get(image_column)
    undecoded = isinstance(image_feature, ImageFeature) and image_feature.decode
    source = dataset.cast_column(image_column, ImageFeature(decode=False)) if undecoded else dataset
    out = source.map(
        embedder,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        desc="Embedding images and captions",
    )
    if undecoded:
        out = out.cast_column(image_column, image_feature)
    _report_nan_rows(out)
    return out


def _report_nan_rows(dataset: Dataset) -> None:
    column = dataset.with_format("arrow")[IMAGE_FEATURES]
    if isinstance(column, pa.Table):
        column = column.column(0)
    first = pc.list_element(column, 0)
    bad = np.flatnonzero(np.isnan(np.asarray(first.to_numpy(zero_copy_only=False), dtype=np.float64)))
    if bad.size:
        logger.warning(
            "%d row(s) had unreadable images and got NaN features (excluded from mining): %s%s",
            bad.size, bad[:20].tolist(), " ..." if bad.size > 20 else "",
        )
