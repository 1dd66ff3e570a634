"""Batch collation for `ClipNegTrainer`: decode images, tokenise captions and mined texts, and pass the
per-row mining columns the loss needs to build in-batch weights."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data import to_rgb

# Per-row columns written by the mining step that the in-batch rule may read.
SCALAR_META_COLUMNS = ("row_id", "image_cluster", "text_cluster", "group")
LIST_META_COLUMNS = ("similar_image_clusters", "similar_text_clusters")
FEATURE_META_COLUMNS = ("image_features", "text_features")
#: Batch key of each row's position in the training dataset (ClipNegTrainer adds it to every training
#: dataset): in a gathered multi-process batch, equal positions are copies of one row (accelerate pads an
#: uneven last batch by repeating rows) and never meet as negatives.
ROW_INDEX = "row_index"
META_COLUMNS = SCALAR_META_COLUMNS + LIST_META_COLUMNS + FEATURE_META_COLUMNS + (ROW_INDEX,)
_DEFAULT_META_COLUMNS = SCALAR_META_COLUMNS + LIST_META_COLUMNS + FEATURE_META_COLUMNS


def random_resized_crop_and_flip(image: Image.Image, rng: random.Random, min_scale: float = 0.7) -> Image.Image:
    """Light augmentation: a random crop covering `min_scale`..1 of the area (aspect 3/4..4/3), then a
    horizontal flip with probability 1/2. The processor resizes the result afterwards."""
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(min_scale, 1.0)
        aspect = rng.uniform(3 / 4, 4 / 3)
        crop_w = int(round((area * aspect) ** 0.5))
        crop_h = int(round((area / aspect) ** 0.5))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = rng.randint(0, width - crop_w)
            top = rng.randint(0, height - crop_h)
            image = image.crop((left, top, left + crop_w, top + crop_h))
            break
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def captions_by_row_id(dataset: Any, caption_column: str = "caption") -> dict[int, str]:
    """Map each `row_id` of a mined dataset to its caption (what mined `negative_indices` refer to).

    Example:
        >>> from datasets import Dataset
        >>> captions_by_row_id(Dataset.from_dict({"row_id": [4, 7], "caption": ["a", "b"]}))
        {4: 'a', 7: 'b'}
    """
    columns = dataset.select_columns(["row_id", caption_column]).with_format("arrow")[:]
    return dict(zip(columns["row_id"].to_pylist(), columns[caption_column].to_pylist()))


def text_features_by_row_id(
    dataset: Any, column: str = "text_features"
) -> tuple[dict[int, int], np.ndarray | list[np.ndarray]]:
    """`(row_id -> position, cached texts)` of a mined dataset with cached text columns: where the cached-feature
    collator finds the text of a mined negative (`negative_indices` hold `row_id`s). The texts are an (N, D)
    float32 array for `text_features`, a list of (tokens_i, D) arrays for `text_block_inputs`."""
    columns = dataset.select_columns(["row_id", column]).with_format("numpy")[:]
    values = columns[column]
    if column == "text_features":
        values = np.asarray(np.stack(values) if values.dtype == object else values, dtype=np.float32)
    else:
        values = [np.asarray(v, dtype=np.float32) for v in values]
    return {int(r): i for i, r in enumerate(columns["row_id"])}, values


def _pad_tokens(sequences: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens_i, D) arrays -> zero-padded (N, T, D) float32 states and the (N, T) attention mask."""
    width = max(len(s) for s in sequences)
    states = np.zeros((len(sequences), width, sequences[0].shape[-1]), dtype=np.float32)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for i, sequence in enumerate(sequences):
        states[i, : len(sequence)] = sequence
        mask[i, : len(sequence)] = 1
    return torch.from_numpy(states), torch.from_numpy(mask)


def _pad_ragged(rows: Sequence[Sequence[int]], pad_value: int = -1) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), pad_value, dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = row  # numpy fills from a list or array without a tensor per row
    return torch.from_numpy(out)


@dataclass
class ClipNegCollator:
    """Turn dataset rows into model inputs plus the mining metadata.

    Output keys: `pixel_values`, `input_ids`, `attention_mask` (and `token_type_ids` when the tokenizer
    makes them) for the B captions followed by the B*m mined incorrect texts; `num_mined` (m); the mined
    weights `negative_weights` (B, m); and every mining column present in the rows (`row_id`,
    `image_cluster`, `similar_image_clusters` padded with -1, `image_features`, ...).

    With `cached_features=True` (the trainer's cached-tower path) the model inputs are the rows' tower
    features instead: `image_tower_features` (B, D_vision) from `image_features` and `text_tower_features`
    (B + B*m, D_text) from `text_features` (mined texts looked up in `mined_text_features`); nothing is
    decoded or tokenised. With `tail_starts` as well (partial-depth training), the inputs are the cached inputs
    of the first trainable blocks: `image_block_inputs`, `text_block_inputs` (B + B*m, T, D_text) with their
    `attention_mask`, and `image_tail_start` / `text_tail_start` (either tower may use its features instead).

    Args:
        processor: a `VisionTextDualEncoderProcessor` (image processor + tokenizer).
        captions: `row_id -> caption` for the training dataset; needed only when mined negatives are used
            (`negative_indices` hold `row_id`s of the mined dataset). Use `captions_by_row_id(dataset)`.
        mined_negatives_per_row: how many mined texts per image to use (None = all, 0 = none).
        ttd_max_tags: with > 0, also tokenise up to that many tags per caption for the TTD term
            (`tag_input_ids`, `tag_attention_mask`, `tag_mask`); a `tags` list column overrides extraction.
        cached_features: feed the rows' `image_features` / `text_features` as the model's tower features.
        mined_text_features: with `cached_features` and mined negatives, `(row_id -> position, cached texts)` of
            the training rows (`text_features_by_row_id(dataset, column)`).
        tail_starts: with `cached_features`, the (vision, text) indices of the blocks whose cached inputs
            (`image_block_inputs` / `text_block_inputs` columns) the rows carry; None for a tower fed its cached
            tower features instead.
        meta_columns: `{batch key: row column}` of the per-row metadata to pass (`row_id`, `row_index`, `group`,
            `image_cluster`, ...). None (default): every mining column present in the rows, under its own name.
            `ClipNegTrainer` sets it, so a user column that happens to be called `group` or `row_id` is never
            read as mining metadata; group values reach the batch as the trainer's dataset-wide integer codes.

    Example:
        >>> from PIL import Image
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> _, processor = build_tiny_dual_encoder()
        >>> collate = ClipNegCollator(processor)
        >>> batch = collate([{"image": Image.new("RGB", (8, 8)), "caption": "a red circle", "row_id": 0}])
        >>> tuple(batch["pixel_values"].shape), batch["row_id"].tolist()
        ((1, 3, 32, 32), [0])
    """

    processor: Any
    captions: Mapping[int, str] | None = None
    image_column: str = "image"
    caption_column: str = "caption"
    max_length: int = 64
    mined_negatives_per_row: int | None = None
    augment: bool = False
    seed: int = 0
    ttd_max_tags: int = 0
    tags_column: str = "tags"
    cached_features: bool = False
    mined_text_features: tuple[Mapping[int, int], np.ndarray | list[np.ndarray]] | None = None
    tail_starts: tuple[int | None, int | None] | None = None
    meta_columns: Mapping[str, str] | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("Cannot collate an empty batch.")
        if self.cached_features:
            return self._collate_features(rows)
        for column in (self.image_column, self.caption_column):
            if column not in rows[0]:
                raise KeyError(
                    f"Column {column!r} is missing from the training rows (columns: {sorted(rows[0])}). Rename "
                    "your columns or set image_column/caption_column; keep `remove_unused_columns=False`."
                )
        images = []
        for position, row in enumerate(rows):
            image = to_rgb(row[self.image_column], row=self._row_number(row, position), column=self.image_column)
            images.append(random_resized_crop_and_flip(image, self._rng) if self.augment else image)
        texts = [str(row[self.caption_column]) for row in rows]
        batch: dict[str, torch.Tensor] = {}

        mined = self._mined_negatives(rows)
        if mined is not None:
            indices, weights = mined
            mined_texts = [self.captions.get(j) if j >= 0 else None for j in indices.flatten().tolist()]
            # A negative whose row is not in this dataset (e.g. after `select`) acts as padding: weight 0.
            found = torch.tensor([t is not None for t in mined_texts]).reshape(indices.shape)
            texts += [t if t is not None else "" for t in mined_texts]
            batch["negative_weights"] = torch.where(found, weights, torch.zeros_like(weights))
            batch["num_mined"] = torch.tensor(indices.shape[1])

        tokens = self.processor.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch.update(tokens)
        batch["pixel_values"] = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        batch.update(self._tag_tokens(rows))
        batch.update(self._metadata(rows))
        return batch

    def _collate_features(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        image_start, text_start = self.tail_starts or (None, None)
        image_column = "image_features" if image_start is None else "image_block_inputs"
        text_column = "text_features" if text_start is None else "text_block_inputs"
        for column in (image_column, text_column):
            if column not in rows[0]:
                raise KeyError(
                    f"Cached-feature batches need the {column!r} column (from "
                    f"{'compute_features' if column.endswith('_features') else 'compute_block_inputs'})."
                )
        batch = self._metadata(rows)

        def stacked(column: str) -> torch.Tensor:  # feature columns were already stacked as metadata
            if column in batch:
                return batch[column]
            return torch.from_numpy(np.stack([np.asarray(row[column], dtype=np.float32) for row in rows]))

        texts: list[np.ndarray] | None = (
            None if text_start is None else [np.asarray(row[text_column], dtype=np.float32) for row in rows]
        )
        captions = stacked(text_column) if text_start is None else None
        mined = self._mined_negatives(rows)
        if mined is not None:
            if self.mined_text_features is None:
                raise ValueError("Mined negatives with cached features need `mined_text_features`.")
            indices, weights = mined
            position_of, stored = self.mined_text_features
            positions = np.array([position_of.get(j, -1) if j >= 0 else -1 for j in indices.flatten().tolist()])
            found = torch.from_numpy(positions >= 0).reshape(indices.shape)
            # A negative whose row is not in this dataset (e.g. after `select`) acts as padding: weight 0.
            if texts is None:
                captions = torch.cat([captions, torch.from_numpy(np.asarray(stored)[positions.clip(min=0)]).float()])
            else:
                texts += [np.asarray(stored[p], dtype=np.float32) for p in positions.clip(min=0)]
            batch["negative_weights"] = torch.where(found, weights, torch.zeros_like(weights))
            batch["num_mined"] = torch.tensor(indices.shape[1])
        if image_start is None:
            batch["image_tower_features"] = stacked(image_column)
        else:
            batch["image_block_inputs"], batch["image_tail_start"] = stacked(image_column), image_start
        if text_start is None:
            batch["text_tower_features"] = captions
        else:
            batch["text_block_inputs"], batch["attention_mask"] = _pad_tokens(texts)
            batch["text_tail_start"] = text_start
        batch.update(self._tag_tokens(rows))
        return batch

    def _tag_tokens(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.ttd_max_tags <= 0:
            return {}
        from ..tags import tag_token_batch

        given = [row[self.tags_column] for row in rows] if self.tags_column in rows[0] else None
        captions = [str(row[self.caption_column]) for row in rows]
        return tag_token_batch(self.processor.tokenizer, captions, self.ttd_max_tags, self.max_length, tags=given)

    def _mined_negatives(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.mined_negatives_per_row == 0 or "negative_indices" not in rows[0]:
            return None
        if self.captions is None and not self.cached_features:
            raise ValueError(
                "The rows carry mined `negative_indices` but the collator has no `captions` to look them up: "
                "pass `captions=captions_by_row_id(train_dataset)`, or set mined_negatives_per_row=0."
            )
        m = len(rows[0]["negative_indices"])
        if self.mined_negatives_per_row is not None:
            m = min(m, self.mined_negatives_per_row)
        if m == 0:
            return None
        indices = torch.tensor([list(row["negative_indices"])[:m] for row in rows], dtype=torch.long)
        weights = torch.tensor([list(row["negative_weights"])[:m] for row in rows], dtype=torch.float32)
        weights = torch.where(indices >= 0, weights, torch.zeros_like(weights))
        return indices, weights

    def _row_number(self, row: Mapping[str, Any], position: int) -> Any:
        """The row number an error message names: the dataset position when known, else the batch position."""
        for key in (ROW_INDEX, "row_id"):
            column = (self.meta_columns or {}).get(key, key if self.meta_columns is None else None)
            if column is not None and isinstance(row.get(column), (int, np.integer)):
                return int(row[column])
        return position

    def _metadata(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        present = rows[0].keys()
        sources = self.meta_columns if self.meta_columns is not None else {c: c for c in _DEFAULT_META_COLUMNS}
        meta: dict[str, torch.Tensor] = {}
        for key, column in sources.items():
            if column not in present:
                continue
            if key in LIST_META_COLUMNS:
                meta[key] = _pad_ragged([row[column] for row in rows])
            elif key in FEATURE_META_COLUMNS:
                meta[key] = torch.from_numpy(np.stack([np.asarray(row[column], dtype=np.float32) for row in rows]))
            else:
                meta[key] = torch.tensor([_integer(row[column], column, key) for row in rows], dtype=torch.long)
        return meta


def _integer(value: Any, column: str, key: str) -> int:
    """An integer metadata value (a cluster id, a row id, a group code); -1 for a missing group."""
    if value is None and key == "group":
        return -1
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _integer(value.item(), column, key)
    hint = (
        " Group values of any type (strings such as 'SKU-000', integers, missing values) work with "
        "ClipNegTrainer, which maps them to dataset-wide integer codes; with this collator on its own, map them "
        "to integers first (e.g. hf_clipneg.mining.group_codes) or pass meta_columns= without 'group'."
        if key == "group"
        else f" Pass meta_columns= without {key!r}, or rename that column."
    )
    raise ValueError(
        f"Column {column!r} holds {value!r} (a {type(value).__name__}), but the collator passes it as the "
        f"integer metadata {key!r}.{hint}"
    )
