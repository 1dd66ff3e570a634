"""Mining: decide which in-batch (image, text) pairs may serve as negatives, and mine explicit negatives.

The method (Tagami et al., WSCG 2024): embed every pair with frozen towers, cluster the image features
(and separately the text features) with spherical k-means, and only let image i meet the text of row
j as a negative when their image clusters are dissimilar; negatives get larger weights the less
similar their images are. The rule is configurable (:class:`MiningConfig`) because a measured study on
product data found the literal rule can lose to plain in-batch negatives: same-cluster pairs are often
the hardest *true* negatives. Evidence other than clusters (pair cosines, a group column, or true
labels as an oracle) and other actions (down-weighting, extra positives) are available.

Two entry points share one rule:

* :func:`pair_weights` turns a batch's per-row columns into (B, B) negative weights (used by the loss);
* :func:`mine_negatives` / :class:`NegativeMiner` add those per-row columns to a dataset, plus ``m``
  explicit negatives per row chosen without ever building an N x N matrix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, Features, List, Value
from datasets.fingerprint import Hasher
from tqdm.auto import tqdm

from .clustering import CLUSTERING_BACKENDS, cluster_features, default_n_clusters
from .clustering.kmeans import ASSIGNMENT_METHODS
from .data import map_cache_file
from .features import IMAGE_FEATURES, TEXT_FEATURES, compute_features, has_feature_columns

logger = logging.getLogger(__name__)

CONFIG_PREFIX = "hf_clipneg.mining_config="
_MINING_VERSION = "1"
_M31 = (1 << 31) - 1


class NegativeStrategy(str, Enum):
    """Which in-batch negatives the loss uses.

    * ``vanilla``: every in-batch negative, weight 1 (no mining).
    * ``random``: the paper's control: drop the same fraction of in-batch negatives that the cluster
      rule would drop (``random_drop_fraction``), chosen by a deterministic pair hash.
    * ``cluster``: apply ``duplicate_action`` to pairs flagged by the ``evidence``; others weight 1.
    * ``cluster_weighted``: as ``cluster``, and weight allowed negatives by image distance (the paper's
      full method). An oracle is ``evidence="group"`` fed the true duplicate labels.
    """

    VANILLA = "vanilla"
    RANDOM = "random"
    CLUSTER = "cluster"
    CLUSTER_WEIGHTED = "cluster_weighted"


class DuplicateEvidence(str, Enum):
    """What flags a pair as a likely false negative.

    * ``image_cluster``: same (or similar) image cluster (the paper).
    * ``image_and_text_cluster``: same/similar image cluster AND same/similar text cluster.
    * ``pair_cosine``: image cosine > ``image_cosine_threshold`` and, when set, text cosine >
      ``text_cosine_threshold``.
    * ``group``: same value of ``group_column`` (e.g. a product id; true labels make it an oracle).
    * ``any``: near-certain evidence of any kind: same group (when ``group_column`` is set) OR image
      cosine > ``image_cosine_threshold`` OR text cosine > ``text_cosine_threshold`` (each when set).
    """

    IMAGE_CLUSTER = "image_cluster"
    IMAGE_AND_TEXT_CLUSTER = "image_and_text_cluster"
    PAIR_COSINE = "pair_cosine"
    GROUP = "group"
    ANY = "any"


class DuplicateAction(str, Enum):
    """What happens to a flagged pair: ``mask`` (weight 0), ``downweight`` (weight
    ``downweight_factor``) or ``positive`` (weight 0 as a negative, ``extra_positive_weight`` as a target)."""

    MASK = "mask"
    DOWNWEIGHT = "downweight"
    POSITIVE = "positive"


class NegativeSampling(str, Enum):
    """How explicit negatives are drawn among allowed rows: ``random`` (uniformly) or ``lowest``
    (uniformly among the rows of the least similar allowed image clusters: the easiest negatives)."""

    RANDOM = "random"
    LOWEST = "lowest"


class _DefaultThreshold(float):
    """The default `image_cosine_threshold` (0.97), told apart from an explicit 0.97: with `pair_quantile`
    set, the default gives way to the quantile, while an explicit value is kept."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_DefaultThreshold, (float(self),))


DEFAULT_IMAGE_COSINE_THRESHOLD = _DefaultThreshold(0.97)

# Fields the mining step resolves from the data when they are None.
RESOLVED_FIELDS = (
    "n_image_clusters", "n_text_clusters", "image_centroid_threshold", "text_centroid_threshold",
    "image_cosine_threshold", "text_cosine_threshold", "image_distance_mean", "random_drop_fraction",
)
_COLUMN_FIELDS = ("image_column", "caption_column", "group_column")


@dataclass
class MiningConfig:
    """Configuration of the negative rule and the mining step (readable by `transformers.HfArgumentParser`).

    Weight function (``strategy="cluster_weighted"``): for an allowed negative pair (image i, text j),

        w_ij = min(w_max, (d_ij / mean_j' d_ij') ** weight_power),   d_ij = 1 - cos(img_i, img_j)

    where the mean runs over the allowed in-batch negatives of row i, so the mean weight is about 1 and
    ``weight_power`` (gamma) sets the strength (0 = all ones; the literal paper rule is gamma = 1, which
    a study found too weak: log w moved logits by <= 0.3 against a logit scale of ~19). Explicit mined
    negatives use the same formula with the mean replaced by the data set's mean image distance
    (``image_distance_mean``, estimated when mining) since they have no batch. Flagged pairs get 0
    (mask / positive) or ``downweight_factor``.

    Default rule: mask only near-duplicate images (frozen image cosine > 0.97). On real product data
    (benchmarks/quality.py, chosen on validation) this never hurt retrieval, while the paper's literal rule
    (``strategy="cluster_weighted", evidence="image_cluster"``) lost 1.2-2.5 points of category R@1 in 5 of 6
    settings: most same-cluster pairs are the hardest *true* negatives. Set those two fields for the paper's method.

    Fields resolved from the data by the mining step (leave them None): ``n_image_clusters``,
    ``n_text_clusters`` (None = :func:`default_n_clusters`), ``image_centroid_threshold`` /
    ``text_centroid_threshold`` (from ``similar_cluster_quantile``), the cosine thresholds (from
    ``pair_quantile``), ``random_drop_fraction`` (the cluster rule's masked fraction) and
    ``image_distance_mean``. ``pair_quantile`` sets both cosine thresholds from the data: the image
    threshold's 0.97 default gives way to it, while a threshold set explicitly is kept.

    Example:
        >>> config = MiningConfig(strategy="cluster", evidence="image_and_text_cluster", seed=3)
        >>> config.strategy, MiningConfig.from_json(config.to_json()) == config
        (<NegativeStrategy.CLUSTER: 'cluster'>, True)
    """

    strategy: NegativeStrategy = field(
        default=NegativeStrategy.CLUSTER,
        metadata={
            "help":
            "Which in-batch negatives the loss uses: vanilla (all, weight 1: plain CLIP), random (the paper's"
            " control: drop as many pairs as the rule would, at random), cluster (apply duplicate_action to "
            "the pairs the evidence flags), cluster_weighted (as cluster, and weight allowed negatives by "
            "image distance: the paper's full method)."
        },
    )
    evidence: DuplicateEvidence = field(
        default=DuplicateEvidence.PAIR_COSINE,
        metadata={
            "help":
            "What flags a pair as a likely false negative: pair_cosine (frozen image cosine > "
            "image_cosine_threshold, and text cosine > text_cosine_threshold when set), image_cluster (same "
            "or similar image k-means cluster: the paper), image_and_text_cluster (both), group (same "
            "group_column value, e.g. a product id), any (any near-certain evidence)."
        },
    )
    duplicate_action: DuplicateAction = field(
        default=DuplicateAction.MASK,
        metadata={
            "help":
            "What happens to a flagged pair: mask (weight 0: never pushed apart), downweight (weight "
            "downweight_factor), positive (counted as an extra positive with extra_positive_weight)."
        },
    )
    downweight_factor: float = field(
        default=0.1,
        metadata={
            "help":
            "duplicate_action=downweight: the weight of a flagged pair, in [0, 1]."
        },
    )
    extra_positive_weight: float = field(
        default=1.0,
        metadata={
            "help":
            "duplicate_action=positive: the target weight of a flagged pair next to the true pair's 1."
        },
    )
    n_image_clusters: int | None = field(
        default=None,
        metadata={
            "help":
            "k of the image k-means. Default (None): round(1.5 * sqrt(rows)), clipped to [2, 4096]."
        },
    )
    n_text_clusters: int | None = field(
        default=None,
        metadata={
            "help":
            "k of the text k-means. Default (None): round(1.5 * sqrt(rows)), clipped to [2, 4096]."
        },
    )
    clustering_backend: str = field(
        default="kmeans",
        metadata={
            "help":
            "kmeans (spherical k-means with faiss, seconds for 1M rows) or cpp (CPP rate-reduction "
            "clustering, much slower)."
        },
    )
    kmeans_iterations: int = field(default=25, metadata={"help": "Iterations of each k-means run."})
    kmeans_assignment: str = field(
        default="exact",
        metadata={
            "help":
            "How k-means assigns rows to centroids: exact (every centroid; right on any data) or ivf "
            "(approximate; faster for large k on well-clustered features only)."
        },
    )
    similar_cluster_quantile: float | None = field(
        default=None,
        metadata={
            "help":
            "Cluster evidence also blocks clusters whose centroid cosine is above this quantile of all "
            "centroid pairs (e.g. 0.99). Default (None): the same cluster only."
        },
    )
    image_centroid_threshold: float | None = field(
        default=None,
        metadata={
            "help":
            "Resolved by mining from similar_cluster_quantile (stored with the mined data); leave unset."
        },
    )
    text_centroid_threshold: float | None = field(
        default=None,
        metadata={
            "help":
            "Resolved by mining from similar_cluster_quantile (stored with the mined data); leave unset."
        },
    )
    image_cosine_threshold: float | None = field(
        default=DEFAULT_IMAGE_COSINE_THRESHOLD,
        metadata={
            "help":
            "evidence=pair_cosine/any: flag a pair when the frozen image cosine is above this. The default "
            "0.97 (near-duplicate images) never hurt retrieval in benchmarks/quality.py; pair_quantile "
            "replaces the default."
        },
    )
    text_cosine_threshold: float | None = field(
        default=None,
        metadata={
            "help":
            "evidence=pair_cosine/any: also require (pair_cosine) or accept (any) a text cosine above this. "
            "Default (None): text not used."
        },
    )
    pair_quantile: float | None = field(
        default=None,
        metadata={
            "help":
            "Set both cosine thresholds to this quantile of random pair cosines of the data (e.g. 0.999); a "
            "threshold given explicitly is kept."
        },
    )
    negatives_per_row: int = field(
        default=4,
        metadata={
            "help":
            "Explicit mined incorrect texts stored per row (-1 padded). Training uses them only with "
            "--mined_negatives_per_row > 0."
        },
    )
    sampling: NegativeSampling = field(
        default=NegativeSampling.RANDOM,
        metadata={
            "help":
            "How explicit negatives are drawn among allowed rows: random (uniformly) or lowest (from the "
            "least similar image clusters: the easiest)."
        },
    )
    weight_power: float = field(
        default=1.0,
        metadata={
            "help":
            "strategy=cluster_weighted: exponent gamma of the distance weight (0: all ones; 1: the paper)."
        },
    )
    max_weight: float = field(
        default=10.0,
        metadata={
            "help":
            "strategy=cluster_weighted: upper clip of a negative's weight."
        },
    )
    image_distance_mean: float | None = field(
        default=None,
        metadata={
            "help":
            "Resolved by mining (the data's mean image distance, for the weights of explicit negatives); "
            "leave unset."
        },
    )
    random_drop_fraction: float | None = field(
        default=None,
        metadata={
            "help":
            "strategy=random: share of in-batch pairs dropped. Default (None): the share the cluster rule "
            "masks on this data."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of k-means, negative sampling and the statistics batches."})
    group_column: str | None = field(
        default=None,
        metadata={
            "help":
            "The user's group column (e.g. a product id), renamed to 'group'; needed by evidence=group."
        },
    )
    image_column: str = field(default="image", metadata={"help": "The user's image column (renamed to 'image')."})
    caption_column: str = field(
        default="caption",
        metadata={
            "help":
            "The user's caption column (renamed to 'caption')."
        },
    )
    store_features: bool = field(
        default=True,
        metadata={
            "help":
            "Keep the frozen image/text feature columns in the mined dataset (needed by cluster_weighted and "
            "pair_cosine, and reused to train frozen towers)."
        },
    )
    cluster_text: bool = field(
        default=True,
        metadata={
            "help":
            "Also cluster the text features (text clusters are shown in the statistics; "
            "evidence=image_and_text_cluster needs them)."
        },
    )
    stats_batch_size: int = field(
        default=256,
        metadata={
            "help":
            "Batch size at which the mining statistics estimate in-batch masked and false-negative fractions "
            "(use your training batch size)."
        },
    )
    stats_num_batches: int = field(default=8, metadata={"help": "Random batches the mining statistics average over."})

    def __post_init__(self) -> None:
        self.strategy = _coerce(NegativeStrategy, self.strategy, "strategy")
        self.evidence = _coerce(DuplicateEvidence, self.evidence, "evidence")
        self.duplicate_action = _coerce(DuplicateAction, self.duplicate_action, "duplicate_action")
        self.sampling = _coerce(NegativeSampling, self.sampling, "sampling")
        if self.kmeans_assignment not in ASSIGNMENT_METHODS:
            raise ValueError(
                f"kmeans_assignment must be one of {ASSIGNMENT_METHODS}, got {self.kmeans_assignment!r}."
            )
        if self.clustering_backend not in CLUSTERING_BACKENDS:
            raise ValueError(f"clustering_backend must be one of {CLUSTERING_BACKENDS}, got {self.clustering_backend!r}.")
        for name in ("n_image_clusters", "n_text_clusters"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (automatic), got {value!r}.")
        if self.similar_cluster_quantile is not None and not 0.0 < self.similar_cluster_quantile <= 1.0:
            raise ValueError(
                f"similar_cluster_quantile must be in (0, 1] or None (same cluster only), got {self.similar_cluster_quantile}."
            )
        if self.pair_quantile is not None and not 0.0 < self.pair_quantile < 1.0:
            raise ValueError(f"pair_quantile must be in (0, 1), e.g. 0.999, got {self.pair_quantile}.")
        if self.pair_quantile is not None and type(self.image_cosine_threshold) is _DefaultThreshold:
            self.image_cosine_threshold = None  # resolved from pair_quantile by the mining step
        for name in ("image_cosine_threshold", "text_cosine_threshold", "image_centroid_threshold", "text_centroid_threshold"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} is a cosine and must lie in [-1, 1], got {value}.")
        if self.random_drop_fraction is not None and not 0.0 <= self.random_drop_fraction <= 1.0:
            raise ValueError(f"random_drop_fraction must be in [0, 1], got {self.random_drop_fraction}.")
        if self.negatives_per_row < 0:
            raise ValueError(f"negatives_per_row must be >= 0, got {self.negatives_per_row}.")
        if self.weight_power < 0:
            raise ValueError(f"weight_power must be >= 0 (0 = all weights 1), got {self.weight_power}.")
        if self.max_weight <= 0:
            raise ValueError(f"max_weight must be > 0, got {self.max_weight}.")
        if not 0.0 <= self.downweight_factor <= 1.0:
            raise ValueError(f"downweight_factor must be in [0, 1], got {self.downweight_factor}.")
        if self.extra_positive_weight < 0:
            raise ValueError(f"extra_positive_weight must be >= 0, got {self.extra_positive_weight}.")
        if self.kmeans_iterations < 1 or self.stats_batch_size < 2 or self.stats_num_batches < 1:
            raise ValueError("kmeans_iterations and stats_num_batches must be >= 1 and stats_batch_size >= 2.")
        if self.evidence == DuplicateEvidence.GROUP and not self.group_column:
            raise ValueError("evidence='group' needs group_column= (the column holding e.g. the product id).")
        if not self.store_features and (
            self.strategy == NegativeStrategy.CLUSTER_WEIGHTED or self.evidence == DuplicateEvidence.PAIR_COSINE
        ):
            raise ValueError(
                "store_features=False, but strategy='cluster_weighted' and evidence='pair_cosine' each need the "
                "image/text feature columns in every batch. Keep store_features=True or use strategy='cluster'."
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (enums as their string values)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MiningConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are ignored with a warning."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            logger.warning("Ignoring unknown MiningConfig keys %s (written by another hf_clipneg version?).", unknown)
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_json(self) -> str:
        """The config as a one-line JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MiningConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> MiningConfig:
        """The config the mining step stored in ``dataset.info.description`` (survives save/load_from_disk).

        Raises a ValueError when the dataset was not produced by :func:`mine_negatives`.
        """
        for line in (dataset.info.description or "").splitlines():
            if line.startswith(CONFIG_PREFIX):
                return cls.from_json(line[len(CONFIG_PREFIX) :])
        raise ValueError(
            "This dataset carries no mining config in info.description: run `mine_negatives` on it first "
            "(datasets pushed to the Hub keep the config in their card instead)."
        )

    def needs_text_clusters(self) -> bool:
        return self.evidence == DuplicateEvidence.IMAGE_AND_TEXT_CLUSTER


def rule_conflicts(given: MiningConfig, stored: MiningConfig, keys: set[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """Fields (among `keys`, default: those `given` sets to a non-default value) where `given` contradicts the
    rule a dataset was mined with (`stored`), as ``{name: (given, stored)}``.

    Column names are not compared (loading renames them), and None in a field the mining step resolves from
    the data (e.g. ``n_image_clusters``) agrees with any resolved value.

    Example:
        >>> stored = MiningConfig(strategy="cluster_weighted", n_image_clusters=8)
        >>> rule_conflicts(MiningConfig(strategy="cluster_weighted", weight_power=2.0), stored)
        {'weight_power': (2.0, 1.0)}
    """
    default = MiningConfig()
    if keys is None:
        keys = {f.name for f in dataclasses.fields(MiningConfig) if getattr(given, f.name) != getattr(default, f.name)}
    conflicts = {}
    for name in sorted(keys):
        if name in _COLUMN_FIELDS or not hasattr(stored, name):
            continue
        mine, theirs = getattr(given, name), getattr(stored, name)
        if mine is None and name in RESOLVED_FIELDS:
            continue
        if mine != theirs:
            conflicts[name] = (_plain(mine), _plain(theirs))
    return conflicts


def _coerce(enum_type: type[Enum], value: Any, name: str) -> Enum:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        choices = [member.value for member in enum_type]
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.") from None


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and type(value) is not float:
        return float(value)  # the default-threshold marker is a float subclass
    return value


# --------------------------------------------------------------------------------------------------
# The rule on a batch: one source of truth for the loss, the statistics and the mined negatives.
# --------------------------------------------------------------------------------------------------

_HOW_TO_PRODUCE = (
    "Produce it with `mine_negatives(dataset, config)` and keep it in the batches (ClipNegCollator passes "
    "the mining columns; keep remove_unused_columns=False)."
)


def _need(batch: Mapping[str, torch.Tensor], name: str, why: str) -> torch.Tensor:
    if name not in batch:
        raise KeyError(f"The batch has no {name!r} column, which {why} needs. {_HOW_TO_PRODUCE}")
    return torch.as_tensor(batch[name])


def _cluster_block(left: Mapping, right: Mapping, modality: str, use_similar: bool) -> torch.Tensor:
    cluster_key, similar_key = f"{modality}_cluster", f"similar_{modality}_clusters"
    why = f"evidence based on {modality} clusters"
    left_cluster = _need(left, cluster_key, why).long()
    right_cluster = _need(right, cluster_key, why).long()
    blocked = (left_cluster[:, None] == right_cluster[None, :]) & (left_cluster[:, None] >= 0)
    if use_similar:
        similar = _need(left, similar_key, f"similar_cluster_quantile with {why}").long()
        if similar.dim() == 1:
            similar = similar[:, None]
        hit = (similar[:, :, None] == right_cluster[None, None, :]) & (similar[:, :, None] >= 0)
        blocked |= hit.any(dim=1)
    return blocked


def _cosine(left: Mapping, right: Mapping, key: str, why: str) -> torch.Tensor:
    a = _need(left, key, why).float()
    b = _need(right, key, why).float()
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


def evidence_flags(left: Mapping[str, torch.Tensor], right: Mapping[str, torch.Tensor], config: MiningConfig) -> torch.Tensor:
    """(B1, B2) bool: pairs (row i of `left`, row j of `right`) the configured evidence flags as duplicates.

    Self-pairs are not excluded here (:func:`pair_weights` handles the diagonal).
    """
    evidence = config.evidence
    use_similar = config.similar_cluster_quantile is not None and config.similar_cluster_quantile < 1.0
    if evidence == DuplicateEvidence.IMAGE_CLUSTER:
        return _cluster_block(left, right, "image", use_similar)
    if evidence == DuplicateEvidence.IMAGE_AND_TEXT_CLUSTER:
        return _cluster_block(left, right, "image", use_similar) & _cluster_block(left, right, "text", use_similar)
    if evidence == DuplicateEvidence.PAIR_COSINE:
        if config.image_cosine_threshold is None:
            raise ValueError(
                "evidence='pair_cosine' needs image_cosine_threshold (set it, or set pair_quantile and run "
                "mine_negatives, which resolves the thresholds from the data)."
            )
        flags = _cosine(left, right, IMAGE_FEATURES, "evidence='pair_cosine'") > config.image_cosine_threshold
        if config.text_cosine_threshold is not None:
            flags &= _cosine(left, right, TEXT_FEATURES, "evidence='pair_cosine' with a text threshold") > config.text_cosine_threshold
        return flags
    if evidence == DuplicateEvidence.GROUP:
        return _same_group(left, right, "evidence='group'")
    if evidence == DuplicateEvidence.ANY:
        why = "evidence='any'"
        flags = _same_group(left, right, why) if config.group_column else None
        for key, threshold in ((IMAGE_FEATURES, config.image_cosine_threshold), (TEXT_FEATURES, config.text_cosine_threshold)):
            if threshold is not None:
                close = _cosine(left, right, key, why) > threshold
                flags = close if flags is None else flags | close
        if flags is None:
            raise ValueError("evidence='any' needs group_column, image_cosine_threshold or text_cosine_threshold.")
        return flags
    raise ValueError(f"Unknown evidence {evidence!r}.")


def _same_group(left: Mapping, right: Mapping, why: str) -> torch.Tensor:
    left_group = _need(left, "group", why).long()
    right_group = _need(right, "group", why).long()
    return (left_group[:, None] == right_group[None, :]) & (left_group[:, None] >= 0)


def _mix31(x: torch.Tensor) -> torch.Tensor:
    # 31-bit integer hash: every product stays below 2**58, so int64 never overflows on any device.
    x = x & _M31
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    return (x >> 16) ^ x


def random_pair_flags(row_id: torch.Tensor, fraction: float, seed: int = 0, step: int | None = None) -> torch.Tensor:
    """(B, B) bool: each off-diagonal pair is flagged with probability `fraction`, decided by a symmetric
    hash of (row ids, seed, step), so every process of a distributed run derives the same mask.

    Example:
        >>> flags = random_pair_flags(torch.arange(200), 0.3, seed=1)
        >>> bool((flags == flags.T).all()), round(flags.float().mean().item(), 1)
        (True, 0.3)
    """
    row_id = torch.as_tensor(row_id).long()
    low = torch.minimum(row_id[:, None], row_id[None, :])
    high = torch.maximum(row_id[:, None], row_id[None, :])
    salt = _mix31(torch.tensor(int(seed) * 1_000_003 + (0 if step is None else int(step) + 1), device=row_id.device))
    hashed = _mix31(low + _mix31(high + salt))
    uniform = hashed.double() / float(_M31 + 1)
    flags = uniform < fraction
    flags.fill_diagonal_(False)
    return flags


def distance_weights(image_features: torch.Tensor, allowed: torch.Tensor, power: float, max_weight: float) -> torch.Tensor:
    """(B, B) weights ((1 - cos) / row mean over allowed pairs) ** power, clipped to [0, max_weight];
    0 where not allowed."""
    features = torch.nn.functional.normalize(image_features.float(), dim=-1)
    distance = (1.0 - features @ features.T).clamp(min=0.0)
    allowed_f = allowed.float()
    mean = (distance * allowed_f).sum(1, keepdim=True) / allowed_f.sum(1, keepdim=True).clamp(min=1.0)
    ratio = distance / mean.clamp(min=1e-6)
    weights = ratio.pow(power) if power != 0 else torch.ones_like(ratio)
    return weights.clamp(0.0, max_weight) * allowed_f


def pair_weights(
    batch: Mapping[str, torch.Tensor], config: MiningConfig, step: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """In-batch negative weights W (B, B) and extra positive targets P (B, B) or None.

    ``W[i, j]`` weighs the pair (image i, text j) as a negative: 0 = masked, 1 = a plain negative; the
    diagonal (the true pair) is set to 1 and must be ignored by the loss. ``P`` is None unless
    ``duplicate_action="positive"``: then ``P[i, i] = 1`` and flagged pairs get ``extra_positive_weight``.

    `batch` holds per-row tensors of the (possibly gathered, global) batch as written by
    :func:`mine_negatives`: ``row_id``, ``image_cluster``, ``text_cluster``, ``similar_image_clusters``
    (B, L) padded with -1, ``similar_text_clusters``, ``image_features``, ``text_features``, ``group``
    (-1 = none). Only those the configuration needs are required. Runs on the batch's device.

    Example:
        >>> config = MiningConfig(evidence="image_cluster", strategy="cluster")
        >>> W, P = pair_weights({"image_cluster": torch.tensor([0, 0, 1])}, config)
        >>> W.tolist(), P
        ([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]], None)
    """
    any_column = next((torch.as_tensor(v) for v in batch.values() if torch.is_tensor(v) or isinstance(v, np.ndarray)), None)
    if any_column is None:
        raise ValueError("pair_weights needs at least one per-row tensor in the batch.")
    size, device = any_column.shape[0], any_column.device
    eye = torch.eye(size, dtype=torch.bool, device=device)
    if config.strategy == NegativeStrategy.VANILLA:
        return torch.ones(size, size, device=device), None
    if config.strategy == NegativeStrategy.RANDOM:
        if config.random_drop_fraction is None:
            raise ValueError(
                "strategy='random' needs random_drop_fraction (mine_negatives sets it to the fraction the "
                "cluster rule masks; or set it yourself)."
            )
        row_id = _need(batch, "row_id", "strategy='random'")
        flags = random_pair_flags(row_id, config.random_drop_fraction, config.seed, step)
    else:
        flags = evidence_flags(batch, batch, config) & ~eye
    weights = torch.ones(size, size, device=device)
    if config.strategy == NegativeStrategy.CLUSTER_WEIGHTED:
        image_features = _need(batch, IMAGE_FEATURES, "strategy='cluster_weighted'").to(device)
        weights = distance_weights(image_features, ~flags & ~eye, config.weight_power, config.max_weight)
    positives = None
    if config.duplicate_action == DuplicateAction.DOWNWEIGHT:
        weights = torch.where(flags, torch.full_like(weights, config.downweight_factor), weights)
    else:
        weights = weights.masked_fill(flags, 0.0)
        if config.duplicate_action == DuplicateAction.POSITIVE:
            positives = eye.float() + flags.float() * config.extra_positive_weight
    weights = weights.masked_fill(eye, 1.0)
    return weights, positives


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class MiningStats:
    """What the mining step found; `to_markdown()` renders it for a dataset or model card.

    Batch-level numbers are estimated on ``stats_num_batches`` seeded random batches of
    ``stats_batch_size`` valid rows. ``evidence_flagged_fraction``: share of in-batch (ordered,
    off-diagonal) pairs the evidence flags; ``strategy_masked_fraction``: share the strategy masks
    (0 for vanilla, ``random_drop_fraction`` for random). ``caption_duplicate_pair_rate``: share of
    in-batch pairs whose captions are equal after lower-casing and collapsing whitespace (a lower
    bound on the false-negative rate); ``group_pair_rate``: share in the same group.
    ``evidence_precision``: share of flagged in-batch pairs that are exact-caption duplicates;
    ``evidence_recall``: share of exact-caption duplicate pairs (up to 4,096 sampled over the whole
    data set) that the evidence flags. ``median_pair_image_cosine``: median image-feature cosine of the
    in-batch pairs (near 1: the images, or the towers' features, are all alike). ``unreadable_captions``:
    rows whose caption the tokenizer reads as mostly unknown tokens (e.g. emoji-only captions with an
    English vocabulary), with up to 5 ``unreadable_caption_examples``; None when no tokenizer was at hand
    (precomputed features) or the tokenizer has no unknown token. None where there was nothing to measure.
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
        """A short markdown table of the statistics plus the hint."""

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

        lines = ["| statistic | value |", "|---|---|"]
        lines += [f"| {name.replace('_', ' ')} | {fmt(value)} |" for name, value in self.to_dict().items() if name != "hint"]
        return "\n".join(lines) + f"\n\n{self.hint}\n"


def describe_evidence(config: MiningConfig) -> str:
    """The configured evidence in words, with its thresholds (for warnings and hints).

    Example:
        >>> describe_evidence(MiningConfig(evidence="pair_cosine", image_cosine_threshold=0.9))
        'evidence=pair_cosine: image cosine > 0.9'
    """
    evidence = config.evidence
    if evidence == DuplicateEvidence.PAIR_COSINE:
        text = f"image cosine > {config.image_cosine_threshold:.4g}"
        if config.text_cosine_threshold is not None:
            text += f" and text cosine > {config.text_cosine_threshold:.4g}"
    elif evidence == DuplicateEvidence.GROUP:
        text = f"same value of {config.group_column!r}"
    elif evidence == DuplicateEvidence.ANY:
        parts = [f"same value of {config.group_column!r}"] if config.group_column else []
        if config.image_cosine_threshold is not None:
            parts.append(f"image cosine > {config.image_cosine_threshold:.4g}")
        if config.text_cosine_threshold is not None:
            parts.append(f"text cosine > {config.text_cosine_threshold:.4g}")
        text = " or ".join(parts)
    elif evidence == DuplicateEvidence.IMAGE_AND_TEXT_CLUSTER:
        text = "same or similar image cluster and text cluster"
    else:
        text = "same or similar image cluster"
    if config.strategy == NegativeStrategy.RANDOM:
        return f"strategy=random drops {config.random_drop_fraction or 0:.0%} of pairs, the share {text} flags"
    return f"evidence={evidence.value}: {text}"


def _normalise_caption(text: Any) -> str:
    return re.sub(r"\s+", " ", str(text).strip().lower())


#: A rule that masks more than this share of the in-batch negatives leaves training almost nothing to learn from.
DEGENERATE_MASKED_FRACTION = 0.5


def _hint(per_batch: float, batch_size: int, masked_fraction: float = 0.0, evidence: str = "") -> str:
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


# --------------------------------------------------------------------------------------------------
# Deterministic per-row randomness (counter-based, independent of batching and processes)
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# The miner
# --------------------------------------------------------------------------------------------------


@dataclass
class _Clusters:
    labels: np.ndarray  # (N,) int32, -1 for invalid rows
    centroids: np.ndarray  # (k, d)
    similar_ptr: np.ndarray  # CSR over clusters: blocked clusters of each cluster (incl. itself)
    similar_idx: np.ndarray
    threshold: float | None
    sizes: np.ndarray  # (k,)


class NegativeMiner:
    """Fit clusters once, then add the mining columns to any batch of rows (a `datasets` map function).

    After :meth:`fit` (or :meth:`fit_arrays`), ``miner(batch, indices)`` returns the new columns for
    those row positions; explicit negatives are drawn deterministically from (seed, row index), so the
    result does not depend on batch size or on `num_proc`. State is numpy arrays plus the config.
    Memory is O(N * d); selection is O(N * (m + d)) and never builds an N x N matrix.

    Example:
        >>> import numpy as np
        >>> from datasets import Dataset
        >>> rng = np.random.default_rng(0)
        >>> centres = rng.normal(size=(4, 8))
        >>> x = (centres[np.arange(40) % 4] + 0.05 * rng.normal(size=(40, 8))).astype("float32")
        >>> ds = Dataset.from_dict({"image_features": x, "text_features": x, "caption": [f"c{i}" for i in range(40)]})
        >>> miner = NegativeMiner(MiningConfig(evidence="image_cluster", n_image_clusters=4, n_text_clusters=4, negatives_per_row=3)).fit(ds)
        >>> out = ds.map(miner, batched=True, with_indices=True)
        >>> row = out[0]
        >>> all(out[j]["image_cluster"] != row["image_cluster"] for j in row["negative_indices"])
        True
    """

    def __init__(self, config: MiningConfig | None = None) -> None:
        self.config = dataclasses.replace(config) if config is not None else MiningConfig()
        self.fitted = False
        # mine_negatives turns this off when the dataset has a column `group` of its own that is not the
        # group column: that column is kept as it is (the trainer codes the group column itself).
        self.write_group_codes = True

    # ---- fitting -------------------------------------------------------------------------------

    def fit(self, dataset: Dataset) -> NegativeMiner:
        """Read the feature (and group / caption) columns of `dataset` and fit the clusters."""
        if not has_feature_columns(dataset):
            raise KeyError(
                f"fit needs {IMAGE_FEATURES!r} and {TEXT_FEATURES!r} columns: run compute_features(dataset) first "
                "(mine_negatives does it for you)."
            )
        image = _feature_matrix(dataset, IMAGE_FEATURES)
        text = _feature_matrix(dataset, TEXT_FEATURES)
        groups = None
        if self.config.group_column:
            if self.config.group_column not in dataset.column_names:
                raise KeyError(
                    f"group_column {self.config.group_column!r} not found (columns: {dataset.column_names})."
                )
            groups = dataset[self.config.group_column]
        captions = dataset[self.config.caption_column] if self.config.caption_column in dataset.column_names else None
        self._owned = True  # fresh arrays: normalised in place instead of copied
        try:
            return self.fit_arrays(image, text, groups=groups, captions=captions)
        finally:
            self._owned = False

    def fit_arrays(
        self,
        image_features: np.ndarray,
        text_features: np.ndarray | None = None,
        groups: Any = None,
        captions: Any = None,
    ) -> NegativeMiner:
        """Fit from arrays: (N, di) image features, optional (N, dt) text features, group values, captions.

        Rows whose image features contain NaN (unreadable images) are excluded and reported. The miner
        keeps unit-norm float32 features: a copy of the input, except that a C-contiguous float32 input
        whose rows are all valid and unit-norm already is kept as it is (not copied; do not modify it
        while the miner is in use).
        """
        started = time.perf_counter()
        config = self.config
        image = _as_float_matrix(image_features, IMAGE_FEATURES)
        n_rows = image.shape[0]
        if n_rows < 2:
            raise ValueError(f"Mining needs at least 2 rows, got {n_rows}.")
        text = None
        if text_features is not None:
            text = _as_float_matrix(text_features, TEXT_FEATURES)
            if text.shape[0] != n_rows:
                raise ValueError(f"image_features has {n_rows} rows but text_features has {text.shape[0]}.")
        valid = _finite_rows(image)
        if text is not None:
            text_finite = _finite_rows(text)
            inconsistent = np.flatnonzero(valid & ~text_finite)
            if inconsistent.size:
                raise ValueError(
                    f"text_features has NaN or inf values in rows with valid image features, first rows: "
                    f"{inconsistent[:10].tolist()}. Recompute those text features."
                )
        self.valid = valid
        self.skipped = np.flatnonzero(~valid)
        valid_rows = np.flatnonzero(valid)
        if valid_rows.size < 2:
            raise ValueError(
                f"Mining needs at least 2 rows with valid features, got {valid_rows.size} of {n_rows} "
                f"({self.skipped.size} skipped for unreadable images or NaN features)."
            )
        if self.skipped.size:
            logger.warning(
                "Excluding %d row(s) with NaN features (unreadable images) from mining: %s%s",
                self.skipped.size, self.skipped[:20].tolist(), " ..." if self.skipped.size > 20 else "",
            )
        self.n_rows = n_rows
        owned = getattr(self, "_owned", False)
        self.image_features = _normalise_rows(image, valid, _may_overwrite(image, image_features, owned))
        self.text_features = (
            _normalise_rows(text, valid, _may_overwrite(text, text_features, owned)) if text is not None else None
        )

        if config.evidence in (DuplicateEvidence.IMAGE_AND_TEXT_CLUSTER,) and self.text_features is None:
            raise ValueError("evidence='image_and_text_cluster' needs text features.")
        if config.evidence == DuplicateEvidence.PAIR_COSINE and self.text_features is None and (
            config.text_cosine_threshold is not None
        ):
            raise ValueError("text_cosine_threshold is set but there are no text features.")

        self.groups = None
        if groups is not None:
            self.groups = group_codes(groups, n_rows, config.group_column or "group")
        elif config.evidence == DuplicateEvidence.GROUP:
            raise ValueError(f"evidence='group' needs the group column {config.group_column!r}.")
        self.caption_codes = _caption_codes(captions, n_rows) if captions is not None else None

        k_image = config.n_image_clusters or default_n_clusters(valid_rows.size)
        self.image = self._cluster(self.image_features, valid_rows, k_image, "image")
        config.n_image_clusters = int(k_image)
        config.image_centroid_threshold = self.image.threshold
        self.text = None
        if self.text_features is not None and (config.cluster_text or config.needs_text_clusters()):
            k_text = config.n_text_clusters or default_n_clusters(valid_rows.size)
            self.text = self._cluster(self.text_features, valid_rows, k_text, "text")
            config.n_text_clusters = int(k_text)
            config.text_centroid_threshold = self.text.threshold

        rng = np.random.default_rng(config.seed)
        self._resolve_pair_thresholds(valid_rows, rng)
        self._build_pools(valid_rows)
        self.fitted = True
        self.stats = self._statistics(valid_rows, rng)
        self.stats.seconds = time.perf_counter() - started
        return self

    def _cluster(self, features: np.ndarray, valid_rows: np.ndarray, k: int, modality: str) -> _Clusters:
        if k > valid_rows.size:
            raise ValueError(
                f"n_{modality}_clusters={k} is larger than the {valid_rows.size} usable rows: use fewer clusters "
                "(None picks default_n_clusters(N)) or more data."
            )
        kwargs: dict[str, Any] = {}
        if self.config.clustering_backend == "kmeans":
            kwargs.update(  # rows are unit-norm already
                n_iter=self.config.kmeans_iterations, normalize=False, assignment=self.config.kmeans_assignment
            )
        subset = features if valid_rows.size == self.n_rows else features[valid_rows]  # avoid an N x d copy
        labels_valid, centroids = cluster_features(
            subset, k, backend=self.config.clustering_backend, seed=self.config.seed, **kwargs
        )
        labels = np.full(self.n_rows, -1, dtype=np.int32)
        labels[valid_rows] = labels_valid
        sizes = np.bincount(labels_valid, minlength=k)
        similarity = centroids @ centroids.T
        threshold = None
        quantile = self.config.similar_cluster_quantile
        if quantile is not None and quantile < 1.0 and k > 1:
            off_diagonal = similarity[~np.eye(k, dtype=bool)]
            threshold = float(np.quantile(off_diagonal, quantile))
        blocked = np.eye(k, dtype=bool) if threshold is None else (similarity >= threshold) | np.eye(k, dtype=bool)
        ptr = np.concatenate([[0], np.cumsum(blocked.sum(1))]).astype(np.int64)
        idx = np.nonzero(blocked)[1].astype(np.int32)
        self.__dict__[f"_{modality}_similarity"] = similarity
        return _Clusters(labels, centroids, ptr, idx, threshold, sizes)

    def _resolve_pair_thresholds(self, valid_rows: np.ndarray, rng: np.random.Generator) -> None:
        config = self.config
        left = rng.choice(valid_rows, size=min(20000, valid_rows.size * 4))
        right = rng.choice(valid_rows, size=left.size)
        keep = left != right
        left, right = left[keep], right[keep]
        image_cos = np.einsum("nd,nd->n", self.image_features[left], self.image_features[right])
        if config.image_distance_mean is None:
            config.image_distance_mean = float(max(np.mean(1.0 - image_cos), 1e-6)) if image_cos.size else 1.0
        if config.pair_quantile is not None:
            if config.image_cosine_threshold is None:
                config.image_cosine_threshold = float(np.quantile(image_cos, config.pair_quantile))
            if config.text_cosine_threshold is None and self.text_features is not None:
                text_cos = np.einsum("nd,nd->n", self.text_features[left], self.text_features[right])
                config.text_cosine_threshold = float(np.quantile(text_cos, config.pair_quantile))

    def _build_pools(self, valid_rows: np.ndarray) -> None:
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
        similarity = self._image_similarity
        seg_cluster, seg_cstart, seg_ostart, seg_len = [], [], [], []
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
                seg_len.append(length)
                offset += length
            pool_size[c] = offset
        self.pool_size = pool_size
        self.seg_key = np.asarray(seg_cluster, dtype=np.int64) * (1 << 41) + np.asarray(seg_cstart, dtype=np.int64)
        self.seg_cstart = np.asarray(seg_cstart, dtype=np.int64)
        self.seg_ostart = np.asarray(seg_ostart, dtype=np.int64)
        self.pool_excludes_blocked = bool(restricted and cluster_evidence)

    # ---- batch tensors for the rule ------------------------------------------------------------

    def batch_tensors(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The per-row tensors :func:`pair_weights` reads, for the given row positions."""
        rows = np.asarray(rows, dtype=np.int64)
        batch = {
            "row_id": torch.from_numpy(rows.copy()),
            "image_cluster": torch.from_numpy(self.image.labels[rows].astype(np.int64)),
            "similar_image_clusters": torch.from_numpy(_padded(self.image, self.image.labels[rows])),
            IMAGE_FEATURES: torch.from_numpy(self.image_features[rows]),
        }
        if self.text is not None:
            batch["text_cluster"] = torch.from_numpy(self.text.labels[rows].astype(np.int64))
            batch["similar_text_clusters"] = torch.from_numpy(_padded(self.text, self.text.labels[rows]))
        if self.text_features is not None:
            batch[TEXT_FEATURES] = torch.from_numpy(self.text_features[rows])
        if self.groups is not None:
            batch["group"] = torch.from_numpy(self.groups[rows])
        return batch

    # ---- statistics ------------------------------------------------------------------------------

    def _statistics(self, valid_rows: np.ndarray, rng: np.random.Generator) -> MiningStats:
        config = self.config
        size = min(config.stats_batch_size, valid_rows.size)
        evidence_config = dataclasses.replace(config, strategy=NegativeStrategy.CLUSTER)
        flagged = pairs = dup = dup_flagged = same_group = 0
        cosines = []
        for _ in range(config.stats_num_batches):
            rows = rng.choice(valid_rows, size=size, replace=False)
            batch = self.batch_tensors(rows)
            off = ~torch.eye(size, dtype=torch.bool)
            flags = evidence_flags(batch, batch, evidence_config) & off
            image = batch[IMAGE_FEATURES].float()
            cosines.append((image @ image.T)[off])
            flagged += int(flags.sum())
            pairs += size * (size - 1)
            if self.caption_codes is not None:
                codes = torch.from_numpy(self.caption_codes[rows])
                dups = (codes[:, None] == codes[None, :]) & off
                dup += int(dups.sum())
                dup_flagged += int((dups & flags).sum())
            if self.groups is not None:
                groups = torch.from_numpy(self.groups[rows])
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
            n_rows=self.n_rows,
            n_valid_rows=int(valid_rows.size),
            n_image_clusters=int(self.image.sizes.size),
            image_cluster_size_min=int(self.image.sizes.min()),
            image_cluster_size_median=float(np.median(self.image.sizes)),
            image_cluster_size_max=int(self.image.sizes.max()),
            stats_batch_size=size,
            evidence_flagged_fraction=float(flagged_fraction),
            strategy_masked_fraction=float(strategy_fraction),
            negatives_per_row=config.negatives_per_row,
            rows_skipped=int(self.skipped.size),
            skipped_row_indices=self.skipped[:1000].tolist(),
        )
        if self.text is not None:
            stats.n_text_clusters = int(self.text.sizes.size)
            stats.text_cluster_size_min = int(self.text.sizes.min())
            stats.text_cluster_size_median = float(np.median(self.text.sizes))
            stats.text_cluster_size_max = int(self.text.sizes.max())
        if self.caption_codes is not None:
            stats.caption_duplicate_pair_rate = dup / pairs
            stats.caption_duplicates_per_batch = stats.caption_duplicate_pair_rate * size * (size - 1)
            stats.evidence_precision = dup_flagged / flagged if flagged else None
            stats.evidence_recall = self._caption_recall(valid_rows, rng, evidence_config)
            stats.hint = _hint(
                stats.caption_duplicates_per_batch, size, stats.strategy_masked_fraction, describe_evidence(config)
            )
        elif stats.strategy_masked_fraction > DEGENERATE_MASKED_FRACTION:
            stats.hint = _hint(0.0, size, stats.strategy_masked_fraction, describe_evidence(config))
        else:
            stats.hint = "No caption column: the false-negative rate of a batch could not be estimated."
        stats.median_pair_image_cosine = float(torch.cat(cosines).median()) if cosines else None
        if self.groups is not None:
            stats.group_pair_rate = same_group / pairs
        return stats

    def _caption_recall(self, valid_rows: np.ndarray, rng: np.random.Generator, config: MiningConfig) -> float | None:
        """Share of exact-caption duplicate pairs (sampled over the whole data set) the evidence flags."""
        codes = self.caption_codes[valid_rows]
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
            a = self.batch_tensors(left[start : start + 512])
            b = self.batch_tensors(right[start : start + 512])
            hits += int(torch.diagonal(evidence_flags(a, b, config)).sum())
        return hits / left.size

    # ---- selection ---------------------------------------------------------------------------------

    def select_negatives(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Explicit negatives for row positions `rows`: (n, m) int64 indices (-1 padded), (n, m) float32
        weights (0 at padding) and, per row, None or why it got fewer than m."""
        self._check_fitted()
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

    # ---- the datasets map function -----------------------------------------------------------------

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, Any]:
        self._check_fitted()
        rows = np.asarray(indices, dtype=np.int64)
        negatives, weights, _ = self.select_negatives(rows)
        out: dict[str, Any] = {
            "row_id": rows,
            "image_cluster": self.image.labels[rows],
            "similar_image_clusters": _lists(self.image, self.image.labels[rows]),
            "negative_indices": negatives,
            "negative_weights": weights,
        }
        if self.text is not None:
            out["text_cluster"] = self.text.labels[rows]
            out["similar_text_clusters"] = _lists(self.text, self.text.labels[rows])
        if self.groups is not None and self.write_group_codes:
            out["group"] = self.groups[rows]
        return out

    def output_features(self) -> dict[str, Any]:
        """`datasets` feature types of the columns :meth:`__call__` adds."""
        features: dict[str, Any] = {
            "row_id": Value("int64"),
            "image_cluster": Value("int32"),
            "similar_image_clusters": List(Value("int32")),
            "negative_indices": List(Value("int64")),
            "negative_weights": List(Value("float32")),
        }
        if self.text is not None:
            features["text_cluster"] = Value("int32")
            features["similar_text_clusters"] = List(Value("int32"))
        if self.groups is not None and self.write_group_codes:
            features["group"] = Value("int64")
        return features

    def fingerprint(self, dataset_fingerprint: str) -> str:
        """Fingerprint of the map result: the input's fingerprint and the fully resolved config."""
        return Hasher.hash(["hf_clipneg.mine_negatives", _MINING_VERSION, dataset_fingerprint, self.config.to_json()])

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("Call NegativeMiner.fit(dataset) (or fit_arrays) before using the miner.")


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


def _padded(clusters: _Clusters, labels: np.ndarray) -> np.ndarray:
    lengths = np.where(labels >= 0, clusters.similar_ptr[labels + 1] - clusters.similar_ptr[np.maximum(labels, 0)], 0)
    width = max(int(lengths.max(initial=0)), 1)
    out = np.full((labels.size, width), -1, dtype=np.int64)
    for i, (label, length) in enumerate(zip(labels, lengths)):
        if length:
            out[i, :length] = clusters.similar_idx[clusters.similar_ptr[label] : clusters.similar_ptr[label] + length]
    return out


def _lists(clusters: _Clusters, labels: np.ndarray) -> list[np.ndarray]:
    empty = np.zeros(0, dtype=np.int32)
    return [
        clusters.similar_idx[clusters.similar_ptr[c] : clusters.similar_ptr[c + 1]] if c >= 0 else empty for c in labels
    ]


def _as_float_matrix(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object:
        raise TypeError(f"{name} must be an (N, d) numeric array; got ragged or non-numeric values.")
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dims), got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"{name} must be numeric, got dtype {array.dtype}.")
    array = np.ascontiguousarray(array, dtype=np.float32)
    # inf is not a marker of a skipped row (NaN is): it is a bug upstream.
    infinite = np.flatnonzero(_row_test(array, lambda block: np.isinf(block).any(1)))
    if infinite.size:
        raise ValueError(f"{name} has inf values in rows {infinite[:10].tolist()}: recompute those features.")
    return array


def _row_test(array: np.ndarray, test: Any, block: int = 65_536) -> np.ndarray:
    """(N,) bool `test` of row blocks: no N x d temporary (that would be 384 MB at 1M x 384)."""
    if not len(array):
        return np.zeros(0, dtype=bool)
    return np.concatenate([test(array[start : start + block]) for start in range(0, len(array), block)])


def _finite_rows(array: np.ndarray) -> np.ndarray:
    return _row_test(array, lambda block: np.isfinite(block).all(1))


def _may_overwrite(array: np.ndarray, given: Any, owned: bool) -> bool:
    """True when `array` is ours to normalise in place: a writable array we created, not the caller's
    memory (a view of a caller's array, memmap or tensor has owndata False)."""
    if not array.flags.writeable:
        return False
    return owned or (array is not given and array.flags.owndata)


def _normalise_rows(features: np.ndarray, valid: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Unit-norm `features` (float32); invalid (NaN) rows become zeros.

    Works in place when `in_place` (the caller owns the array); otherwise copies, unless every row is
    valid and unit-norm already, in which case `features` itself is returned.
    """
    norms = np.sqrt(np.einsum("nd,nd->n", features, features))  # NaN in invalid rows
    norms[~valid] = 1.0
    zero = np.flatnonzero(norms <= 1e-12)
    if zero.size:
        raise ValueError(f"Features are all zero in rows {zero[:10].tolist()}: recompute them.")
    if not in_place and valid.all() and np.abs(norms - 1.0).max(initial=0.0) <= 1e-5:
        return features
    out = features if in_place else np.array(features, dtype=np.float32, copy=True)
    if not valid.all():
        out[~valid] = 0.0
    for start in range(0, len(out), 65_536):
        out[start : start + 65_536] /= norms[start : start + 65_536, None]
    return out


def group_codes(groups: Any, n_rows: int | None = None, column: str = "group") -> np.ndarray:
    """(N,) int64 codes of a group column: equal values share a code (in order of first appearance), a
    missing value (None, NaN) gets -1 (a group of its own: never the same group as another row).

    Values may be of any hashable type: strings ("SKU-000", "Wallets|Grey|Women"), integers, ... Computed
    once for a whole dataset, so codes agree across batches and processes.

    Example:
        >>> group_codes(["SKU-1", "SKU-2", None, "SKU-1"]).tolist()
        [0, 1, -1, 0]
    """
    values = groups.tolist() if isinstance(groups, np.ndarray) else list(groups)
    if n_rows is not None and len(values) != n_rows:
        raise ValueError(f"The group column {column!r} has {len(values)} values for {n_rows} rows.")
    codes = np.full(len(values), -1, dtype=np.int64)
    seen: dict[Any, int] = {}
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        try:
            codes[i] = seen.setdefault(value, len(seen))
        except TypeError:
            raise TypeError(
                f"The group column {column!r} holds {value!r} (a {type(value).__name__}) in row {i}, which cannot be "
                "a group value: use one scalar per row (a string or an integer id)."
            ) from None
    return codes


_group_codes = group_codes


def _caption_codes(captions: Any, n_rows: int) -> np.ndarray:
    values = list(captions)
    if len(values) != n_rows:
        raise ValueError(f"The caption column has {len(values)} values for {n_rows} rows.")
    seen: dict[str, int] = {}
    return np.fromiter((seen.setdefault(_normalise_caption(v), len(seen)) for v in values), dtype=np.int64, count=n_rows)


def _feature_matrix(dataset: Dataset, column: str) -> np.ndarray:
    values = dataset.with_format("arrow")[column]
    if isinstance(values, pa.Table):
        values = values.column(0)
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type)):
        raise TypeError(f"Column {column!r} must hold lists of floats, got {values.type}.")
    if values.null_count:
        nulls = np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))
        raise ValueError(f"Column {column!r} is missing (null) in rows {nulls[:10].tolist()}.")
    lengths = np.asarray(pa.compute.list_value_length(values).to_numpy(zero_copy_only=False))
    if lengths.size and (lengths != lengths[0]).any():
        bad = np.flatnonzero(lengths != lengths[0])
        raise ValueError(
            f"Column {column!r} has vectors of different lengths ({lengths[0]} in row 0, {lengths[bad[0]]} in row "
            f"{bad[0]}): all rows must come from the same tower."
        )
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(values), int(lengths[0]) if lengths.size else 0)


def mine_negatives(
    dataset: Dataset,
    config: MiningConfig | None = None,
    model: Any = None,
    processor: Any = None,
    *,
    batch_size: int = 64,
    num_proc: int | None = None,
    device: str | torch.device | None = None,
    on_bad_image: str = "error",
) -> tuple[Dataset, MiningStats]:
    """Embed (unless feature columns exist), cluster, and add the mining columns to a copy of `dataset`.

    Added columns: ``row_id`` (int64 position), ``image_cluster`` / ``text_cluster`` (int32, -1 for skipped
    rows), ``similar_image_clusters`` / ``similar_text_clusters`` (int32 lists: the clusters blocked for
    this row, its own included), ``negative_indices`` (exactly ``negatives_per_row`` int64 row positions,
    -1 padded), ``negative_weights`` (float32, 0 at padding), ``group`` (int64 codes, with a group
    column) and the feature columns (dropped when ``store_features=False``). The resolved config is
    written into ``info.description`` (read it back with :meth:`MiningConfig.from_dataset`). The column
    step is fingerprint-cached by `datasets` (clustering itself is recomputed on every call).

    Explicit negatives follow the same rule as :func:`pair_weights`: for cluster evidence they are drawn
    from image clusters that are not blocked for the row (for ``image_and_text_cluster`` this is
    stricter than the in-batch rule, which also allows same-image-cluster rows whose text clusters
    differ); for ``group`` / ``pair_cosine`` evidence candidates are drawn from all rows and flagged
    ones rejected; ``vanilla`` / ``random`` draw from all other rows. Weights: see :class:`MiningConfig`.

    Args:
        dataset: rows with image and caption columns, or precomputed feature columns.
        config: the rule; defaults to ``MiningConfig()``.
        model, processor: towers for :func:`compute_features` (None = the packaged towers).
        batch_size: rows per embedding forward pass.
        num_proc, device, on_bad_image: passed to :func:`compute_features`.

    Returns:
        ``(mined_dataset, stats)``.

    Example:
        >>> import numpy as np
        >>> from datasets import Dataset
        >>> x = np.random.default_rng(0).normal(size=(30, 8)).astype("float32")
        >>> ds = Dataset.from_dict({"image_features": x, "text_features": x, "caption": [f"c{i}" for i in range(30)]})
        >>> mined, stats = mine_negatives(ds, MiningConfig(evidence="image_cluster", n_image_clusters=3, negatives_per_row=2))
        >>> mined.column_names[:3], stats.n_image_clusters, MiningConfig.from_dataset(mined).n_image_clusters
        (['image_features', 'text_features', 'caption'], 3, 3)
    """
    config = dataclasses.replace(config) if config is not None else MiningConfig()
    if len(dataset) < 2:
        raise ValueError(f"Mining needs at least 2 rows, got {len(dataset)}.")
    existing = [c for c in ("image_cluster", "negative_indices") if c in dataset.column_names]
    if existing:
        raise ValueError(
            f"The dataset already has mining columns {existing + (['row_id'] if 'row_id' in dataset.column_names else [])}: "
            "mine the original dataset, or remove them first (`ds.remove_columns([...])`)."
        )
    if "row_id" in dataset.column_names:
        kept = _free_name(dataset, "row_id_original")
        logger.warning(
            "The dataset has a column 'row_id' of its own: it is kept as %r, since mining writes each row's position "
            "to 'row_id' (mined negatives refer to it).", kept,
        )
        dataset = dataset.rename_column("row_id", kept)
    if model is None and not has_feature_columns(dataset):
        from .towers import build_dual_encoder

        model, processor = build_dual_encoder()
    if not has_feature_columns(dataset):
        dataset = compute_features(
            dataset,
            model,
            processor,
            image_column=config.image_column,
            caption_column=config.caption_column,
            batch_size=batch_size,
            num_proc=num_proc,
            device=device,
            on_bad_image=on_bad_image,
        )
    elif config.caption_column in dataset.column_names:
        from .features import check_captions

        check_captions(dataset, config.caption_column)
    miner = NegativeMiner(config).fit(dataset)
    if config.group_column not in (None, "group") and "group" in dataset.column_names:
        logger.info(
            "Keeping the dataset's own column 'group' as it is: the group codes of %r are not written into it.",
            config.group_column,
        )
        miner.write_group_codes = False
    remove = [] if config.store_features else [IMAGE_FEATURES, TEXT_FEATURES]
    features = Features({name: feature for name, feature in dataset.features.items() if name not in remove})
    features.update(miner.output_features())
    fingerprint = miner.fingerprint(dataset._fingerprint)
    mined = dataset.map(
        miner,
        batched=True,
        batch_size=1000,
        with_indices=True,
        remove_columns=remove or None,
        features=features,
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        cache_file_name=map_cache_file(dataset, fingerprint),
        desc="Mining negatives",
    )
    mined._info = mined.info.copy()
    kept = [line for line in (mined.info.description or "").splitlines() if not line.startswith(CONFIG_PREFIX)]
    mined.info.description = "\n".join(kept + [CONFIG_PREFIX + miner.config.to_json()])

    stats = miner.stats
    if config.negatives_per_row:
        stats.rows_with_fewer_negatives, stats.fewer_negatives_reasons = _short_rows(mined, miner, config.negatives_per_row)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and config.caption_column in dataset.column_names:
        captions = dataset.with_format("arrow")[config.caption_column]
        captions = (captions.column(0) if isinstance(captions, pa.Table) else captions).to_pylist()
        unreadable = unreadable_caption_rows(captions, tokenizer)
        if unreadable is not None:
            stats.unreadable_captions = int(unreadable.size)
            stats.unreadable_caption_examples = list(dict.fromkeys(captions[i] for i in unreadable))[:5]
            if unreadable.size:
                logger.warning(
                    "%d of %d captions are mostly tokens the tokenizer does not know (e.g. %s): each becomes "
                    "[UNK]s, so they all get (nearly) the same text vector although they count as distinct "
                    "captions, and the text tower learns nothing from them. Use a text tower whose vocabulary "
                    "covers them (a multilingual tower, e.g. a multilingual BERT/XLM-R tokenizer, or a byte-level "
                    "one), or rewrite those captions in words.",
                    unreadable.size, len(captions), ", ".join(repr(c) for c in stats.unreadable_caption_examples[:3]),
                )
    if stats.strategy_masked_fraction > DEGENERATE_MASKED_FRACTION:
        logger.warning(
            "Degenerate batches: the rule masks %.0f%% of the in-batch negatives (%s; median in-batch image cosine "
            "%.4f). Training would see almost no negatives and its loss would be near 0. %s",
            100 * stats.strategy_masked_fraction, describe_evidence(miner.config),
            stats.median_pair_image_cosine if stats.median_pair_image_cosine is not None else float("nan"),
            "Check for identical or placeholder images and towers whose features are all alike, or make the "
            "evidence stricter (higher image_cosine_threshold, pair_quantile) or train with strategy='vanilla'.",
        )
    logger.info("Mining statistics:\n%s", stats.to_markdown())
    return mined, stats


def unreadable_caption_rows(captions: list[str], tokenizer: Any, share: float = 0.5) -> np.ndarray | None:
    """Rows whose caption the tokenizer reads as mostly (more than `share` of its tokens) unknown tokens, e.g.
    emoji-only captions with an English word-piece vocabulary. None when the tokenizer has no unknown token
    (byte-level tokenizers read everything).

    Example:
        >>> from hf_clipneg.testing import build_tiny_tokenizer
        >>> unreadable_caption_rows(["a red circle", "\U0001F457\U0001F534"], build_tiny_tokenizer()).tolist()
        [1]
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    distinct = list(dict.fromkeys(str(c) for c in captions))
    bad: set[str] = set()
    for start in range(0, len(distinct), 1024):
        chunk = distinct[start : start + 1024]
        ids = tokenizer(chunk, add_special_tokens=False, truncation=True, max_length=512)["input_ids"]
        for caption, tokens in zip(chunk, ids):
            if not tokens or sum(t == unk for t in tokens) > share * len(tokens):
                bad.add(caption)
    return np.asarray([i for i, c in enumerate(captions) if str(c) in bad], dtype=np.int64)


def _free_name(dataset: Dataset, name: str) -> str:
    candidate, number = name, 1
    while candidate in dataset.column_names:
        number += 1
        candidate = f"{name}_{number}"
    return candidate


def _short_rows(mined: Dataset, miner: NegativeMiner, m: int) -> tuple[int, dict[str, int]]:
    indices = _feature_matrix(mined, "negative_indices") if len(mined) else np.zeros((0, m))
    short = np.flatnonzero((indices >= 0).sum(1) < m)
    reasons: dict[str, int] = {}
    for start in tqdm(range(0, short.size, 10_000), desc="Counting short rows", disable=short.size < 100_000):
        _, _, why = miner.select_negatives(short[start : start + 10_000])
        for reason in why:
            if reason:
                reasons[reason] = reasons.get(reason, 0) + 1
    return int(short.size), reasons
