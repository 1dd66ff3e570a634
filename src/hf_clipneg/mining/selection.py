"""Explicit mined negatives: per-cluster candidate pools and deterministic draws that follow the rule.

Every row's draws depend only on (seed, row, draw index), so the result does not depend on batch size or
on the number of processes; selection is O(n * (m + d)) and never builds an N x N matrix.
"""

from __future__ import annotations

import numpy as np

from .clusters import Clusters
from .config import DuplicateEvidence, MiningConfig, NegativeSampling, NegativeStrategy


class NegativeSelector:
    """Draws up to ``negatives_per_row`` explicit negatives per row among the rows the rule allows.

    Pools: for cluster evidence under a cluster strategy, the rows outside a row's blocked image clusters;
    with ``sampling="lowest"``, the rows of the least similar allowed clusters; otherwise all valid rows.
    Candidates from a pool are then checked against the remaining evidence (same group, cosines) exactly as
    :func:`~hf_clipneg.mining.rule.evidence_flags` would flag them. Built by `NegativeMiner.fit_arrays`.
    """

    def __init__(
        self,
        config: MiningConfig,
        valid: np.ndarray,
        image: Clusters,
        image_features: np.ndarray,
        text_features: np.ndarray | None,
        groups: np.ndarray | None,
    ) -> None:
        self.config = config
        self.valid = valid
        self.image = image
        self.image_features = image_features
        self.text_features = text_features
        self.groups = groups
        self._build_pools(np.flatnonzero(valid), image.similarity)

    def _build_pools(self, valid_rows: np.ndarray, similarity: np.ndarray) -> None:
        """Candidate pools for explicit negatives, as segments of `order` (valid rows sorted by image cluster).

        For cluster `c` the pool is a virtual concatenation of segments; a draw u in [0, pool_size[c])
        maps to a row through a searchsorted on keys c * 2**41 + segment start.
        """
        config = self.config
        labels = self.image.labels[valid_rows]
        self.order = valid_rows[np.argsort(labels, kind="stable")].astype(np.int64)
        k = self.image.sizes.size
        starts = np.concatenate([[0], np.cumsum(self.image.sizes)]).astype(np.int64)
        n_valid = valid_rows.size
        cluster_evidence = config.evidence in (DuplicateEvidence.IMAGE_CLUSTER, DuplicateEvidence.IMAGE_AND_TEXT_CLUSTER)
        restricted = config.strategy in (NegativeStrategy.CLUSTER, NegativeStrategy.CLUSTER_WEIGHTED)
        lowest = config.sampling == NegativeSampling.LOWEST
        pool_target = max(8 * config.negatives_per_row, 64)
        seg_cluster, seg_cstart, seg_ostart = [], [], []
        pool_size = np.zeros(k, dtype=np.int64)
        for c in range(k):
            blocked = self.image.similar_idx[self.image.similar_ptr[c] : self.image.similar_ptr[c + 1]]
            if lowest:
                # Least similar clusters first, never a blocked one, until the pool holds pool_target rows.
                ranked = np.argsort(similarity[c], kind="stable")
                ranked = ranked[~np.isin(ranked, blocked if restricted and cluster_evidence else [c])]
                ranked = ranked[self.image.sizes[ranked] > 0]
                cum = np.cumsum(self.image.sizes[ranked])
                take = ranked[: int(np.searchsorted(cum, pool_target) + 1)]
                ranges = [(starts[b], self.image.sizes[b]) for b in take]
            elif restricted and cluster_evidence:
                ranges = _complement_ranges(starts, np.sort(blocked), n_valid)
            else:
                ranges = [(0, n_valid)]
            offset = 0
            for ostart, length in ranges:
                if length <= 0:
                    continue
                seg_cluster.append(c)
                seg_cstart.append(offset)
                seg_ostart.append(ostart)
                offset += length
            pool_size[c] = offset
        self.pool_size = pool_size
        self.seg_key = np.asarray(seg_cluster, dtype=np.int64) * (1 << 41) + np.asarray(seg_cstart, dtype=np.int64)
        self.seg_cstart = np.asarray(seg_cstart, dtype=np.int64)
        self.seg_ostart = np.asarray(seg_ostart, dtype=np.int64)
        self.pool_excludes_blocked = bool(restricted and cluster_evidence)

    def select(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Explicit negatives for row positions `rows`: (n, m) int64 indices (-1 padded), (n, m) float32
        weights (0 at padding) and, per row, None or why it got fewer than m."""
        config = self.config
        rows = np.asarray(rows, dtype=np.int64)
        m = config.negatives_per_row
        n = rows.size
        chosen = np.full((n, m), -1, dtype=np.int64)
        reasons: list[str | None] = [None] * n
        if m == 0 or n == 0:
            return chosen, np.zeros((n, m), dtype=np.float32), reasons
        valid = self.valid[rows]
        clusters = np.where(valid, self.image.labels[rows], 0).astype(np.int64)
        pool = np.where(valid, self.pool_size[clusters], 0)
        filled = np.zeros(n, dtype=np.int64)
        draws = 2 * m + 4
        draw_offset = 0
        for _round in range(4):
            # Rows with an empty pool (every cluster blocked, e.g. k=1) stay -1 padded; see the reasons below.
            todo = np.flatnonzero(valid & (filled < m) & (pool > 0))
            if todo.size == 0:
                break
            u_index = np.arange(draw_offset, draw_offset + draws)
            uniform = _uniform(config.seed, rows[todo], u_index)
            sizes = pool[todo]
            u = np.floor(uniform * sizes[:, None]).astype(np.int64)
            # A small pool is enumerated instead of sampled, so nothing allowed is missed.
            small = sizes <= draws
            if small.any():
                u[small] = np.arange(draws)[None, :]
            in_range = u < sizes[:, None]
            u = np.minimum(u, np.maximum(sizes[:, None] - 1, 0))
            key = clusters[todo][:, None] * (1 << 41) + u
            segment = np.searchsorted(self.seg_key, key, side="right") - 1
            segment = np.clip(segment, 0, max(self.seg_key.size - 1, 0))
            position = self.seg_ostart[segment] + u - self.seg_cstart[segment]
            candidates = self.order[np.clip(position, 0, self.order.size - 1)]
            ok = in_range & (sizes[:, None] > 0) & (candidates != rows[todo][:, None])
            ok &= self._pair_allowed(rows[todo], candidates)
            merged = np.concatenate([chosen[todo], np.where(ok, candidates, -1)], axis=1)
            merged_ok = merged >= 0
            merged_ok &= ~_duplicates(merged)
            pick = np.argsort(~merged_ok, axis=1, kind="stable")[:, :m]
            new = np.take_along_axis(merged, pick, axis=1)
            new[~np.take_along_axis(merged_ok, pick, axis=1)] = -1
            chosen[todo] = new
            filled[todo] = (new >= 0).sum(1)
            draw_offset += draws
            draws *= 4
            if small.all():
                break
        weights = self._weights(rows, chosen)
        for i in np.flatnonzero(filled < m):
            if not valid[i]:
                reasons[i] = "row skipped (unreadable image / NaN features)"
            elif pool[i] < m:
                reasons[i] = (
                    "all other rows are in similar image clusters" if self.pool_excludes_blocked else "too few other rows"
                )
            else:
                reasons[i] = "too many candidates rejected by the evidence (same group or cosine above threshold)"
        return chosen, weights, reasons

    def _pair_allowed(self, rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        config = self.config
        allowed = np.ones(candidates.shape, dtype=bool)
        if config.strategy not in (NegativeStrategy.CLUSTER, NegativeStrategy.CLUSTER_WEIGHTED):
            return allowed
        # The numpy twin of `evidence_flags` for the (rows x candidates) pairs of explicit negatives.
        def same_group() -> np.ndarray:
            left = self.groups[rows][:, None]
            return (left == self.groups[candidates]) & (left >= 0)

        def close(features: np.ndarray, threshold: float) -> np.ndarray:
            return np.einsum("nd,nmd->nm", features[rows], features[candidates]) > threshold

        if config.evidence == DuplicateEvidence.GROUP:
            allowed &= ~same_group()
        elif config.evidence == DuplicateEvidence.PAIR_COSINE:
            flagged = close(self.image_features, config.image_cosine_threshold)
            if config.text_cosine_threshold is not None:
                flagged &= close(self.text_features, config.text_cosine_threshold)
            allowed &= ~flagged
        elif config.evidence == DuplicateEvidence.ANY:
            flagged = same_group() if config.group_column else np.zeros(candidates.shape, dtype=bool)
            if config.image_cosine_threshold is not None:
                flagged |= close(self.image_features, config.image_cosine_threshold)
            if config.text_cosine_threshold is not None:
                flagged |= close(self.text_features, config.text_cosine_threshold)
            allowed &= ~flagged
        return allowed

    def _weights(self, rows: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        config = self.config
        present = chosen >= 0
        if config.strategy != NegativeStrategy.CLUSTER_WEIGHTED:
            return present.astype(np.float32)
        safe = np.where(present, chosen, rows[:, None])
        cos = np.einsum("nd,nmd->nm", self.image_features[rows], self.image_features[safe])
        ratio = np.clip(1.0 - cos, 0.0, None) / config.image_distance_mean
        weights = np.ones_like(ratio) if config.weight_power == 0 else ratio**config.weight_power
        return (np.clip(weights, 0.0, config.max_weight) * present).astype(np.float32)


def _complement_ranges(starts: np.ndarray, blocked_sorted: np.ndarray, total: int) -> list[tuple[int, int]]:
    ranges, cursor = [], 0
    for b in blocked_sorted:
        if starts[b] > cursor:
            ranges.append((cursor, int(starts[b] - cursor)))
        cursor = max(cursor, int(starts[b + 1]))
    if cursor < total:
        ranges.append((cursor, total - cursor))
    return ranges


def _duplicates(values: np.ndarray) -> np.ndarray:
    """(n, D) bool: True where the value already appeared earlier in its row (-1 never counts)."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    repeat = np.zeros_like(values, dtype=bool)
    later = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    np.put_along_axis(repeat, order[:, 1:], later, axis=1)
    return repeat


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, rows: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(n, D) floats in [0, 1) that depend only on (seed, row, draw index)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.asarray(rows, dtype=np.uint64) ^ _splitmix64(np.array([seed], dtype=np.uint64)))
        mixed = _splitmix64(base[:, None] + np.asarray(draws, dtype=np.uint64)[None, :] * _GOLDEN)
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
