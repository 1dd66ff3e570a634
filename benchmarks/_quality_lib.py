"""Data helpers of `benchmarks/quality.py` and `benchmarks/evidence.py`. Nothing here trains.

* loading the splits and adding the tower features with `hf_clipneg.features.compute_features` (its datasets
  cache: the features are computed once per machine and reloaded afterwards);
* integer category codes (the category protocol, the oracle's group column) and the many-texts rows;
* the training batch order `ClipNegTrainer` uses, reproduced from the same samplers and seed, to measure the
  in-batch false negatives of a regime, and the small statistics the tables print.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-products"
SPLITS = ("train", "validation", "test")

#: Column names of the benchmark's datasets (the caption column is renamed to `caption` after the features).
IMAGE = "image"
CAPTION = "caption"
CATEGORY = "category"  # int code of the tuple of category columns (the category protocol and the oracle)
CROWD_GROUP = "crowd_group"  # image k-means group ids the crowded sampler reads

#: Many-texts regime: attribute-built descriptions, like reviews (short, generic, repeated across products).
DESCRIPTION_TEMPLATES = (
    "{base_colour} {article_type} for {gender}",
    "{gender} {usage} {article_type} in {base_colour}",
    "{base_colour} {sub_category} for {season}",
)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def load_splits(data: str | Path, splits: Sequence[str] = SPLITS) -> dict[str, Any]:
    """Load a Hub id, a local folder of `<split>.parquet` (or jsonl/csv) files, or a `save_to_disk` DatasetDict.

    A folder with `<split>.parquet` files is loaded exactly as `load_dataset("parquet", data_files={split:
    f"{folder}/{split}.parquet"})`, so the features `compute_features` cached for that call are found again.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(data).expanduser()
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        loaded = load_from_disk(str(path))
    elif path.is_dir():
        if all((path / f"{s}.parquet").is_file() for s in splits):
            loaded = load_dataset("parquet", data_files={s: f"{path}/{s}.parquet" for s in splits})
        else:
            files = {}
            for split in splits:
                found = sorted(path.glob(f"{split}*.parquet")) or sorted(path.glob(f"{split}*.jsonl")) or sorted(
                    path.glob(f"{split}*.csv"))
                if not found:
                    raise FileNotFoundError(f"No {split}*.parquet/jsonl/csv file in {path}; pass --data a folder with one per split.")
                files[split] = [str(f) for f in found]
            kind = {".parquet": "parquet", ".jsonl": "json", ".csv": "csv"}[Path(files[splits[0]][0]).suffix]
            loaded = load_dataset(kind, data_files=files)
    else:
        loaded = load_dataset(str(data))
    if not isinstance(loaded, DatasetDict):
        raise ValueError(f"{data} did not load as a DatasetDict with splits {list(splits)}.")
    missing = [s for s in splits if s not in loaded]
    if missing:
        raise ValueError(f"{data} has no split(s) {missing} (has {list(loaded)}); the benchmark needs {list(splits)}.")
    return {s: loaded[s] for s in splits}


def smoke_splits() -> dict[str, Any]:
    """Tiny synthetic splits (`hf_clipneg.data.synthetic`) for `--smoke` runs: columns image, caption, shape, colour, size..."""
    from hf_clipneg.data import make_synthetic_splits

    splits = make_synthetic_splits(num_train=192, num_eval=48, seed=0, image_size=32, num_objects=12)
    return {name: splits[name] for name in SPLITS}


def featured_splits(splits: Mapping[str, Any], model: Any, processor: Any, image_column: str = IMAGE,
                    caption_column: str = CAPTION) -> dict[str, Any]:
    """`compute_features` on each raw split, called exactly as a user would (nothing renamed or mapped before it,
    so the datasets cache of an earlier identical call is reused instead of embedding again)."""
    from hf_clipneg.features import compute_features

    for name, ds in splits.items():
        for column in (image_column, caption_column):
            if column not in ds.column_names:
                raise KeyError(f"{name} split has no column {column!r} (columns: {ds.column_names}); "
                               "pass --image-column/--caption-column.")
    return {name: compute_features(ds, model, processor, image_column=image_column, caption_column=caption_column)
            for name, ds in splits.items()}


def _clean(value: Any) -> str:
    text = "" if value is None else str(value)
    return re.sub(r"\s+", " ", text).strip()


def category_keys(dataset: Any, columns: Sequence[str]) -> list[tuple[str, ...]]:
    """The category of every row: the tuple of `columns`, each value stripped and case-folded."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise KeyError(f"Category column(s) {missing} not in the data ({dataset.column_names}); pass --category-columns.")
    cols = [dataset[c] for c in columns]
    return [tuple(_clean(col[i]).casefold() for col in cols) for i in range(len(dataset))]


def codes(values: Sequence[Any], table: dict[Any, int] | None = None) -> np.ndarray:
    """Integer code of every value in order of first appearance (`table` is filled and may be shared).

    Example:
        >>> codes(["b", "a", "b"]).tolist()
        [0, 1, 0]
    """
    table = {} if table is None else table
    return np.asarray([table.setdefault(v, len(table)) for v in values], dtype=np.int64)


def benchmark_columns(dataset: Any, image_column: str, caption_column: str, category: np.ndarray | None) -> Any:
    """A featured split with the benchmark's column names: `image`, `caption` and, given codes, `category` (int64).

    Renaming after `compute_features` keeps its stored provenance (the trainer's cached-feature path checks it)."""
    if image_column != IMAGE:
        dataset = dataset.rename_column(image_column, IMAGE)
    if caption_column != CAPTION:
        if CAPTION in dataset.column_names:
            dataset = dataset.remove_columns([CAPTION])
        dataset = dataset.rename_column(caption_column, CAPTION)
    if category is not None:
        if CATEGORY in dataset.column_names:
            dataset = dataset.remove_columns([CATEGORY])
        dataset = dataset.add_column(CATEGORY, np.asarray(category, dtype=np.int64).tolist())
    return dataset


def build_descriptions(row: Mapping[str, Any], templates: Sequence[str] = DESCRIPTION_TEMPLATES) -> list[str]:
    """Attribute-built texts of one product, lower-cased; a template with a missing attribute is skipped.

    Example:
        >>> build_descriptions({"base_colour": "Navy Blue", "article_type": "Shirts", "gender": "Men"},
        ...                    ["{base_colour} {article_type} for {gender}", "{usage} {article_type}"])
        ['navy blue shirts for men']
    """
    out = []
    for template in templates:
        names = re.findall(r"{(\w+)}", template)
        values = {name: _clean(row.get(name)) for name in names}
        if all(values[name] and values[name].lower() not in ("nan", "none") for name in names):
            out.append(template.format(**{k: v.lower() for k, v in values.items()}))
    return out


class _ManyRows:
    """Batched map function of `many_rows` (a class so datasets can fingerprint it)."""

    def __init__(self, templates: Sequence[str], keep: Sequence[str]) -> None:
        self.templates = list(templates)
        self.keep = list(keep)

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in [*self.keep, CAPTION, "product", "description_skipped"]}
        n = len(batch[CAPTION])
        for i in range(n):
            row = {name: values[i] for name, values in batch.items()}
            extra = build_descriptions(row, self.templates)
            for position, text in enumerate([row[CAPTION], *extra]):
                for name in self.keep:
                    out[name].append(row[name])
                out[CAPTION].append(text)
                out["product"].append(row["product"])
                out["description_skipped"].append(len(self.templates) - len(extra) if position == 0 else 0)
        return out


def many_rows(train: Any, templates: Sequence[str]) -> Any:
    """The many-texts regime's rows: every product's caption row, then one row per attribute-built description
    of it (same image bytes, same category). Feature columns are dropped: `compute_features(rows, ...,
    known=train)` adds them again, embedding only the new descriptions. Columns: image, caption, category (when
    present), product (row of `train`), description_skipped (templates skipped, on the product's first row)."""
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    attributes = sorted({name for t in templates for name in re.findall(r"{(\w+)}", t)})
    missing = [a for a in attributes if a not in train.column_names]
    if missing:
        raise KeyError(f"Description templates use column(s) {missing} that the data lacks; fix --description-templates.")
    keep = [c for c in (IMAGE, CATEGORY) if c in train.column_names]
    source = train.select_columns([*keep, CAPTION, *[a for a in attributes if a not in (*keep, CAPTION)]])
    source = source.add_column("product", list(range(len(source))))
    image_feature = source.features[IMAGE]
    # Images pass through as their stored bytes (never decoded and re-encoded), so `known=` recognises them.
    source = source.cast_column(IMAGE, ImageFeature(decode=False))
    features = Features({IMAGE: ImageFeature(decode=False), **({CATEGORY: Value("int64")} if CATEGORY in keep else {}),
                         CAPTION: Value("string"), "product": Value("int64"), "description_skipped": Value("int64")})
    rows = source.map(_ManyRows(templates, keep), batched=True, batch_size=256, remove_columns=source.column_names,
                      features=features, desc="Building many-texts rows")
    return rows.cast_column(IMAGE, image_feature)


# ------------------------------------------------------------------------------------------------
# The trainer's batch order, and in-batch false negatives
# ------------------------------------------------------------------------------------------------


def sampler_batches(n_rows: int, batch_size: int, steps: int, seed: int, sampler: str = "random",
                    groups: Sequence[int] | None = None, share: float = 0.5) -> list[np.ndarray]:
    """Row indices of the first `steps` training batches of `ClipNegTrainer` on one process (no gradient
    accumulation, `dataloader_drop_last=False`, `data_seed` unset), epoch after epoch.

    `random`: `transformers.Trainer` shuffles with a `RandomSampler` that accelerate turns into its
    `SeedableRandomSampler`, whose epoch e is `torch.randperm(n, generator seeded seed + e)`; the last batch of
    an epoch is partial. `crowded`: the library's `CrowdedBatchSampler(groups, batch_size, share, seed)` with
    `set_epoch(e)`, as the trainer builds it (`train_sampler="crowded"`). tests/test_benchmark_batches.py checks
    both against the batches the trainer really trains on.
    """
    import torch

    if sampler not in ("random", "crowded"):
        raise ValueError(f"sampler must be 'random' or 'crowded', got {sampler!r}.")
    if sampler == "crowded":
        from hf_clipneg.training.samplers import CrowdedBatchSampler

        if groups is None:
            raise ValueError("The crowded sampler needs the group id of every row.")
        crowded = CrowdedBatchSampler(groups, batch_size, share, seed=seed)
    batches: list[np.ndarray] = []
    epoch = 0
    while len(batches) < steps:
        if sampler == "random":
            generator = torch.Generator().manual_seed(seed + epoch)
            order = torch.randperm(n_rows, generator=generator).numpy()
        else:
            crowded.set_epoch(epoch)
            order = np.fromiter(iter(crowded), dtype=np.int64)
        if len(order) == 0:
            raise ValueError(f"An epoch of {n_rows} rows has no batch of {batch_size}.")
        batches += [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
        epoch += 1
    return batches[:steps]


def in_batch_false_negatives(batches: Sequence[np.ndarray], category: np.ndarray | None, image_key: np.ndarray,
                             text_key: np.ndarray) -> dict[str, float]:
    """In-batch false negatives over `batches`: the share of ordered off-diagonal pairs, and the mean count per
    row, that are exact duplicates (same image or identical caption: `exact_*`) or share the category
    (`category_*`; None without categories). Per row = pairs of the row with the other rows of its batch.

    Example:
        >>> r = in_batch_false_negatives([np.arange(4)], np.array([0, 0, 1, 2]), np.arange(4), np.array([0, 1, 2, 2]))
        >>> r["exact_pair_rate"], r["category_pair_rate"], r["category_per_row"]
        (0.16666666666666666, 0.16666666666666666, 0.5)
    """
    exact = same_category = pairs = rows = 0
    for index in batches:
        index = np.asarray(index)
        off = ~np.eye(len(index), dtype=bool)
        img, txt = image_key[index], text_key[index]
        exact += int((((img[:, None] == img[None, :]) | (txt[:, None] == txt[None, :])) & off).sum())
        if category is not None:
            cat = category[index]
            same_category += int(((cat[:, None] == cat[None, :]) & (cat[:, None] >= 0) & off).sum())
        pairs += int(off.sum())
        rows += len(index)
    return {
        "exact_pair_rate": exact / pairs,
        "exact_per_row": exact / rows,
        "category_pair_rate": same_category / pairs if category is not None else None,
        "category_per_row": same_category / rows if category is not None else None,
        "batches": len(batches),
    }


# ------------------------------------------------------------------------------------------------
# Statistics of the tables
# ------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value).

    Example:
        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
    """
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def paired_delta(values: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """Mean and std of the per-seed differences `values[i] - baseline[i]` (same seed = same init and batches).

    Example:
        >>> paired_delta([3.0, 5.0], [1.0, 2.0])
        (2.5, 0.7071067811865476)
    """
    if len(values) != len(baseline):
        raise ValueError(f"Paired deltas need one baseline per seed, got {len(values)} and {len(baseline)}.")
    return mean_std(np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64))


def oracle_share(delta: float, oracle_delta: tuple[float, float]) -> float | None:
    """Share of the oracle's gain a strategy reaches, or None when the oracle's mean gain does not exceed its
    own (paired) std: a share of a gain indistinguishable from noise means nothing.

    Example:
        >>> oracle_share(1.0, (2.0, 0.5)), oracle_share(1.0, (0.4, 0.5))
        (0.5, None)
    """
    gain, std = oracle_delta
    if gain <= 0 or gain <= std:
        return None
    return delta / gain


def _clearly_above(value: float, other: float, margin: float) -> bool:
    """`value - other > margin`, where a difference within float noise (1e-9 relative) never counts."""
    noise = 1e-9 * max(1.0, abs(value), abs(other))
    return value - other > margin + noise


def choose_default(deltas: Mapping[str, tuple[float, float]], order: Sequence[str], what: str = "rule") -> tuple[str, str]:
    """The rule to make the default, chosen on validation only, and why: `(name, reason)`.

    `deltas[name] = (mean, std)` of a candidate rule's paired gain over vanilla on validation (same seeds);
    `order` lists the rules from the simplest (closest to vanilla, `order[0]`, the fallback) to the most complex.
    `what` names the candidates in the reason ("rule"; "setting" when whole training settings are compared).
    A rule wins against vanilla only if its mean gain is positive and exceeds its own paired std. Among the
    winners, taken from the simplest, a more complex one replaces the current choice only if its mean is higher
    by more than the larger of the two stds: a gap within either std, or within float noise, is a tie and goes to
    the simpler rule. With no winner the default is `order[0]`. A NaN mean or std never wins.

    Raises:
        ValueError: an empty `order`, or a name in `deltas` that `order` does not list.

    Example:
        >>> choose_default({"default": (0.5, 0.8), "paper": (2.0, 0.5)}, ["vanilla", "default", "paper"])[0]
        'paper'
        >>> choose_default({"default": (0.025000000000000799, 0.0), "paper": (0.024999999999999467, 0.0)},
        ...                ["vanilla", "default", "paper"])[0]
        'default'
        >>> choose_default({"paper": (0.4, 0.5)}, ["vanilla", "paper"])
        ('vanilla', 'no rule beats vanilla on validation by more than its paired std; best: paper +0.4 ± 0.5')
    """
    if not order:
        raise ValueError("order must list at least the simplest (vanilla-equivalent) rule.")
    unknown = [name for name in deltas if name not in order]
    if unknown:
        raise ValueError(f"deltas has rule(s) {unknown} that order {list(order)} does not list.")

    def shown(name: str) -> str:
        mean, std = deltas[name]
        return f"{name} {mean:+.3g} ± {std:.3g}"

    candidates = [name for name in order[1:] if name in deltas]
    winners = [name for name in candidates if _clearly_above(deltas[name][0], 0.0, max(deltas[name][1], 0.0))
               and np.isfinite(deltas[name][1])]
    if not winners:
        finite = [name for name in candidates if np.isfinite(deltas[name][0])]
        best = f"; best: {shown(max(finite, key=lambda n: deltas[n][0]))}" if finite else ""
        return order[0], f"no {what} beats {order[0]} on validation by more than its paired std{best}"
    choice = winners[0]
    for name in winners[1:]:
        if _clearly_above(deltas[name][0], deltas[choice][0], max(deltas[name][1], deltas[choice][1])):
            choice = name
    ties = [name for name in winners if name != choice
            and not _clearly_above(deltas[choice][0], deltas[name][0], max(deltas[name][1], deltas[choice][1]))]
    reason = f"{shown(choice)} over {order[0]} on validation, more than its paired std"
    if ties:
        reason += f"; ties within std or float noise with {', '.join(shown(name) for name in ties)}: the simpler {what} wins"
    return choice, reason
