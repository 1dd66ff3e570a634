"""Clustering backends for the mining step: spherical k-means (faiss) and rate-reduction (CPP)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .kmeans import assign_to_centroids, check_features, l2_normalize, spherical_kmeans

__all__ = [
    "CLUSTERING_BACKENDS",
    "assign_to_centroids",
    "check_features",
    "cluster_features",
    "default_n_clusters",
    "l2_normalize",
    "spherical_kmeans",
]

CLUSTERING_BACKENDS = ("kmeans", "cpp")


def default_n_clusters(n_rows: int) -> int:
    """Default number of clusters: ``round(1.5 * sqrt(n_rows))``, clipped to [2, 4096] and to at most n_rows.

    It grows with the data so that a cluster holds ~sqrt(N)/1.5 rows (7.6k rows -> 131 clusters,
    close to the k=128 a validation sweep picked on a 7.6k-row product data set; 1M rows -> 1500).

    Example:
        >>> default_n_clusters(7600), default_n_clusters(1_000_000), default_n_clusters(3)
        (131, 1500, 3)
    """
    if n_rows < 1:
        raise ValueError(f"default_n_clusters needs at least 1 row, got {n_rows}.")
    k = int(round(1.5 * math.sqrt(n_rows)))
    return int(min(max(k, 2), 4096, n_rows))


def cluster_features(
    features: np.ndarray, n_clusters: int, backend: str = "kmeans", seed: int = 0, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster (N, d) features with the chosen backend; returns ``(labels (N,) int64, centroids (k, d))``.

    Backends: ``"kmeans"`` (:func:`spherical_kmeans`, faiss) and ``"cpp"`` (rate-reduction clustering,
    ``hf_clipneg.clustering.rate_reduction.cpp_cluster``). Extra keyword arguments go to the backend.

    Example:
        >>> import numpy as np
        >>> labels, centroids = cluster_features(np.random.default_rng(0).normal(size=(20, 3)), 2)
        >>> labels.shape, centroids.shape
        ((20,), (2, 3))
    """
    if backend == "kmeans":
        return spherical_kmeans(features, n_clusters, seed=seed, **kwargs)
    if backend == "cpp":
        from .rate_reduction import cpp_cluster  # lazy: it imports torch modules only this backend needs

        check_features(features)
        labels, centroids = cpp_cluster(np.asarray(features, dtype=np.float32), n_clusters, seed=seed, **kwargs)
        labels = np.asarray(labels, dtype=np.int64)
        centroids = l2_normalize(np.asarray(centroids, dtype=np.float32), "centroids")
        return labels, centroids
    raise ValueError(f"Unknown clustering backend {backend!r}; choose one of {CLUSTERING_BACKENDS}.")
