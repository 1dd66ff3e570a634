"""Training-set orders for `ClipNegTrainer` (`ClipNegTrainingArguments.train_sampler`): batches spread over
many groups (`cluster_spread`), or crowded with one group (`crowded`, the regime where false negatives pile up)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class ClusterSpreadSampler(Sampler[int]):
    """Shuffle each epoch so that consecutive rows come from different image clusters as far as possible.

    Rows are ordered by their random rank inside their cluster, ties broken at random: the first row of
    every cluster comes before the second row of any cluster, so a batch spans many clusters.

    Example:
        >>> sampler = ClusterSpreadSampler([0, 0, 0, 1, 1, 1], seed=0)
        >>> order = list(sampler)
        >>> sorted(order) == list(range(6)) and len({[0, 0, 0, 1, 1, 1][i] for i in order[:2]}) == 2
        True
    """

    def __init__(self, clusters: Sequence[int], seed: int = 0) -> None:
        self.clusters = np.unique(np.asarray(clusters), return_inverse=True)[1].astype(np.int64)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.clusters)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        shuffled = rng.permutation(len(self.clusters))
        by_cluster = shuffled[np.argsort(self.clusters[shuffled], kind="stable")]
        sorted_clusters = self.clusters[by_cluster]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_clusters)) + 1]
        sizes = np.diff(np.r_[starts, len(sorted_clusters)])
        rank_in_cluster = np.arange(len(sorted_clusters)) - np.repeat(starts, sizes)
        order = np.lexsort((rng.random(len(by_cluster)), rank_in_cluster))
        return iter(by_cluster[order].tolist())


class CrowdedBatchSampler(Sampler[int]):
    """Order rows so that `share` of every batch of `batch_size` comes from a stream sorted by group.

    Per epoch, the groups are put in random order and the rows shuffled within each group; the first
    `round(share * batch_size)` places of each batch are filled from that stream, the rest from a plain
    shuffle, and the batches are shuffled. Batches of similar items (one product category, shards sorted by
    category) are where in-batch false negatives pile up. Every epoch has `len(groups) // batch_size` full
    batches; a row may appear twice in an epoch (once in each stream) and some rows not at all.

    Example:
        >>> groups = [0] * 8 + [1] * 8
        >>> order = list(CrowdedBatchSampler(groups, batch_size=4, share=1.0, seed=0))
        >>> all(len({groups[i] for i in order[s:s + 4]}) == 1 for s in range(0, 16, 4))
        True
    """

    def __init__(self, groups: Sequence[int], batch_size: int, share: float = 0.5, seed: int = 0) -> None:
        self.groups = np.unique(np.asarray(groups), return_inverse=True)[1].astype(np.int64)
        if batch_size < 2 or batch_size > len(self.groups):
            raise ValueError(f"batch_size must be between 2 and the {len(self.groups)} rows, got {batch_size}.")
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {share}.")
        self.batch_size = batch_size
        self.crowded = max(1, int(round(batch_size * share)))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.groups) // self.batch_size) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n, per_epoch = len(self.groups), len(self.groups) // self.batch_size
        rank = rng.permutation(int(self.groups.max()) + 1)
        shuffled = rng.permutation(n)
        stream = shuffled[np.argsort(rank[self.groups[shuffled]], kind="stable")][: per_epoch * self.crowded]
        filler = rng.permutation(n)[: per_epoch * (self.batch_size - self.crowded)]
        batches = np.concatenate(
            [stream.reshape(per_epoch, self.crowded), filler.reshape(per_epoch, self.batch_size - self.crowded)], axis=1
        )
        return iter(batches[rng.permutation(per_epoch)].reshape(-1).tolist())
