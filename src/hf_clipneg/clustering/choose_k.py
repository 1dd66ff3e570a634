"""Choose the number of clusters by minimum coding length (MDL of a lossy Gaussian coding).

For a partition of the unit-norm features ``Z`` (``n`` rows, ``d`` dims) into clusters ``Z_j`` of
``n_j`` rows, the number of nats needed to code the data up to precision ``eps`` is (Ma, Derksen,
Hong, Wright 2007, "Segmentation of multivariate mixed data via lossy data coding and compression")

    L(Z, Pi) = sum_j [ (n_j + d)/2 logdet(I + d / (n_j eps^2) Zc_j^T Zc_j) + d/2 log(1 + |mu_j|^2 / eps^2)
                       + n_j log(n / n_j) ]

with ``Zc_j`` the cluster centred on its mean ``mu_j`` (the mean term is that paper's form for data
that is not zero-mean, which unit-norm embeddings never are; ``center=False`` gives the plain
uncentred form). Too few clusters pay for the spread of merged groups, too many pay the ``d/2``
per-cluster cost of coding each cluster's basis and the label bits; the best ``k`` minimises ``L``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .kmeans import spherical_kmeans
from .rate_reduction import validate_features

logger = logging.getLogger(__name__)

CHOOSE_K_BACKENDS = ("kmeans", "cpp")


def coding_length(features: np.ndarray, assignments: np.ndarray, eps: float = 1.0, center: bool = True) -> float:
    """Total coding length (nats) of unit-norm ``features`` partitioned by ``assignments``.

    Each cluster's log-determinant is taken on the smaller of its ``d x d`` and ``n_j x n_j`` Gram
    matrices (they are equal), so high-dimensional features with small clusters stay cheap.

    Example:
        >>> x = np.repeat(np.eye(3), 20, axis=0) + 0.01 * np.random.default_rng(0).normal(size=(60, 3))
        >>> good, bad = np.repeat(np.arange(3), 20), np.arange(60) % 3
        >>> coding_length(x, good) < coding_length(x, bad)
        True
    """
    z = np.asarray(features, dtype=np.float64)
    labels = np.asarray(assignments)
    if labels.shape != (z.shape[0],):
        raise ValueError(f"assignments must have shape ({z.shape[0]},), got {labels.shape}.")
    n_rows, dim = z.shape
    total = 0.0
    for cluster in np.unique(labels):
        members = z[labels == cluster]
        n_j = members.shape[0]
        if center:
            mean = members.mean(axis=0)
            members = members - mean
            total += dim / 2 * math.log1p(float(mean @ mean) / eps**2)
        gram = members @ members.T if n_j < dim else members.T @ members
        matrix = np.eye(gram.shape[0]) + (dim / (n_j * eps**2)) * gram
        total += (n_j + dim) / 2 * np.linalg.slogdet(matrix)[1] + n_j * math.log(n_rows / n_j)
    return float(total)


def default_candidates(n_rows: int) -> list[int]:
    """Candidate cluster counts for ``"auto"``: every k from 2 to 10, then a geometric grid (x1.25)
    up to ``min(n_rows // 2, 4 * sqrt(n_rows))``.

    Example:
        >>> default_candidates(600)
        [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 20, 24, 31, 38, 48, 60, 75, 93, 97]
    """
    upper = int(min(n_rows // 2, 4 * math.sqrt(n_rows)))
    if upper < 2:
        raise ValueError(f"Too few rows ({n_rows}) to choose a number of clusters; need at least 4.")
    candidates = list(range(2, min(10, upper) + 1))
    value = float(candidates[-1])
    while True:
        value *= 1.25
        k = int(round(value))
        if k >= upper:
            break
        if k > candidates[-1]:
            candidates.append(k)
    if candidates[-1] != upper:
        candidates.append(upper)
    return candidates


def _partition(features: np.ndarray, k: int, backend: str, seed: int, backend_kwargs: dict[str, Any]) -> np.ndarray:
    if backend == "kmeans":
        return spherical_kmeans(features, k, seed=seed, **backend_kwargs)[0]
    from .rate_reduction import cpp_cluster

    return cpp_cluster(features, k, seed, **backend_kwargs)[0]


def choose_n_clusters(
    features: np.ndarray,
    candidates: Sequence[int],
    backend: str = "kmeans",
    seed: int = 0,
    *,
    eps: float = 1.0,
    center: bool = True,
    n_restarts: int | None = None,
    backend_kwargs: dict[str, Any] | None = None,
) -> tuple[int, dict[int, float]]:
    """Pick the number of clusters with the smallest total coding length.

    Every candidate ``k`` is clustered with ``backend`` (``"kmeans"``: faiss spherical k-means,
    ``"cpp"``: :func:`~hf_clipneg.clustering.rate_reduction.cpp_cluster`) ``n_restarts`` times
    (seeds ``seed, seed+1, ...``); the shortest coding length of those partitions is the score of ``k``.

    Args:
        features: ``(N, d)`` features (L2-normalised here).
        candidates: cluster counts to try, each in ``[2, N]``.
        backend: ``"kmeans"`` or ``"cpp"``.
        seed: first seed.
        eps: coding precision; larger values favour more clusters.
        center: code each cluster around its mean (see the module docstring).
        n_restarts: partitions tried per k (default 3 for kmeans, 1 for cpp, which is slower).
        backend_kwargs: extra keyword arguments for the backend.

    Returns:
        ``(best_k, {k: coding length in nats})``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> centres = rng.normal(size=(4, 16))
        >>> x = np.repeat(centres, 40, axis=0) + 0.05 * rng.normal(size=(160, 16))
        >>> choose_n_clusters(x, [2, 3, 4, 6, 8])[0]
        4
    """
    if backend not in CHOOSE_K_BACKENDS:
        raise ValueError(f"Unknown clustering backend {backend!r}; choose one of {CHOOSE_K_BACKENDS}.")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}.")
    unit = validate_features(features)
    ks = sorted({int(k) for k in candidates})
    if not ks:
        raise ValueError("candidates is empty: pass at least one cluster count.")
    for k in ks:
        if k < 2 or k > unit.shape[0]:
            raise ValueError(f"Candidate k={k} is outside [2, {unit.shape[0]}] (2 <= k <= number of rows).")
    restarts = n_restarts if n_restarts is not None else (3 if backend == "kmeans" else 1)
    kwargs = dict(backend_kwargs or {})
    lengths: dict[int, float] = {}
    for k in ks:
        lengths[k] = min(
            coding_length(unit, _partition(unit, k, backend, seed + r, kwargs), eps=eps, center=center)
            for r in range(max(1, restarts))
        )
        logger.debug("choose_n_clusters: k=%d coding length %.1f nats", k, lengths[k])
    best = min(lengths, key=lengths.get)
    logger.info("choose_n_clusters (%s): k=%d of %s by minimum coding length", backend, best, ks)
    return best, lengths


def resolve_n_clusters(value: int | str | None, features: np.ndarray, backend: str = "kmeans", seed: int = 0) -> int:
    """Turn a configured cluster count into an int.

    ``int`` values are checked against the number of rows; ``"auto"`` (or ``None``) searches
    :func:`default_candidates` with :func:`choose_n_clusters`; a digit string such as ``"64"`` is an int.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 8))
        >>> resolve_n_clusters(5, x), resolve_n_clusters("7", x)
        (5, 7)
    """
    n_rows = int(np.shape(features)[0])
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        best, _ = choose_n_clusters(features, default_candidates(n_rows), backend=backend, seed=seed)
        return best
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise ValueError(f"n_clusters must be a positive integer or 'auto', got {value!r}.")
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"n_clusters must be an int, 'auto' or None, got {type(value).__name__}.")
    if value < 2 or value > n_rows:
        raise ValueError(f"n_clusters={value} is outside [2, {n_rows}] (2 <= k <= number of rows).")
    return int(value)
