"""One modality's clusters for mining: k-means labels, the clusters blocked for each cluster, and the
placeholder single cluster written when the rule reads no clusters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..clustering import cluster_features
from .config import MiningConfig


@dataclass
class Clusters:
    """Cluster labels of every row and, per cluster, the clusters it blocks (itself included), as CSR.

    ``labels`` (N,) int32 is -1 for invalid (skipped) rows; ``centroids`` (k, d) and ``similarity`` (k, k)
    are unit-norm centroids and their cosines; ``similar_ptr`` / ``similar_idx`` list the blocked clusters of
    cluster c as ``similar_idx[similar_ptr[c]:similar_ptr[c + 1]]``; ``threshold`` is the centroid cosine
    above which clusters count as similar (None: the same cluster only); ``sizes`` (k,) counts rows.
    ``from_kmeans`` is False for the placeholder of :func:`one_cluster`.
    """

    labels: np.ndarray
    centroids: np.ndarray
    similarity: np.ndarray
    similar_ptr: np.ndarray
    similar_idx: np.ndarray
    threshold: float | None
    sizes: np.ndarray
    from_kmeans: bool = True

    def padded_similar(self, labels: np.ndarray) -> np.ndarray:
        """(n, L) int64 blocked clusters of each label, padded with -1 (a skipped row's list is empty)."""
        lengths = np.where(labels >= 0, self.similar_ptr[labels + 1] - self.similar_ptr[np.maximum(labels, 0)], 0)
        width = max(int(lengths.max(initial=0)), 1)
        out = np.full((labels.size, width), -1, dtype=np.int64)
        for i, (label, length) in enumerate(zip(labels, lengths)):
            if length:
                out[i, :length] = self.similar_idx[self.similar_ptr[label] : self.similar_ptr[label] + length]
        return out

    def similar_lists(self, labels: np.ndarray) -> list[np.ndarray]:
        """The blocked clusters of each label as int32 arrays (empty for a skipped row): a ragged column."""
        empty = np.zeros(0, dtype=np.int32)
        return [self.similar_idx[self.similar_ptr[c] : self.similar_ptr[c + 1]] if c >= 0 else empty for c in labels]


def fit_clusters(features: np.ndarray, valid_rows: np.ndarray, k: int, config: MiningConfig, modality: str) -> Clusters:
    """Cluster the unit-norm rows `valid_rows` of `features` (N, d) into `k` clusters with the configured backend.

    Clusters whose centroid cosine is above the ``similar_cluster_quantile`` of all centroid pairs block
    each other. Raises ValueError when `k` exceeds the usable rows.
    """
    if k > valid_rows.size:
        raise ValueError(
            f"n_{modality}_clusters={k} is larger than the {valid_rows.size} usable rows: use fewer clusters "
            "(None picks default_n_clusters(N)) or more data."
        )
    n_rows = features.shape[0]
    kwargs: dict[str, Any] = {}
    if config.clustering_backend == "kmeans":
        kwargs.update(n_iter=config.kmeans_iterations, normalize=False, assignment=config.kmeans_assignment)  # rows are unit-norm
    subset = features if valid_rows.size == n_rows else features[valid_rows]  # avoid an N x d copy
    labels_valid, centroids = cluster_features(subset, k, backend=config.clustering_backend, seed=config.seed, **kwargs)
    labels = np.full(n_rows, -1, dtype=np.int32)
    labels[valid_rows] = labels_valid
    sizes = np.bincount(labels_valid, minlength=k)
    similarity = centroids @ centroids.T
    threshold = None
    quantile = config.similar_cluster_quantile
    if quantile is not None and quantile < 1.0 and k > 1:
        off_diagonal = similarity[~np.eye(k, dtype=bool)]
        threshold = float(np.quantile(off_diagonal, quantile))
    blocked = np.eye(k, dtype=bool) if threshold is None else (similarity >= threshold) | np.eye(k, dtype=bool)
    ptr = np.concatenate([[0], np.cumsum(blocked.sum(1))]).astype(np.int64)
    idx = np.nonzero(blocked)[1].astype(np.int32)
    return Clusters(labels, centroids, similarity, ptr, idx, threshold, sizes)


def one_cluster(features: np.ndarray, valid: np.ndarray) -> Clusters:
    """The placeholder when no k-means runs: every valid row in cluster 0, invalid rows -1.

    `features` are unit-norm with zero rows where invalid; the centroid is their normalised mean.
    """
    centroid = features.sum(0, dtype=np.float64)
    centroid = (centroid / max(float(np.linalg.norm(centroid)), 1e-12)).astype(np.float32)[None, :]
    return Clusters(
        labels=np.where(valid, 0, -1).astype(np.int32),
        centroids=centroid,
        similarity=np.ones((1, 1), dtype=np.float32),
        similar_ptr=np.array([0, 1], dtype=np.int64),
        similar_idx=np.zeros(1, dtype=np.int32),
        threshold=None,
        sizes=np.array([int(valid.sum())], dtype=np.int64),
        from_kmeans=False,
    )
