"""PNGs a person looks at to judge a mining run: sample images per cluster with their captions and
the cluster's name; what the rule does at the user's batch size (the in-batch masked fraction and weights); and
example pairs the rule flags, with their similarity."""

from __future__ import annotations

import dataclasses
import logging
import os
import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset

from .data import to_rgb

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cluster_montage(
    dataset: Dataset,
    path: str | os.PathLike,
    clusters: list[int] | None = None,
    max_clusters: int = 8,
    per_cluster: int = 6,
    cluster_column: str = "image_cluster",
    image_column: str = "image",
    caption_column: str = "caption",
    seed: int = 0,
) -> list[int]:
    """Write a grid: one row per cluster (largest first unless `clusters` is given), `per_cluster` sample
    images with their captions, the row titled with the cluster's self-label. Returns the clusters shown.

    Example:
        >>> from hf_clipneg.data import make_synthetic_pairs
        >>> ds = make_synthetic_pairs(24, seed=0).add_column("image_cluster", [i % 3 for i in range(24)])
        >>> cluster_montage(ds, "/tmp/hf_clipneg_montage.png", per_cluster=3)
        [0, 1, 2]
    """
    from .clustering.labels import name_clusters

    for column in (cluster_column, image_column, caption_column):
        if column not in dataset.column_names:
            raise KeyError(
                f"Column {column!r} is missing (columns: {dataset.column_names}); run `hf-clipneg mine` first."
            )
    labels = np.asarray(dataset[cluster_column], dtype=np.int64)
    captions = [str(c) for c in dataset[caption_column]]
    names = {n.cluster: n.name for n in name_clusters(labels, captions)}
    if clusters is None:
        ids, counts = np.unique(labels, return_counts=True)
        clusters = [int(c) for c in ids[np.argsort(-counts, kind="stable")][:max_clusters]]
    rng = np.random.default_rng(seed)
    plt = _pyplot()
    figure, axes = plt.subplots(
        len(clusters), per_cluster, figsize=(2.2 * per_cluster, 2.6 * len(clusters)), squeeze=False
    )
    for row, cluster in enumerate(clusters):
        members = np.flatnonzero(labels == cluster)
        chosen = rng.choice(members, size=min(per_cluster, members.size), replace=False) if members.size else []
        for col in range(per_cluster):
            axis = axes[row][col]
            axis.axis("off")
            if col < len(chosen):
                index = int(chosen[col])
                axis.imshow(to_rgb(dataset[index][image_column], row=index, column=image_column))
                axis.set_title(textwrap.fill(captions[index], 24), fontsize=7)
        axes[row][0].text(
            -0.1, 0.5, f"cluster {cluster} ({members.size})\n{names.get(cluster, '')}", fontsize=8,
            transform=axes[row][0].transAxes, ha="right", va="center",
        )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    logger.info("Wrote the cluster montage to %s.", path)
    return clusters


def weight_histogram(dataset: Dataset, path: str | os.PathLike, weight_column: str = "negative_weights") -> dict[str, Any]:
    """Write a histogram of the mined negatives' weights (padding excluded) and return summary numbers.

    Example:
        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"negative_weights": [[0.5, 1.5], [1.0, 0.0]], "negative_indices": [[1, 2], [0, -1]]})
        >>> weight_histogram(ds, "/tmp/hf_clipneg_weights.png")["count"]
        3
    """
    if weight_column not in dataset.column_names:
        raise KeyError(f"Column {weight_column!r} is missing; run `hf-clipneg mine` first.")
    weights = np.asarray(dataset.with_format("numpy")[weight_column], dtype=np.float64)
    if "negative_indices" in dataset.column_names:
        indices = np.asarray(dataset.with_format("numpy")["negative_indices"])
        weights = weights[indices >= 0]
    weights = weights.ravel()
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.hist(weights, bins=40, color="#4477aa")
    axis.set_xlabel("negative weight")
    axis.set_ylabel("mined negatives")
    axis.set_title(f"{weights.size} mined negatives, mean {weights.mean():.3f}" if weights.size else "no negatives")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    logger.info("Wrote the weight histogram to %s.", path)
    summary = {"count": int(weights.size)}
    if weights.size:
        summary.update(mean=float(weights.mean()), min=float(weights.min()), max=float(weights.max()))
    return summary


@dataclass
class InBatchSummary:
    """What a mining rule does to the in-batch negatives at one batch size (see :func:`in_batch_summary`)."""

    strategy: str
    evidence: str
    batch_size: int
    masked_fraction: list[float]  # per batch: share of off-diagonal pairs with weight 0
    downweighted_fraction: list[float]  # per batch: share with 0 < weight < 1 (downweight action, distance weights)
    weights: list[float]  # a sample of off-diagonal in-batch weights
    flagged: list[tuple[int, int, float | None, float | None]] = dataclasses.field(default_factory=list)
    flagged_per_row: float = 0.0  # mean number of flagged texts per image in a batch

    def to_dict(self) -> dict[str, Any]:
        """Summary numbers (means), JSON-ready."""
        return {
            "strategy": self.strategy,
            "evidence": self.evidence,
            "batch_size": self.batch_size,
            "batches": len(self.masked_fraction),
            "masked_fraction": float(np.mean(self.masked_fraction)) if self.masked_fraction else 0.0,
            "downweighted_fraction": float(np.mean(self.downweighted_fraction)) if self.downweighted_fraction else 0.0,
            "flagged_per_row": self.flagged_per_row,
            "flagged_examples": len(self.flagged),
        }


def in_batch_summary(
    dataset: Dataset,
    batch_size: int = 64,
    num_batches: int = 200,
    strategy: str | None = None,
    max_examples: int = 12,
    seed: int = 0,
) -> InBatchSummary:
    """Draw `num_batches` random batches of `batch_size` rows from a mined dataset, as a shuffled training run
    would, and apply the dataset's rule (`hf_clipneg.mining.pair_weights`, the one the trainer uses; `strategy`
    overrides the stored one, like `--negative_strategy`): per batch the share of pairs masked (weight 0) and
    down-weighted, a sample of weights, and up to `max_examples` flagged pairs `(row i, row j, image cosine,
    text cosine)` (cosines None without feature columns), most similar first.

    Example:
        >>> import numpy as np
        >>> from datasets import Dataset
        >>> from hf_clipneg.mining import MiningConfig, mine_negatives
        >>> x = np.random.default_rng(0).normal(size=(40, 8)).astype("float32")
        >>> ds = Dataset.from_dict({"image_features": x, "text_features": x, "caption": [f"c{i % 5}" for i in range(40)]})
        >>> mined, _ = mine_negatives(ds, MiningConfig(evidence="image_cluster", n_image_clusters=4, negatives_per_row=0))
        >>> summary = in_batch_summary(mined, batch_size=16, num_batches=5)
        >>> summary.batch_size, len(summary.masked_fraction), 0.0 < summary.to_dict()["masked_fraction"] < 1.0
        (16, 5, True)
    """
    import torch

    from .training.collator import FEATURE_META_COLUMNS, LIST_META_COLUMNS, SCALAR_META_COLUMNS
    from .mining import MiningConfig, NegativeStrategy, evidence_flags, pair_weights

    if "row_id" not in dataset.column_names:
        raise KeyError(f"The dataset has no mining columns (columns: {dataset.column_names}); run `hf-clipneg mine` first.")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (a batch needs negatives), got {batch_size}.")
    config = MiningConfig.from_dataset(dataset)
    if strategy is not None:
        config = dataclasses.replace(config, strategy=NegativeStrategy(strategy))
    columns = [c for c in (*SCALAR_META_COLUMNS, *LIST_META_COLUMNS, *FEATURE_META_COLUMNS) if c in dataset.column_names]
    valid = np.arange(len(dataset))
    if "image_cluster" in dataset.column_names:
        valid = np.flatnonzero(np.asarray(dataset["image_cluster"]) >= 0)  # skipped rows never train
    size = min(batch_size, valid.size)
    if size < 2:
        raise ValueError(f"The dataset has {valid.size} usable rows; a batch needs at least 2.")
    rng = np.random.default_rng(seed)
    batches = [rng.choice(valid, size=size, replace=False) for _ in range(num_batches)]
    needed = np.unique(np.concatenate(batches))
    position = {int(row): i for i, row in enumerate(needed)}
    part = dataset.select_columns(columns).select(needed.tolist())
    values = {c: part[c] for c in columns}
    features = {c: np.asarray(values[c], dtype=np.float32) for c in FEATURE_META_COLUMNS if c in values}
    masked, lowered, weights_sample, candidates = [], [], [], []
    flagged_total = 0
    for batch_rows in batches:
        local = [position[int(r)] for r in batch_rows]
        batch: dict[str, torch.Tensor] = {}
        for column in columns:
            if column in SCALAR_META_COLUMNS:
                batch[column] = torch.tensor([int(values[column][i]) for i in local], dtype=torch.long)
            elif column in LIST_META_COLUMNS:
                rows = [list(values[column][i]) for i in local]
                width = max(1, max(len(r) for r in rows))
                batch[column] = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)
            else:
                batch[column] = torch.from_numpy(features[column][local])
        weights, _ = pair_weights(batch, config)
        off = ~torch.eye(size, dtype=torch.bool)
        masked.append(float((weights[off] == 0).float().mean()))
        lowered.append(float(((weights[off] > 0) & (weights[off] < 1)).float().mean()))
        if len(weights_sample) < 20_000:
            weights_sample.extend(weights[off].tolist()[:2000])
        if config.strategy in (NegativeStrategy.CLUSTER, NegativeStrategy.CLUSTER_WEIGHTED):
            flags = evidence_flags(batch, batch, config) & off
        elif config.strategy == NegativeStrategy.RANDOM:
            flags = (weights == 0) & off
        else:
            flags = torch.zeros(size, size, dtype=torch.bool)
        flagged_total += int(flags.sum())
        for i, j in flags.nonzero().tolist():
            if i < j:
                candidates.append((int(batch_rows[i]), int(batch_rows[j])))
    examples: list[tuple[int, int, float | None, float | None]] = []
    for i, j in dict.fromkeys(candidates):  # unique, in order of appearance
        cosines = []
        for column in FEATURE_META_COLUMNS:
            if column in features:
                a, b = features[column][position[i]], features[column][position[j]]
                cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
            else:
                cosines.append(None)
        examples.append((i, j, cosines[0], cosines[1]))
    examples.sort(key=lambda pair: -(pair[2] if pair[2] is not None else 0.0))
    if len(examples) > max_examples:  # the most similar, then an even spread down to the least similar flagged
        keep = np.unique(np.linspace(0, len(examples) - 1, max_examples).round().astype(int))
        examples = [examples[k] for k in keep]
    return InBatchSummary(
        strategy=config.strategy.value, evidence=config.evidence.value, batch_size=size, masked_fraction=masked,
        downweighted_fraction=lowered, weights=weights_sample, flagged=examples,
        flagged_per_row=flagged_total / (num_batches * size) if num_batches else 0.0,
    )


def in_batch_weights_plot(summary: InBatchSummary, path: str | os.PathLike) -> None:
    """Write two panels: the per-batch masked fraction at the user's batch size, and the in-batch weights."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    fractions = 100 * np.asarray(summary.masked_fraction)
    left.hist(fractions, bins=30, color="#cc6677")
    left.set_xlabel("pairs masked in a batch (%)")
    left.set_ylabel("batches")
    left.set_title(
        f"{summary.strategy} / {summary.evidence}, batch {summary.batch_size}:\n"
        f"mean {fractions.mean():.2f} % masked, {summary.flagged_per_row:.2f} flagged texts per image", fontsize=9,
    )
    weights = np.asarray(summary.weights)
    right.hist(weights, bins=40, color="#4477aa")
    right.set_xlabel("in-batch negative weight (1 = plain CLIP negative)")
    right.set_ylabel("pairs")
    right.set_yscale("log")
    lowered = 100 * float(np.mean(summary.downweighted_fraction)) if summary.downweighted_fraction else 0.0
    right.set_title(f"weights the loss uses: {lowered:.2f} % down-weighted, {fractions.mean():.2f} % at 0", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    logger.info("Wrote the in-batch negative weights to %s.", path)


def flagged_pairs_grid(
    dataset: Dataset,
    summary: InBatchSummary,
    path: str | os.PathLike,
    image_column: str = "image",
    caption_column: str = "caption",
) -> int:
    """Write a grid of the example pairs the rule flags (two images side by side with their captions and image /
    text cosine); returns how many pairs are shown. Without flagged pairs the PNG says so."""
    plt = _pyplot()
    pairs = summary.flagged
    per_row = 2  # pairs per grid row
    rows = max(1, (len(pairs) + per_row - 1) // per_row)
    figure, axes = plt.subplots(rows, 2 * per_row, figsize=(2.3 * 2 * per_row, 2.9 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    if not pairs:
        axes[0][0].text(0.0, 0.5, f"{summary.strategy} / {summary.evidence}: no pair flagged in "
                        f"{len(summary.masked_fraction)} batches of {summary.batch_size}", fontsize=10)
    for k, (i, j, image_cos, text_cos) in enumerate(pairs):
        row, col = divmod(k, per_row)
        similarity = []
        if image_cos is not None:
            similarity.append(f"image cos {image_cos:.3f}")
        if text_cos is not None:
            similarity.append(f"text cos {text_cos:.3f}")
        for offset, index in enumerate((i, j)):
            axis = axes[row][2 * col + offset]
            record = dataset[index]
            if image_column in record:
                axis.imshow(to_rgb(record[image_column], row=index, column=image_column))
            caption = str(record.get(caption_column, ""))
            axis.set_title(f"row {index}\n" + textwrap.fill(caption, 26), fontsize=7)
        axes[row][2 * col].text(1.05, -0.08, ", ".join(similarity), transform=axes[row][2 * col].transAxes,
                                ha="center", va="top", fontsize=8, color="#aa3377")
    figure.suptitle(f"Pairs flagged as false negatives ({summary.strategy} / {summary.evidence}), batch "
                    f"{summary.batch_size}: most similar first", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    logger.info("Wrote %d flagged pairs to %s.", len(pairs), path)
    return len(pairs)
