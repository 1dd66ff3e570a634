"""Mining: decide which in-batch (image, text) pairs may serve as negatives, and mine explicit negatives.

The method (Tagami et al., WSCG 2024): embed every pair with frozen towers, cluster the image features
(and separately the text features) with spherical k-means, and only let image i meet the text of row
j as a negative when their image clusters are dissimilar; negatives get larger weights the less
similar their images are. The rule is configurable (:class:`MiningConfig`) because a measured study on
product data found the literal rule can lose to plain in-batch negatives: same-cluster pairs are often
the hardest *true* negatives. Evidence other than clusters (pair cosines, a group column, or true
labels as an oracle) and other actions (down-weighting, extra positives) are available; k-means runs
only when the rule reads clusters.

The package, in the order data flows through it:

* ``config`` (torch-free): the strategy / evidence / action enums, :class:`MiningConfig`, ``CONFIG_PREFIX``;
* ``rule``: :func:`pair_weights` turns a batch's per-row columns into (B, B) negative weights (the loss);
* ``arrays``, ``clusters``, ``selection``, ``miner``: :class:`NegativeMiner` fits clusters once and writes
  those per-row columns, plus ``m`` explicit negatives per row chosen without an N x N matrix;
* ``stats``: :class:`MiningStats`, what the mining step found;
* ``mine``: :func:`mine_negatives`, the datasets step.

Only ``config`` loads on ``import hf_clipneg.mining``; the other names load on first use (torch).
"""

from __future__ import annotations

from .._lazy import lazy_exports
from .config import (
    CONFIG_PREFIX,
    DEFAULT_IMAGE_COSINE_THRESHOLD,
    RESOLVED_FIELDS,
    DuplicateAction,
    DuplicateEvidence,
    MiningConfig,
    NegativeSampling,
    NegativeStrategy,
    describe_evidence,
    rule_conflicts,
)

_LAZY_EXPORTS = {
    "distance_weights": "rule",
    "evidence_flags": "rule",
    "model_guided_flags": "rule",
    "pair_weights": "rule",
    "random_pair_flags": "rule",
    "group_codes": "arrays",
    "NegativeMiner": "miner",
    "DEGENERATE_MASKED_FRACTION": "stats",
    "MiningStats": "stats",
    "mine_negatives": "mine",
    "unreadable_caption_rows": "mine",
}

__all__ = [
    "CONFIG_PREFIX",
    "DEFAULT_IMAGE_COSINE_THRESHOLD",
    "DEGENERATE_MASKED_FRACTION",
    "DuplicateAction",
    "DuplicateEvidence",
    "MiningConfig",
    "MiningStats",
    "NegativeMiner",
    "NegativeSampling",
    "NegativeStrategy",
    "RESOLVED_FIELDS",
    "describe_evidence",
    "distance_weights",
    "evidence_flags",
    "group_codes",
    "mine_negatives",
    "model_guided_flags",
    "pair_weights",
    "random_pair_flags",
    "rule_conflicts",
    "unreadable_caption_rows",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY_EXPORTS, globals())
