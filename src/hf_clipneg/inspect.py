"""PNGs a person looks at to judge a mining run: sample images per cluster with their captions and
the cluster's name, and the distribution of negative weights."""

from __future__ import annotations

import logging
import os
import textwrap
from typing import Any

import numpy as np
from datasets import Dataset

from .images import to_rgb

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
        >>> from hf_clipneg.synthetic import make_synthetic_pairs
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
