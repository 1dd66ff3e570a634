"""Helpers of `benchmarks/quality.py`: data, cached tower features, trainable tails, training and evaluation.

Feature caching: each image goes through the frozen EfficientNet-Lite0 trunk ONCE; we keep the input of its
last MBConv block (192x7x7, bf16) and the pooled output (1280-d). Each distinct text goes through MiniLM once;
we keep the input of its last transformer layer ((tokens, 384), bf16), its attention mask and the mean-pooled
output. "frozen" runs train heads on the pooled outputs; "partial" runs train the last block of each tower
plus the heads on the cached block inputs, so no run ever touches the rest of the towers again.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("quality")

CACHE_VERSION = "1"


def cache_root() -> Path:
    """`$HF_CLIPNEG_CACHE/benchmarks`, else `~/.cache/hf_clipneg/benchmarks`."""
    base = os.environ.get("HF_CLIPNEG_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "hf_clipneg"
    return root / "benchmarks"


def digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Many-texts regime: attribute-built descriptions (like reviews: short, generic, repeated across products)
# ------------------------------------------------------------------------------------------------

DESCRIPTION_TEMPLATES = (
    "{base_colour} {article_type} for {gender}",
    "{gender} {usage} {article_type} in {base_colour}",
    "{base_colour} {sub_category} for {season}",
)


def _clean(value: Any) -> str:
    text = "" if value is None else str(value)
    return re.sub(r"\s+", " ", text).strip()


def build_descriptions(row: Mapping[str, Any], templates: Sequence[str] = DESCRIPTION_TEMPLATES) -> list[str]:
    """Attribute-built texts of one product; templates whose attributes are missing are skipped (counted
    by the caller)."""
    out = []
    for template in templates:
        names = re.findall(r"{(\w+)}", template)
        values = {name: _clean(row.get(name)) for name in names}
        if all(values[name] and values[name].lower() not in ("nan", "none") for name in names):
            out.append(template.format(**{k: v.lower() if k != "gender" else v.lower() for k, v in values.items()}))
    return out


def normalise_text(text: str) -> str:
    return re.sub(r"\s+", " ", str(text).strip().casefold())


# ------------------------------------------------------------------------------------------------
# Tower feature extraction with last-block inputs
# ------------------------------------------------------------------------------------------------


@dataclass
class Towers:
    vision: nn.Module  # EfficientNetModel
    text: nn.Module  # BertModel
    image_processor: Any
    tokenizer: Any
    key: str


def load_towers(tiny: bool = False) -> Towers:
    """The packaged pretrained towers (`build_dual_encoder()`), or tiny random ones for `--smoke`."""
    if tiny:
        from hf_clipneg.testing import build_tiny_dual_encoder

        model, processor = build_tiny_dual_encoder()
        key = "tiny"
    else:
        from hf_clipneg.towers import build_dual_encoder

        model, processor = build_dual_encoder(device="cpu")
        key = "lite0-minilm"
    model.eval()
    return Towers(model.vision_model, model.text_model, processor.image_processor, processor.tokenizer, key)


def vision_last_block(vision: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(last block, tail after it) of a vision tower; the tail maps the block output to pooled features."""
    if hasattr(vision, "encoder") and hasattr(vision.encoder, "blocks"):  # EfficientNet
        enc = vision.encoder
        tail = nn.Sequential(enc.top_conv, enc.top_bn, enc.top_activation, vision.pooler, nn.Flatten(1))
        return enc.blocks[-1], tail
    if hasattr(vision, "layernorm"):  # ViT (tiny smoke towers)
        return last_layer(vision), _VitTail(vision)
    raise ValueError(f"Do not know the last block of {type(vision).__name__}; use an EfficientNet or ViT tower.")


class _VitTail(nn.Module):
    def __init__(self, vision: nn.Module) -> None:
        super().__init__()
        self.norm = vision.layernorm
        self.pooler = getattr(vision, "pooler", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden)
        return self.pooler(hidden) if self.pooler is not None else hidden[:, 0]


def last_layer(model: nn.Module) -> nn.Module:
    """The last transformer layer of a BERT/ViT-like model (`encoder.layer`, `layers`, ...)."""
    for holder in (getattr(model, "encoder", None), model):
        for name in ("layer", "layers"):
            layers = getattr(holder, name, None) if holder is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers):
                return layers[-1]
    raise ValueError(f"Cannot find the layer list of {type(model).__name__}.")


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


@torch.inference_mode()
def extract_image_features(
    towers: Towers, images: Sequence[Any], cache_file: Path, batch_size: int = 64, bf16: bool = True, desc: str = ""
) -> dict[str, torch.Tensor]:
    """Pooled features (N, D) float32 and last-block inputs (N, ...) bf16 of every image, cached in parts."""
    from hf_clipneg.images import to_rgb

    if cache_file.is_file():
        return torch.load(cache_file, weights_only=True)
    part_dir = cache_file.with_suffix(".parts")
    part_dir.mkdir(parents=True, exist_ok=True)
    block, _ = vision_last_block(towers.vision)
    captured: dict[str, torch.Tensor] = {}
    hook = block.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
    pooled_parts, block_parts = [], []
    started = time.perf_counter()
    try:
        for index, (start, stop) in enumerate(_chunks(len(images), batch_size)):
            part = part_dir / f"{index:05d}.pt"
            if part.is_file():
                saved = torch.load(part, weights_only=True)
            else:
                pil = [to_rgb(images[i], row=i) for i in range(start, stop)]
                pixels = towers.image_processor(images=pil, return_tensors="pt")["pixel_values"]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = towers.vision(pixel_values=pixels)
                pooled = out.pooler_output
                pooled = pooled.reshape(pooled.shape[0], -1) if pooled.dim() > 2 else pooled
                saved = {"pooled": pooled.float(), "block_in": captured["x"].to(torch.bfloat16)}
                torch.save(saved, part)
                done = stop
                rate = done / max(time.perf_counter() - started, 1e-6)
                logger.info("%s images %d/%d (%.1f img/s)", desc, done, len(images), rate)
            pooled_parts.append(saved["pooled"])
            block_parts.append(saved["block_in"])
    finally:
        hook.remove()
    result = {"pooled": torch.cat(pooled_parts), "block_in": torch.cat(block_parts)}
    torch.save(result, cache_file)
    for part in part_dir.glob("*.pt"):
        part.unlink()
    part_dir.rmdir()
    return result


@torch.inference_mode()
def extract_text_features(
    towers: Towers, texts: Sequence[str], cache_file: Path, batch_size: int = 256, max_length: int = 48
) -> dict[str, Any]:
    """Mean-pooled MiniLM features (U, 384) and last-layer inputs (U, T, 384) bf16 + masks of distinct texts."""
    from hf_clipneg.towers import mean_pool

    if cache_file.is_file():
        return torch.load(cache_file, weights_only=False)
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Text row {row} is empty or not a string ({text!r}); fix or drop it.")
    layer = last_layer(towers.text)
    captured: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_pre_hook(lambda m, args, kwargs: captured.__setitem__("x", args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    enc = towers.tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    pooled, states = [], []
    try:
        for start, stop in _chunks(len(texts), batch_size):
            ids = enc["input_ids"][start:stop]
            mask = enc["attention_mask"][start:stop]
            extra = {"token_type_ids": enc["token_type_ids"][start:stop]} if "token_type_ids" in enc else {}
            out = towers.text(input_ids=ids, attention_mask=mask, **extra)
            pooled.append(mean_pool(out.last_hidden_state, mask).float())
            states.append(captured["x"].to(torch.bfloat16))
    finally:
        hook.remove()
    result = {
        "texts": list(texts),
        "pooled": torch.cat(pooled),
        "block_in": torch.cat(states),
        "mask": enc["attention_mask"].to(torch.bool),
    }
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, cache_file)
    return result


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def load_splits(data: str, splits: Sequence[str] = ("train", "validation", "test")) -> dict[str, Any]:
    """Load a Hub id, a local folder of `<split>.parquet` files, or a `save_to_disk` DatasetDict."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(data).expanduser()
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        loaded = load_from_disk(str(path))
    elif path.is_dir():
        files = {}
        for split in splits:
            found = sorted(path.glob(f"{split}*.parquet")) or sorted(path.glob(f"{split}*.jsonl")) or sorted(path.glob(f"{split}*.csv"))
            if not found:
                raise FileNotFoundError(f"No {split}*.parquet/jsonl/csv file in {path}; pass --data a folder with one per split.")
            files[split] = [str(f) for f in found]
        kind = {".parquet": "parquet", ".jsonl": "json", ".csv": "csv"}[Path(files[splits[0]][0]).suffix]
        loaded = load_dataset(kind, data_files=files)
    else:
        loaded = load_dataset(data)
    if not isinstance(loaded, DatasetDict):
        raise ValueError(f"{data} did not load as a DatasetDict with splits {list(splits)}.")
    missing = [s for s in splits if s not in loaded]
    if missing:
        raise ValueError(f"{data} has no split(s) {missing} (has {list(loaded)}); the benchmark needs {list(splits)}.")
    return {s: loaded[s] for s in splits}


def split_key(source: str, split: str, dataset: Any, image_column: str, caption_column: str) -> str:
    captions = dataset[caption_column]
    return digest(CACHE_VERSION, os.path.abspath(source) if Path(source).exists() else source, split, len(dataset),
                  image_column, caption_column, captions[:50], captions[-50:])


class LazyColumn:
    """Index a dataset column row by row (decoding one image at a time, never the whole column)."""

    def __init__(self, dataset: Any, column: str) -> None:
        if column not in dataset.column_names:
            raise KeyError(f"Column {column!r} not found (columns: {dataset.column_names}); pass --image-column/--caption-column.")
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[int(index)][self.column]


# ------------------------------------------------------------------------------------------------
# Regimes: which (image, text) rows make up the training set
# ------------------------------------------------------------------------------------------------


@dataclass
class SplitData:
    """One split after feature extraction. Rows are (image, text) pairs; several rows may share an image."""

    image_pooled: torch.Tensor  # (n_images, D) float32
    image_block: torch.Tensor | None  # (n_images, ...) bf16 last-block inputs
    text_pooled: torch.Tensor  # (n_texts, 384)
    text_block: torch.Tensor | None  # (n_texts, T, 384) bf16
    text_mask: torch.Tensor | None  # (n_texts, T) bool
    row_image: torch.Tensor  # (n_rows,) long
    row_text: torch.Tensor  # (n_rows,) long
    texts: list[str]  # distinct texts (index = text id)
    row_category: np.ndarray  # (n_rows,) int category code (-1 = unknown)
    image_title: np.ndarray  # (n_images,) int code of the image's own caption (instance protocol)
    image_category: np.ndarray  # (n_images,) int category code

    @property
    def n_rows(self) -> int:
        return int(self.row_image.numel())


def codes(values: Sequence[Any]) -> np.ndarray:
    table: dict[Any, int] = {}
    return np.asarray([table.setdefault(v, len(table)) for v in values], dtype=np.int64)


def category_keys(dataset: Any, columns: Sequence[str]) -> list[Any]:
    """Category of every row: the tuple of `columns` (None when no columns: the category protocol is skipped)."""
    if not columns:
        return [None] * len(dataset)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise KeyError(f"Category column(s) {missing} not in the data ({dataset.column_names}); pass --category-columns.")
    cols = [dataset[c] for c in columns]
    return [tuple(_clean(col[i]).casefold() for col in cols) for i in range(len(dataset))]


# ------------------------------------------------------------------------------------------------
# Model on cached features: linear heads, optionally the last block of each tower
# ------------------------------------------------------------------------------------------------


@dataclass
class Standardiser:
    image_mean: torch.Tensor
    image_std: torch.Tensor
    text_mean: torch.Tensor
    text_std: torch.Tensor

    @classmethod
    def fit(cls, train: SplitData) -> "Standardiser":
        img = F.normalize(train.image_pooled, dim=-1)
        txt = F.normalize(train.text_pooled, dim=-1)
        return cls(img.mean(0), img.std(0).clamp(min=1e-6), txt.mean(0), txt.std(0).clamp(min=1e-6))


def extended_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=dtype)
    out = out.masked_fill(~mask.bool(), torch.finfo(dtype).min)
    return out[:, None, None, :]


class CachedDualEncoder(nn.Module):
    """Projection heads (+ logit scale) on cached tower outputs; with `towers` given, the last block of each
    tower is a trainable copy run on the cached block inputs ("partial" depth)."""

    def __init__(self, stats: Standardiser, projection_dim: int, seed: int, towers: Towers | None = None,
                 bf16: bool = True, train_vision_block: bool = False) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.stats = stats
        self.image_head = nn.Linear(stats.image_mean.numel(), projection_dim, bias=False)
        self.text_head = nn.Linear(stats.text_mean.numel(), projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        torch.random.set_rng_state(generator_state)
        self.partial = towers is not None
        self.use_towers = self.partial
        self.bf16 = bf16
        if self.partial:
            block, tail = vision_last_block(towers.vision)
            # with train_vision_block the cached image input is the last block's input, else its output
            self.vision_block = copy.deepcopy(block) if train_vision_block else None
            self.vision_tail = copy.deepcopy(tail)
            self.text_layer = copy.deepcopy(last_layer(towers.text))
            for module in self._tower_modules():
                module.eval()  # frozen batch-norm statistics, no dropout; weights still train
                for p in module.parameters():
                    p.requires_grad_(True)

    def _tower_modules(self) -> list[nn.Module]:
        if not self.partial:
            return []
        return [m for m in (self.vision_block, self.vision_tail, self.text_layer) if m is not None]

    def tower_parameters(self) -> list[nn.Parameter]:
        if not self.partial:
            return []
        return [p for m in self._tower_modules() for p in m.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        return [self.image_head.weight, self.text_head.weight, self.logit_scale]

    def train(self, mode: bool = True) -> "CachedDualEncoder":
        super().train(mode)
        for module in self._tower_modules():
            module.eval()
        return self

    def image_pooled(self, split: SplitData, index: torch.Tensor) -> torch.Tensor:
        if not self.use_towers:
            return split.image_pooled[index]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            x = split.image_block[index].float()
            out = self.vision_tail(self.vision_block(x) if self.vision_block is not None else x)
        return out.float()

    def text_pooled(self, split: SplitData, index: torch.Tensor) -> torch.Tensor:
        if not self.use_towers:
            return split.text_pooled[index]
        mask = split.text_mask[index]
        length = int(mask.sum(1).max())
        mask = mask[:, :length]
        states = split.text_block[index, :length].float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.text_layer(states, attention_mask=extended_mask(mask))
        out = (out[0] if isinstance(out, tuple) else out).float()
        m = mask.float().unsqueeze(-1)
        return (out * m).sum(1) / m.sum(1)

    def embed_images(self, split: SplitData, index: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.image_pooled(split, index), dim=-1)
        return self.image_head((x - self.stats.image_mean) / self.stats.image_std)

    def embed_texts(self, split: SplitData, index: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.text_pooled(split, index), dim=-1)
        return self.text_head((x - self.stats.text_mean) / self.stats.text_std)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: CachedDualEncoder, split: SplitData, chunk: int = 256) -> dict[str, float]:
    """Both directions, instance protocol (hit = same caption) and category protocol (same category)."""
    from hf_clipneg.metrics import retrieval_metrics

    model.eval()
    images = torch.cat([model.embed_images(split, torch.arange(s, e)) for s, e in _chunks(len(split.image_title), chunk)])
    texts = torch.cat([model.embed_texts(split, split.row_text[s:e]) for s, e in _chunks(split.n_rows, chunk)])
    row_image = split.row_image.numpy()
    out = {}
    inst = retrieval_metrics(images, texts, image_groups=split.image_title, text_groups=split.image_title[row_image])
    out.update({f"inst_{k}": v for k, v in inst.items()})
    if (split.image_category >= 0).all():
        cat = retrieval_metrics(images, texts, image_groups=split.image_category, text_groups=split.row_category)
        out.update({f"cat_{k}": v for k, v in cat.items()})
    return out


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

Rule = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class TrainSettings:
    steps: int
    frozen_steps: int = 0  # partial runs: heads alone for this many steps first, then towers' last blocks too
    train_vision_block: bool = False
    batch_size: int = 256
    lr: float = 1e-3
    tower_lr: float = 1e-4
    weight_decay: float = 0.01
    projection_dim: int = 256
    batch_groups: torch.Tensor | None = None  # crowded regimes: per-row group ids the batches are drawn along
    batch_mix: float = 0.0  # share of each batch drawn from the group-sorted stream (0 = plain shuffled batches)


def batch_order(n_rows: int, steps: int, batch_size: int, seed: int, groups: torch.Tensor | None = None,
                mix: float = 0.0) -> torch.Tensor:
    """Row indices of every step: shuffled epochs, incomplete last batches dropped; same for every strategy.

    With `groups` and `mix` > 0 ("crowded" regimes), the first `mix` share of every batch comes from a stream
    sorted by group (groups in random order, rows shuffled within), the rest from a plain shuffle: batches
    crowded with similar items, like a data set of one kind of product or shards sorted by category.
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    per_epoch = n_rows // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the {n_rows} training rows; lower --batch-size.")
    epochs = math.ceil(steps / per_epoch)
    crowded = int(round(batch_size * mix)) if groups is not None else 0
    order = []
    for _ in range(epochs):
        perm = torch.randperm(n_rows, generator=generator)
        if not crowded:
            order.append(perm[: per_epoch * batch_size].view(per_epoch, batch_size))
            continue
        n_groups = int(groups.max()) + 1
        rank = torch.empty(n_groups, dtype=torch.long)
        rank[torch.randperm(n_groups, generator=generator)] = torch.arange(n_groups)
        stream = perm[torch.argsort(rank[groups[perm]], stable=True)][: per_epoch * crowded].view(per_epoch, crowded)
        filler = torch.randperm(n_rows, generator=generator)[: per_epoch * (batch_size - crowded)]
        epoch = torch.cat([stream, filler.view(per_epoch, batch_size - crowded)], 1)
        order.append(epoch[torch.randperm(per_epoch, generator=generator)])
    return torch.cat(order)[:steps]


def train_run(
    train: SplitData,
    evidence: Mapping[str, torch.Tensor],
    rule: Rule | None,
    config: Any,
    seed: int,
    settings: TrainSettings,
    stats: Standardiser,
    towers: Towers | None = None,
    eval_splits: Mapping[str, SplitData] | None = None,
    eval_at: Sequence[int] = (),
) -> dict[str, Any]:
    """Train one (strategy, seed); returns metrics at each `eval_at` step plus what the rule did in batches."""
    from hf_clipneg.losses import WeightedContrastiveLoss

    started = time.perf_counter()
    model = CachedDualEncoder(stats, settings.projection_dim, seed, towers, train_vision_block=settings.train_vision_block)
    groups = [{"params": model.head_parameters(), "lr": settings.lr}]
    if model.partial:
        groups.append({"params": model.tower_parameters(), "lr": settings.tower_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    loss_fn = WeightedContrastiveLoss(gather_across_processes=False)
    order = batch_order(train.n_rows, settings.steps, settings.batch_size, seed, settings.batch_groups, settings.batch_mix)
    category = torch.as_tensor(train.row_category)
    flagged = weight_sum = cat_hits = 0.0
    pairs = 0
    results: dict[str, Any] = {"evals": {}}
    eval_at = sorted(set(eval_at))
    for step in range(settings.steps):
        index = order[step]
        model.use_towers = model.partial and step >= settings.frozen_steps
        model.train()
        images = model.embed_images(train, train.row_image[index])
        texts = model.embed_texts(train, train.row_text[index])
        weights = positives = None
        if rule is not None:
            batch = {name: column[index] for name, column in evidence.items()}
            weights, positives = rule(batch, config, step=step)
            off = ~torch.eye(len(index), dtype=torch.bool)
            masked = (weights < 1.0 - 1e-6) & off if config.duplicate_action.value == "downweight" else (weights < 1e-6) & off
            if positives is not None:
                masked |= (positives > 0) & off
            flagged += float(masked.sum())
            weight_sum += float(weights[off].sum())
            cat = category[index]
            cat_hits += float((masked & (cat[:, None] == cat[None, :]) & (cat[:, None] >= 0)).sum())
            pairs += int(off.sum())
        loss = loss_fn(images, texts, model.logit_scale, negative_weights=weights, positive_weights=positives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))
        if step + 1 in eval_at and eval_splits:
            results["evals"][step + 1] = {name: evaluate(model, split) for name, split in eval_splits.items()}
    results["masked_fraction"] = flagged / pairs if pairs else 0.0
    results["mean_negative_weight"] = weight_sum / pairs if pairs else 1.0
    results["masked_category_precision"] = cat_hits / flagged if flagged else None
    results["final_loss"] = float(loss.detach())
    results["logit_scale"] = float(model.logit_scale.exp())
    results["seconds"] = time.perf_counter() - started
    return results


def batch_false_negative_rates(train: SplitData, batch_size: int, seed: int = 0, n_batches: int = 40,
                               groups: torch.Tensor | None = None, mix: float = 0.0) -> dict[str, float]:
    """In-batch false negatives of a regime, measured on the training batch order: share of off-diagonal
    pairs (and count per row) whose text is a caption of the other image (same image or identical text:
    `exact`) or that share the category (`category`)."""
    order = batch_order(train.n_rows, min(n_batches, train.n_rows // batch_size), batch_size, seed, groups, mix)
    norm = codes([normalise_text(t) for t in train.texts])
    text_code = torch.as_tensor(norm)[train.row_text]
    category = torch.as_tensor(train.row_category)
    exact = cat = 0.0
    pairs = 0
    for index in order:
        off = ~torch.eye(len(index), dtype=torch.bool)
        img = train.row_image[index]
        txt = text_code[index]
        same = ((img[:, None] == img[None, :]) | (txt[:, None] == txt[None, :])) & off
        c = category[index]
        same_cat = (c[:, None] == c[None, :]) & (c[:, None] >= 0) & off
        exact += float(same.sum())
        cat += float(same_cat.sum())
        pairs += int(off.sum())
    return {
        "exact_pair_rate": exact / pairs,
        "category_pair_rate": cat / pairs,
        "exact_per_row": exact / pairs * (batch_size - 1),
        "category_per_row": cat / pairs * (batch_size - 1),
    }


def library_rule(batch, config, step=None):
    from hf_clipneg.mining import pair_weights

    return pair_weights(batch, config, step=step)


def crowded_rows(image_cluster: torch.Tensor, share: float) -> torch.Tensor:
    """(B,) bool: rows whose image cluster holds at least `share` of the other rows of the batch."""
    same = image_cluster[:, None] == image_cluster[None, :]
    return same.sum(1) - 1 >= share * (len(image_cluster) - 1)


def crowding_gated_rule(share: float):
    """The library rule applied only to pairs with a row whose image cluster crowds the batch; other pairs stay
    plain negatives (an experiment: apply the paper's rule where batches are crowded with similar items)."""

    def rule(batch, config, step=None):
        weights, positives = library_rule(batch, config, step=step)
        crowded = crowded_rows(batch["image_cluster"], share)
        applies = crowded[:, None] | crowded[None, :]
        weights = torch.where(applies, weights, torch.ones_like(weights))
        if positives is not None:
            positives = torch.where(applies, positives, torch.eye(len(crowded)))
        return weights, positives

    return rule


@torch.no_grad()
def partial_inputs(towers: Towers, image_feats: dict, cache_file: Path, train_vision_block: bool, bf16: bool = True,
                   chunk: int = 128) -> dict[str, torch.Tensor]:
    """Re-derive the cached image features for partial runs so that frozen phase and towers agree exactly:
    `block_in` becomes the last block's output (unless the block itself trains) and `pooled` the frozen tail's
    output on it, computed with the same autocast as training."""
    if cache_file.is_file():
        return torch.load(cache_file, weights_only=True)
    block, tail = vision_last_block(towers.vision)
    mids, pooled = [], []
    for start, stop in _chunks(len(image_feats["block_in"]), chunk):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            x = image_feats["block_in"][start:stop].float()
            mid = block(x)
            out = tail(mid if not train_vision_block else block(x))
        mids.append((x if train_vision_block else mid).to(torch.bfloat16))
        pooled.append(out.float())
    result = {"block_in": torch.cat(mids), "pooled": torch.cat(pooled)}
    torch.save(result, cache_file)
    return result


@torch.no_grad()
def partial_text_pooled(towers: Towers, text_feats: dict, bf16: bool = True, chunk: int = 512) -> torch.Tensor:
    """Mean-pooled output of the frozen last text layer on the cached bf16 inputs (same autocast as training)."""
    layer = last_layer(towers.text)
    out = []
    for start, stop in _chunks(len(text_feats["pooled"]), chunk):
        mask = text_feats["mask"][start:stop]
        length = int(mask.sum(1).max())
        mask = mask[:, :length]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(text_feats["block_in"][start:stop, :length].float(), attention_mask=extended_mask(mask))
        y = (y[0] if isinstance(y, tuple) else y).float()
        m = mask.float().unsqueeze(-1)
        out.append((y * m).sum(1) / m.sum(1))
    return torch.cat(out)
