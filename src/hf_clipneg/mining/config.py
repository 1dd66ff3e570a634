"""The negative rule's configuration: strategy, evidence and action enums, `MiningConfig` and its round trips.

Torch-free on purpose: the Hub code, the training arguments and the CLI read and write mining configs
without loading torch. ``CONFIG_PREFIX`` marks the line of a mined dataset's ``info.description`` that
holds the config JSON (:meth:`MiningConfig.from_dataset`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from ..clustering import CLUSTERING_BACKENDS
from ..clustering.kmeans import ASSIGNMENT_METHODS

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

#: The line of a mined dataset's ``info.description`` that starts with this holds the mining config JSON.
CONFIG_PREFIX = "hf_clipneg.mining_config="


class NegativeStrategy(str, Enum):
    """Which in-batch negatives the loss uses (the paper's four arms).

    * ``vanilla``: every in-batch negative, weight 1 (plain CLIP; reads no evidence).
    * ``random``: the paper's control: drop the share of in-batch negatives the evidence would flag
      (``random_drop_fraction``, resolved when mining), chosen by a deterministic pair hash.
    * ``cluster``: apply ``duplicate_action`` to the pairs the ``evidence`` flags; others weight 1. By
      default the evidence is ``pair_cosine`` (frozen image cosine > 0.97), not clusters: the paper's
      same-cluster rule is ``evidence="image_cluster"``.
    * ``cluster_weighted``: as ``cluster`` (same default evidence, image cosine), and weight the allowed
      negatives by image distance; with ``evidence="image_cluster"`` it is the paper's full method. An
      oracle is ``evidence="group"`` fed the true duplicate labels.
    """

    VANILLA = "vanilla"
    RANDOM = "random"
    CLUSTER = "cluster"
    CLUSTER_WEIGHTED = "cluster_weighted"


class DuplicateEvidence(str, Enum):
    """What flags a pair as a likely false negative.

    * ``pair_cosine`` (the default): image cosine > ``image_cosine_threshold`` and, when set, text cosine >
      ``text_cosine_threshold``; reads the feature columns, no clusters (mining then skips k-means).
    * ``image_cluster``: same (or similar) image cluster (the paper).
    * ``image_and_text_cluster``: same/similar image cluster AND same/similar text cluster.
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
_FROM_CLUSTER_QUANTILE = "Resolved by mining from similar_cluster_quantile (stored with the mined data); leave unset."


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
        metadata={"help": (
            "Which in-batch negatives the loss uses: vanilla (all, weight 1: plain CLIP), random (the paper's"
            " control: drop as many pairs as the rule would, at random), cluster (apply duplicate_action to "
            "the pairs the evidence flags: by default image cosine > 0.97, not clusters), cluster_weighted (as "
            "cluster, and weight allowed negatives by image distance; with evidence=image_cluster: the paper's "
            "full method)."
        )},
    )
    evidence: DuplicateEvidence = field(
        default=DuplicateEvidence.PAIR_COSINE,
        metadata={"help": (
            "What flags a pair as a likely false negative: pair_cosine (frozen image cosine > "
            "image_cosine_threshold, and text cosine > text_cosine_threshold when set), image_cluster (same "
            "or similar image k-means cluster: the paper), image_and_text_cluster (both), group (same "
            "group_column value, e.g. a product id), any (any near-certain evidence)."
        )},
    )
    duplicate_action: DuplicateAction = field(
        default=DuplicateAction.MASK,
        metadata={"help": (
            "What happens to a flagged pair: mask (weight 0: never pushed apart), downweight (weight "
            "downweight_factor), positive (counted as an extra positive with extra_positive_weight)."
        )},
    )
    downweight_factor: float = field(
        default=0.1, metadata={"help": "duplicate_action=downweight: the weight of a flagged pair, in [0, 1]."}
    )
    extra_positive_weight: float = field(
        default=1.0,
        metadata={"help": "duplicate_action=positive: the target weight of a flagged pair next to the true pair's 1."},
    )
    n_image_clusters: int | None = field(
        default=None,
        metadata={"help": "k of the image k-means. Default (None): round(1.5 * sqrt(rows)), clipped to [2, 4096]."},
    )
    n_text_clusters: int | None = field(
        default=None,
        metadata={"help": "k of the text k-means. Default (None): round(1.5 * sqrt(rows)), clipped to [2, 4096]."},
    )
    clustering_backend: str = field(
        default="kmeans",
        metadata={"help": (
            "kmeans (spherical k-means with faiss, seconds for 1M rows) or cpp (CPP rate-reduction "
            "clustering, much slower)."
        )},
    )
    kmeans_iterations: int = field(default=25, metadata={"help": "Iterations of each k-means run."})
    kmeans_assignment: str = field(
        default="exact",
        metadata={"help": (
            "How k-means assigns rows to centroids: exact (every centroid; right on any data) or ivf "
            "(approximate; faster for large k on well-clustered features only)."
        )},
    )
    similar_cluster_quantile: float | None = field(
        default=None,
        metadata={"help": (
            "Cluster evidence also blocks clusters whose centroid cosine is above this quantile of all "
            "centroid pairs (e.g. 0.99). Default (None): the same cluster only."
        )},
    )
    image_centroid_threshold: float | None = field(default=None, metadata={"help": _FROM_CLUSTER_QUANTILE})
    text_centroid_threshold: float | None = field(default=None, metadata={"help": _FROM_CLUSTER_QUANTILE})
    image_cosine_threshold: float | None = field(
        default=DEFAULT_IMAGE_COSINE_THRESHOLD,
        metadata={"help": (
            "evidence=pair_cosine/any: flag a pair when the frozen image cosine is above this. The default "
            "0.97 (near-duplicate images) never hurt retrieval in benchmarks/quality.py; pair_quantile "
            "replaces the default."
        )},
    )
    text_cosine_threshold: float | None = field(
        default=None,
        metadata={"help": (
            "evidence=pair_cosine/any: also require (pair_cosine) or accept (any) a text cosine above this. "
            "Default (None): text not used."
        )},
    )
    pair_quantile: float | None = field(
        default=None,
        metadata={"help": (
            "Set both cosine thresholds to this quantile of random pair cosines of the data (e.g. 0.999); a "
            "threshold given explicitly is kept."
        )},
    )
    negatives_per_row: int = field(
        default=4,
        metadata={"help": (
            "Explicit mined incorrect texts stored per row (-1 padded). Training uses them only with "
            "--mined_negatives_per_row > 0."
        )},
    )
    sampling: NegativeSampling = field(
        default=NegativeSampling.RANDOM,
        metadata={"help": (
            "How explicit negatives are drawn among allowed rows: random (uniformly) or lowest (from the "
            "least similar image clusters: the easiest)."
        )},
    )
    weight_power: float = field(
        default=1.0,
        metadata={"help": (
            "strategy=cluster_weighted: exponent gamma of the distance weight (0: all ones; 1: the paper)."
        )},
    )
    max_weight: float = field(
        default=10.0, metadata={"help": "strategy=cluster_weighted: upper clip of a negative's weight."}
    )
    image_distance_mean: float | None = field(
        default=None,
        metadata={"help": (
            "Resolved by mining (the data's mean image distance, for the weights of explicit negatives); "
            "leave unset."
        )},
    )
    random_drop_fraction: float | None = field(
        default=None,
        metadata={"help": (
            "strategy=random: share of in-batch pairs dropped. Default (None): the share the cluster rule "
            "masks on this data."
        )},
    )
    seed: int = field(default=0, metadata={"help": "Seed of k-means, negative sampling and the statistics batches."})
    group_column: str | None = field(
        default=None,
        metadata={"help": "The user's group column (e.g. a product id), renamed to 'group'; needed by evidence=group."},
    )
    image_column: str = field(default="image", metadata={"help": "The user's image column (renamed to 'image')."})
    caption_column: str = field(
        default="caption", metadata={"help": "The user's caption column (renamed to 'caption')."}
    )
    store_features: bool = field(
        default=True,
        metadata={"help": (
            "Keep the frozen image/text feature columns in the mined dataset (needed by cluster_weighted and "
            "pair_cosine, and reused to train frozen towers)."
        )},
    )
    cluster_text: bool = field(
        default=True,
        metadata={"help": (
            "When the images are clustered, also cluster the text features (text clusters are shown in the "
            "statistics; evidence=image_and_text_cluster always clusters them)."
        )},
    )
    cluster_images: bool = field(
        default=False,
        metadata={"help": (
            "Run the image k-means even when the rule reads no clusters (e.g. for train_sampler=cluster_spread or "
            "crowded, which group batches by image_cluster). Without it, mining clusters only for cluster evidence, "
            "sampling=lowest or a given n_image_clusters; otherwise image_cluster is 0 for every usable row (-1 "
            "for rows skipped as unreadable)."
        )},
    )
    stats_batch_size: int = field(
        default=256,
        metadata={"help": (
            "Batch size at which the mining statistics estimate in-batch masked and false-negative fractions "
            "(use your training batch size)."
        )},
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

    def needs_image_clusters(self) -> bool:
        """Whether mining runs the image k-means: the rule reads image clusters (cluster evidence, or
        ``sampling="lowest"``), or ``cluster_images`` / ``n_image_clusters`` asks for them.

        Example:
            >>> MiningConfig().needs_image_clusters(), MiningConfig(evidence="image_cluster").needs_image_clusters()
            (False, True)
        """
        return (
            self.cluster_images
            or self.n_image_clusters is not None
            or self.evidence in (DuplicateEvidence.IMAGE_CLUSTER, DuplicateEvidence.IMAGE_AND_TEXT_CLUSTER)
            or self.sampling == NegativeSampling.LOWEST
        )

    def needs_text_clusters(self) -> bool:
        """Whether the rule itself reads text clusters (``evidence="image_and_text_cluster"``)."""
        return self.evidence == DuplicateEvidence.IMAGE_AND_TEXT_CLUSTER

    def clusters_texts(self) -> bool:
        """Whether mining runs the text k-means (given text features): the rule needs text clusters,
        ``n_text_clusters`` asks for them, or ``cluster_text`` is on and the images are clustered."""
        return (
            self.needs_text_clusters()
            or self.n_text_clusters is not None
            or (self.cluster_text and self.needs_image_clusters())
        )


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

