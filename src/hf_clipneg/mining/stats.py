"""What the mining step found: `MiningStats`, its estimation on random batches, and the hint it carries."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..features import IMAGE_FEATURES
from .config import MiningConfig, NegativeStrategy, describe_evidence
from .rule import evidence_flags

if TYPE_CHECKING:
    from .miner import NegativeMiner


@dataclass
class MiningStats:
    """What the mining step found; `to_markdown()` renders it for a dataset or model card.

    Batch-level numbers are estimated on ``stats_num_batches`` seeded random batches of
    ``stats_batch_size`` valid rows. ``evidence_flagged_fraction``: share of in-batch (ordered,
    off-diagonal) pairs the evidence flags; ``strategy_masked_fraction``: share the strategy masks
    (0 for vanilla, ``random_drop_fraction`` for random). ``caption_duplicate_pair_rate``: share of
    in-batch pairs whose captions are equal after case-folding and collapsing whitespace (a lower
    bound on the false-negative rate); ``group_pair_rate``: share in the same group.
    ``evidence_precision``: share of flagged in-batch pairs that are exact-caption duplicates;
    ``evidence_recall``: share of exact-caption duplicate pairs (up to 4,096 sampled over the whole
    data set) that the evidence flags. ``median_pair_image_cosine``: median image-feature cosine of the
    in-batch pairs (near 1: the images, or the towers' features, are all alike). ``unreadable_captions``:
    rows whose caption the tokenizer reads as mostly unknown tokens (e.g. emoji-only captions with an
    English vocabulary), with up to 5 ``unreadable_caption_examples``; None when no tokenizer was at hand
    (precomputed features) or the tokenizer has no unknown token. None where there was nothing to measure.
    ``n_image_clusters`` and the image cluster sizes are 0 when the rule needed no clusters and mining
    skipped the image k-means (:meth:`MiningConfig.needs_image_clusters`); ``n_text_clusters`` is None
    when the texts were not clustered.
    """

    n_rows: int = 0
    n_valid_rows: int = 0
    n_image_clusters: int = 0
    n_text_clusters: int | None = None
    image_cluster_size_min: int = 0
    image_cluster_size_median: float = 0.0
    image_cluster_size_max: int = 0
    text_cluster_size_min: int | None = None
    text_cluster_size_median: float | None = None
    text_cluster_size_max: int | None = None
    stats_batch_size: int = 0
    evidence_flagged_fraction: float = 0.0
    strategy_masked_fraction: float = 0.0
    negatives_per_row: int = 0
    rows_with_fewer_negatives: int = 0
    fewer_negatives_reasons: dict[str, int] = field(default_factory=dict)
    rows_skipped: int = 0
    skipped_row_indices: list[int] = field(default_factory=list)
    caption_duplicate_pair_rate: float = 0.0
    caption_duplicates_per_batch: float = 0.0
    group_pair_rate: float | None = None
    evidence_precision: float | None = None
    evidence_recall: float | None = None
    median_pair_image_cosine: float | None = None
    unreadable_captions: int | None = None
    unreadable_caption_examples: list[str] = field(default_factory=list)
    hint: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        """A short markdown table of the statistics plus the hint (cluster rows read "n/a" when the rule needed no
        clusters and mining skipped k-means).

        Example:
            >>> "| n image clusters | n/a" in MiningStats().to_markdown()
            True
        """

        def fmt(value: Any) -> str:
            if value is None:
                return "n/a"
            if isinstance(value, float):
                return f"{value:.4g}"
            if isinstance(value, list):
                return ", ".join(map(str, value[:20])) + (" ..." if len(value) > 20 else "") if value else "none"
            if isinstance(value, dict):
                return "; ".join(f"{k}: {v}" for k, v in value.items()) or "none"
            return str(value)

        values = {name: value for name, value in self.to_dict().items() if name != "hint"}
        if not self.n_image_clusters:  # the rule needed no clusters: say so instead of printing zero sizes
            values = {name: ("n/a (k-means skipped: the rule needs no clusters)" if name == "n_image_clusters" else value)
                      for name, value in values.items() if not name.startswith("image_cluster_size")}
        lines = ["| statistic | value |", "|---|---|"]
        lines += [f"| {name.replace('_', ' ')} | {fmt(value)} |" for name, value in values.items()]
        return "\n".join(lines) + f"\n\n{self.hint}\n"



#: A rule that masks more than this share of the in-batch negatives leaves training almost nothing to learn from.
DEGENERATE_MASKED_FRACTION = 0.5


def statistics_hint(per_batch: float, batch_size: int, masked_fraction: float = 0.0, evidence: str = "") -> str:
    """The advice line of :class:`MiningStats`: degenerate batches first (more than
    ``DEGENERATE_MASKED_FRACTION`` masked), else how common exact-caption duplicates are per batch.

    Example:
        >>> statistics_hint(0.5, 256).startswith("Exact-caption duplicates are rare")
        True
    """
    per_row = per_batch / batch_size if batch_size else 0.0
    if masked_fraction > DEGENERATE_MASKED_FRACTION:
        return (
            f"The rule masks {masked_fraction:.0%} of the in-batch negatives ({evidence}): batches are degenerate "
            "and training sees almost no negatives (the loss is near 0 and teaches little). Check the images (all "
            "identical, or a placeholder image repeated?) and the towers (features all near-identical?), or make the "
            "evidence stricter (a higher image_cosine_threshold, pair_quantile) or use strategy='vanilla'."
        )
    if per_row < 0.05:
        return (
            f"Exact-caption duplicates are rare here ({per_batch:.2f} per batch of {batch_size}): masking false "
            "negatives will matter little; compare against strategy='vanilla' before adopting it."
        )
    if per_row < 0.5:
        return (
            f"Exact-caption duplicates are moderately common ({per_batch:.1f} per batch of {batch_size}): the "
            "method may help; check the evidence precision before masking aggressively."
        )
    return (
        f"Exact-caption duplicates are common ({per_batch:.1f} per batch of {batch_size}, {per_row:.2f} per row): "
        "in-batch false negatives are frequent and masking them should matter."
    )


def estimate_statistics(miner: NegativeMiner, valid_rows: np.ndarray, rng: np.random.Generator) -> MiningStats:
    """The statistics of a fitted `miner` on seeded random batches of its valid rows (see :class:`MiningStats`).

    Resolves ``random_drop_fraction`` into ``miner.config`` when it is None (the share the evidence flags).
    """
    config = miner.config
    size = min(config.stats_batch_size, valid_rows.size)
    evidence_config = dataclasses.replace(config, strategy=NegativeStrategy.CLUSTER)
    flagged = pairs = dup = dup_flagged = same_group = 0
    cosines = []
    for _ in range(config.stats_num_batches):
        rows = rng.choice(valid_rows, size=size, replace=False)
        batch = miner.batch_tensors(rows)
        off = ~torch.eye(size, dtype=torch.bool)
        flags = evidence_flags(batch, batch, evidence_config) & off
        image = batch[IMAGE_FEATURES].float()
        cosines.append((image @ image.T)[off])
        flagged += int(flags.sum())
        pairs += size * (size - 1)
        if miner.caption_codes is not None:
            codes = torch.from_numpy(miner.caption_codes[rows])
            dups = (codes[:, None] == codes[None, :]) & off
            dup += int(dups.sum())
            dup_flagged += int((dups & flags).sum())
        if miner.groups is not None:
            groups = torch.from_numpy(miner.groups[rows])
            same_group += int(((groups[:, None] == groups[None, :]) & (groups[:, None] >= 0) & off).sum())
    flagged_fraction = flagged / pairs
    # Recorded for every strategy, so that one mined dataset also serves the random control.
    if config.random_drop_fraction is None:
        config.random_drop_fraction = float(flagged_fraction)
    strategy_fraction = {
        NegativeStrategy.VANILLA: 0.0,
        NegativeStrategy.RANDOM: config.random_drop_fraction or 0.0,
    }.get(config.strategy, flagged_fraction)

    stats = MiningStats(
        n_rows=miner.n_rows,
        n_valid_rows=int(valid_rows.size),
        stats_batch_size=size,
        evidence_flagged_fraction=float(flagged_fraction),
        strategy_masked_fraction=float(strategy_fraction),
        negatives_per_row=config.negatives_per_row,
        rows_skipped=int(miner.skipped.size),
        skipped_row_indices=miner.skipped[:1000].tolist(),
    )
    if miner.image.from_kmeans:
        (stats.n_image_clusters, stats.image_cluster_size_min, stats.image_cluster_size_median,
         stats.image_cluster_size_max) = _size_summary(miner.image.sizes)
    if miner.text is not None:
        (stats.n_text_clusters, stats.text_cluster_size_min, stats.text_cluster_size_median,
         stats.text_cluster_size_max) = _size_summary(miner.text.sizes)
    if miner.caption_codes is not None:
        stats.caption_duplicate_pair_rate = dup / pairs
        stats.caption_duplicates_per_batch = stats.caption_duplicate_pair_rate * size * (size - 1)
        stats.evidence_precision = dup_flagged / flagged if flagged else None
        stats.evidence_recall = _caption_recall(miner, valid_rows, rng, evidence_config)
        stats.hint = statistics_hint(
            stats.caption_duplicates_per_batch, size, stats.strategy_masked_fraction, describe_evidence(config)
        )
    elif stats.strategy_masked_fraction > DEGENERATE_MASKED_FRACTION:
        stats.hint = statistics_hint(0.0, size, stats.strategy_masked_fraction, describe_evidence(config))
    else:
        stats.hint = "No caption column: the false-negative rate of a batch could not be estimated."
    stats.median_pair_image_cosine = float(torch.cat(cosines).median()) if cosines else None
    if miner.groups is not None:
        stats.group_pair_rate = same_group / pairs
    return stats


def _size_summary(sizes: np.ndarray) -> tuple[int, int, float, int]:
    """(k, smallest, median, largest) of the cluster sizes."""
    return int(sizes.size), int(sizes.min()), float(np.median(sizes)), int(sizes.max())


def _caption_recall(
    miner: NegativeMiner, valid_rows: np.ndarray, rng: np.random.Generator, config: MiningConfig
) -> float | None:
    """Share of exact-caption duplicate pairs (sampled over the whole data set) the evidence flags."""
    codes = miner.caption_codes[valid_rows]
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    _, group_start, group_size = np.unique(sorted_codes, return_index=True, return_counts=True)
    size_of = np.repeat(group_size, group_size)
    start_of = np.repeat(group_start, group_size)
    candidates = np.flatnonzero(size_of > 1)
    if candidates.size == 0:
        return None
    picked = rng.choice(candidates, size=min(4096, candidates.size), replace=False)
    within = picked - start_of[picked]
    partner_within = (within + 1 + rng.integers(0, size_of[picked] - 1)) % size_of[picked]
    left = valid_rows[order[picked]]
    right = valid_rows[order[start_of[picked] + partner_within]]
    hits = 0
    for start in range(0, left.size, 512):
        a = miner.batch_tensors(left[start : start + 512])
        b = miner.batch_tensors(right[start : start + 512])
        hits += int(torch.diagonal(evidence_flags(a, b, config)).sum())
    return hits / left.size
