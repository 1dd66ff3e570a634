"""Embed every (image, caption) row of a dataset with the frozen towers of a dual encoder.

The features are the L2-normalised tower features of `ClipNegDualEncoderModel` (vision ``pooler_output``;
text pooled as the model's config says), not the projections: clusters reflect what the pretrained towers
already know, and the trainer's cached-tower path feeds the same vectors to the projections.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from datasets.fingerprint import Hasher

from .data import BadImageError, blank_captions, map_cache_file, to_rgb
from .encoding import as_clipneg_model, autocast_dtype, encode_images, encode_texts, text_max_length

logger = logging.getLogger(__name__)

IMAGE_FEATURES = "image_features"
TEXT_FEATURES = "text_features"
_FEATURES_VERSION = "2"  # bump when the embedding procedure changes, to invalidate cached results


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


def check_embeddable(dataset: Dataset, image_column: str, caption_column: str) -> None:
    """Raise a clear error unless every row of `dataset` has an image column and a non-blank caption.

    Raises:
        KeyError: a column is missing. ValueError: blank captions (naming the rows), an empty dataset.
    """
    if image_column not in dataset.column_names:
        raise KeyError(f"Image column {image_column!r} not found (columns: {dataset.column_names}); pass image_column=.")
    check_captions(dataset, caption_column)
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to embed.")


FEATURES_PREFIX = "hf_clipneg.features="  # the provenance line compute_features writes into info.description


def feature_provenance(model: Any, processor: Any) -> dict[str, Any]:
    """What identifies tower features: the towers' weights, the processor, the text pooling and length
    policy and the inference precision. Two feature columns with equal provenance hold the same vectors.

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> sorted(feature_provenance(*build_tiny_dual_encoder()))
        ['precision', 'processor', 'text_max_length', 'text_pooling', 'towers', 'version']
    """
    model = as_clipneg_model(model)
    dtype = autocast_dtype(next(model.parameters()).device)
    return {
        "version": _FEATURES_VERSION,
        "towers": hashlib.sha256(
            (model_digest(model.vision_model) + model_digest(model.text_model)).encode()
        ).hexdigest(),
        "processor": processor_digest(processor),
        "text_pooling": model.text_pooling,
        "text_max_length": text_max_length(model, getattr(processor, "tokenizer", None)),
        "precision": str(dtype) if dtype is not None else "float32",
    }


def stored_provenance(dataset: Dataset) -> dict[str, Any] | None:
    """The provenance `compute_features` stored with `dataset`'s feature columns, or None (user-made columns)."""
    for line in (dataset.info.description or "").splitlines():
        if line.startswith(FEATURES_PREFIX):
            return json.loads(line[len(FEATURES_PREFIX) :])
    return None


def _with_provenance(dataset: Dataset, provenance: dict[str, Any]) -> Dataset:
    kept = [line for line in (dataset.info.description or "").splitlines() if not line.startswith(FEATURES_PREFIX)]
    dataset.info.description = "\n".join(kept + [FEATURES_PREFIX + json.dumps(provenance, sort_keys=True)])
    return dataset


def _file_key(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return f"path:{path}:missing"
    return f"path:{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def image_keys(dataset: Dataset, image_column: str, chunk: int = 1024) -> list[str]:
    """One identity per row's image, read without decoding: a SHA-1 of embedded bytes, or path + size +
    modification time for an image referenced by path (so a file changed on disk gets a new key).

    Rows with equal keys hold the same image: `compute_features` embeds it once, and the keys enter the
    cache fingerprint, so rewriting an image file invalidates cached features.
    """
    keys: list[str] = []
    arrow = dataset.with_format("arrow")
    for start in range(0, len(dataset), chunk):
        column = arrow[start : start + chunk][image_column]
        for value in column.to_pylist():
            if isinstance(value, dict):
                if value.get("bytes"):
                    keys.append("bytes:" + hashlib.sha1(value["bytes"]).hexdigest())
                    continue
                value = value.get("path")
            if isinstance(value, str):
                keys.append(_file_key(value))
            elif isinstance(value, (bytes, bytearray)):
                keys.append("bytes:" + hashlib.sha1(value).hexdigest())
            else:  # arrays or other values: no identity, embed the row on its own
                keys.append(f"row:{len(keys)}")
    return keys


class _Memo:
    """Features of keys that occur again in later rows, dropped once their last row is served, so each
    distinct image or caption is embedded once per process while memory holds only the repeated ones."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.remaining = Counter(keys)
        self.stored: dict[str, np.ndarray] = {}

    def features(
        self, rows: list[int], width: int, embed: Callable[[dict[str, list[int]]], dict[str, np.ndarray]]
    ) -> np.ndarray:
        """(len(rows), width) features; `embed` gets {key: batch positions} of the keys not in memory."""
        out = np.empty((len(rows), width), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        for position, row in enumerate(rows):
            key = self.keys[row]
            if key in self.stored:
                out[position] = self.stored[key]
            else:
                todo.setdefault(key, []).append(position)
        fresh = embed(todo) if todo else {}
        for key, positions in todo.items():
            out[positions] = fresh[key]
        for row in rows:
            key = self.keys[row]
            self.remaining[key] -= 1
            if self.remaining[key] <= 0:
                self.stored.pop(key, None)
            elif key in fresh:
                self.stored[key] = fresh[key]
        return out


class _Embedder:
    """The batched map function: decode and embed each distinct image and caption once, through
    `encoding.encode_images` / `encode_texts` (kept picklable for num_proc)."""

    def __init__(self, model, processor, image_column, caption_column, on_bad_image, image_keys, text_keys):
        self.model = model
        self.processor = processor
        self.image_column = image_column
        self.caption_column = caption_column
        self.on_bad_image = on_bad_image
        self.image_memo = _Memo(image_keys)
        self.text_memo = _Memo(text_keys)

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, np.ndarray]:
        values = batch[self.image_column]
        captions = batch[self.caption_column]

        def embed_images(todo: dict[str, list[int]]) -> dict[str, np.ndarray]:
            decoded, fresh = {}, {}
            for key, positions in todo.items():
                try:
                    decoded[key] = to_rgb(values[positions[0]], row=indices[positions[0]], column=self.image_column)
                except BadImageError as err:
                    if self.on_bad_image == "error":
                        raise
                    logger.warning("Skipping row %d: %s", indices[positions[0]], err)
                    fresh[key] = np.full(self.model.vision_embed_dim, np.nan, dtype=np.float32)
            if decoded:
                vectors = encode_images(self.model, self.processor.image_processor, list(decoded.values()))
                fresh.update(zip(decoded, vectors.cpu().numpy()))
            return fresh

        def embed_texts(todo: dict[str, list[int]]) -> dict[str, np.ndarray]:
            texts = [str(captions[positions[0]]) for positions in todo.values()]
            return dict(zip(todo, encode_texts(self.model, self.processor.tokenizer, texts).cpu().numpy()))

        return {
            IMAGE_FEATURES: self.image_memo.features(indices, self.model.vision_embed_dim, embed_images),
            TEXT_FEATURES: self.text_memo.features(indices, self.model.text_embed_dim, embed_texts),
        }


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
    on_bad_image: Literal["error", "skip"] = "error",
    known: Dataset | None = None,
) -> Dataset:
    """Add L2-normalised float32 `image_features` (N, D_vision) and `text_features` (N, D_text) columns: the
    tower features of `ClipNegDualEncoderModel` (vision ``pooler_output``; text pooled as
    `config.text_pooling` says, cut at `config.text_max_length` tokens), not the projections.

    These are exactly the inputs of the model's projections, so the trainer's cached-tower path trains on
    them directly. Each distinct image (same bytes, or same file with the same size and modification time)
    and each distinct caption is embedded once. Inference runs in bfloat16 only where the hardware supports
    it natively (`encoding.autocast_dtype`).

    Reuse: a dataset whose feature columns were made by the same towers, processor and policies (the
    provenance stored in `info.description`) is returned unchanged, as is one with feature columns of its
    own (no provenance); columns made by other towers are recomputed. Caching: the map's fingerprint covers
    the dataset's fingerprint, the identity of every image (bytes digest, or path + size + mtime) and the
    provenance, so a file changed on disk or new weights give new features; datasets backed by cache files
    (parquet, `load_from_disk`, the Hub...) load a finished result instead of re-embedding (in-memory
    datasets cache nothing: save and reload them if you need that).

    Args:
        dataset: rows with an image column (PIL images, paths, bytes, ...) and a caption column.
        model: a `VisionTextDualEncoderModel`; None builds the packaged towers (`build_dual_encoder()`).
        processor: its `VisionTextDualEncoderProcessor` (required when `model` is given).
        batch_size: rows per map batch (repeated images within and across batches are embedded once).
        num_proc: processes for `Dataset.map` (CPU only; each process holds a copy of the model).
        device: defaults to CUDA when available.
        on_bad_image: "error" raises on the first unreadable image, naming the row; "skip" gives such
            rows NaN features and logs them (the mining step excludes and counts them).
        known: a dataset that `compute_features` already embedded with the same towers and settings (e.g. the
            plain training split when `dataset` adds rows with more captions of the same images): its images
            and captions are not embedded again.

    Raises:
        KeyError: a column is missing. ValueError: empty dataset, blank captions, half the feature columns.
        BadImageError: an unreadable image with `on_bad_image="error"`.

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
    present = [c for c in (IMAGE_FEATURES, TEXT_FEATURES) if c in dataset.column_names]
    if len(present) == 1:
        raise ValueError(
            f"The dataset has {present} but not both feature columns: remove it (`ds.remove_columns({present})`) "
            "to recompute both, or add the other one."
        )
    if model is not None and processor is None:
        raise ValueError("Pass the model's `processor` (a VisionTextDualEncoderProcessor) along with `model`.")
    stored = stored_provenance(dataset) if present else None
    if present and stored is None:
        logger.info("Dataset already has %r and %r of its own: using them.", IMAGE_FEATURES, TEXT_FEATURES)
        return dataset
    check_embeddable(dataset, image_column, caption_column)
    if model is None:
        from .towers import build_dual_encoder

        model, processor = build_dual_encoder()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = as_clipneg_model(model).eval().to(device)
    provenance = feature_provenance(model, processor)
    if present:
        if stored == provenance:
            logger.info("Dataset already has %r and %r from these towers: using them.", IMAGE_FEATURES, TEXT_FEATURES)
            return dataset
        logger.warning("The dataset's feature columns were made by other towers or settings: recomputing them.")
        dataset = dataset.remove_columns(present)

    images = image_keys(dataset, image_column)
    captions = [str(c) for c in dataset.with_format("arrow")[caption_column].to_pylist()]
    fingerprint = Hasher.hash(
        [
            "hf_clipneg.compute_features",
            dataset._fingerprint,
            hashlib.sha256("\n".join(images).encode()).hexdigest(),
            provenance,
            image_column,
            caption_column,
            on_bad_image,
        ]
    )
    embedder = _Embedder(model, processor, image_column, caption_column, on_bad_image, images, captions)
    if known is not None:
        _seed_from(embedder, known, provenance, image_column, caption_column)
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
        cache_file_name=map_cache_file(source, fingerprint),
        desc=f"Embedding {len(set(images))} distinct images and {len(set(captions))} distinct captions",
    )
    if undecoded:
        out = out.cast_column(image_column, image_feature)
    _report_nan_rows(out)
    return _with_provenance(out, provenance)


def _seed_from(embedder: _Embedder, known: Dataset, provenance: dict, image_column: str, caption_column: str) -> None:
    if stored_provenance(known) != provenance:
        raise ValueError(
            "`known` must be a dataset returned by compute_features with the same model and processor "
            "(its stored provenance differs): embed it again with this model, or leave `known` out."
        )
    vectors = known.select_columns([IMAGE_FEATURES, TEXT_FEATURES]).with_format("numpy")[:]
    for memo, keys, column in (
        (embedder.image_memo, image_keys(known, image_column), IMAGE_FEATURES),
        (embedder.text_memo, [str(c) for c in known.with_format("arrow")[caption_column].to_pylist()], TEXT_FEATURES),
    ):
        for key, vector in zip(keys, vectors[column]):
            if memo.remaining.get(key, 0) > 0 and not np.isnan(vector).any():
                memo.stored[key] = vector


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
