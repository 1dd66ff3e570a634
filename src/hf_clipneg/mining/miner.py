"""`NegativeMiner`: fit clusters and thresholds once, then write the mining columns of any batch of rows."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from datasets import Dataset, List, Value
from datasets.fingerprint import Hasher

from ..clustering import default_n_clusters
from ..features import IMAGE_FEATURES, TEXT_FEATURES, has_feature_columns
from .arrays import as_float_matrix, caption_codes, feature_matrix, finite_rows, group_codes, may_overwrite, normalise_rows
from .clusters import fit_clusters, one_cluster
from .config import DuplicateEvidence, MiningConfig
from .selection import NegativeSelector
from .stats import estimate_statistics

logger = logging.getLogger(__name__)

_MINING_VERSION = "1"


class NegativeMiner:
    """Fit the rule's state once (clusters when the rule needs them, thresholds, candidate pools), then add the
    mining columns to any batch of rows (a `datasets` map function).

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
        """Read the feature (and group / caption) columns of `dataset` and fit (see :meth:`fit_arrays`)."""
        if not has_feature_columns(dataset):
            raise KeyError(
                f"fit needs {IMAGE_FEATURES!r} and {TEXT_FEATURES!r} columns: run compute_features(dataset) first "
                "(mine_negatives does it for you)."
            )
        image = feature_matrix(dataset, IMAGE_FEATURES)
        text = feature_matrix(dataset, TEXT_FEATURES)
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
        image = as_float_matrix(image_features, IMAGE_FEATURES)
        n_rows = image.shape[0]
        if n_rows < 2:
            raise ValueError(f"Mining needs at least 2 rows, got {n_rows}.")
        text = None
        if text_features is not None:
            text = as_float_matrix(text_features, TEXT_FEATURES)
            if text.shape[0] != n_rows:
                raise ValueError(f"image_features has {n_rows} rows but text_features has {text.shape[0]}.")
        valid = finite_rows(image)
        if text is not None:
            text_finite = finite_rows(text)
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
        self.image_features = normalise_rows(image, valid, may_overwrite(image, image_features, owned))
        self.text_features = (
            normalise_rows(text, valid, may_overwrite(text, text_features, owned)) if text is not None else None
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
        self.caption_codes = caption_codes(captions, n_rows) if captions is not None else None

        self._fit_clusters(valid_rows)
        rng = np.random.default_rng(config.seed)
        self._resolve_pair_thresholds(valid_rows, rng)
        self.selector = NegativeSelector(
            config, valid, self.image, self.image_features, self.text_features, self.groups
        )
        self.fitted = True
        self.stats = estimate_statistics(self, valid_rows, rng)
        self.stats.seconds = time.perf_counter() - started
        return self

    def _fit_clusters(self, valid_rows: np.ndarray) -> None:
        """k-means on the images (and texts) when the rule or an option asks for clusters; else the
        placeholder single image cluster (k-means is the slow part of mining and would go unused)."""
        config = self.config
        if config.needs_image_clusters():
            k_image = config.n_image_clusters or default_n_clusters(valid_rows.size)
            self.image = fit_clusters(self.image_features, valid_rows, k_image, config, "image")
            config.n_image_clusters = int(k_image)
            config.image_centroid_threshold = self.image.threshold
        else:
            logger.info(
                "Skipping the image k-means: evidence=%s reads no clusters, so image_cluster is 0 for every usable row "
                "(-1 for skipped rows). Set cluster_images=True (or n_image_clusters) for k-means clusters, e.g. "
                "for train_sampler='cluster_spread' or 'crowded', which group batches by image_cluster.",
                config.evidence.value,
            )
            self.image = one_cluster(self.image_features, self.valid)
        self._image_similarity = self.image.similarity
        self.text = None
        if self.text_features is not None and config.clusters_texts():
            k_text = config.n_text_clusters or default_n_clusters(valid_rows.size)
            self.text = fit_clusters(self.text_features, valid_rows, k_text, config, "text")
            config.n_text_clusters = int(k_text)
            config.text_centroid_threshold = self.text.threshold

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

    # ---- batch tensors for the rule ------------------------------------------------------------

    def batch_tensors(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The per-row tensors :func:`pair_weights` reads, for the given row positions."""
        rows = np.asarray(rows, dtype=np.int64)
        batch = {
            "row_id": torch.from_numpy(rows.copy()),
            "image_cluster": torch.from_numpy(self.image.labels[rows].astype(np.int64)),
            "similar_image_clusters": torch.from_numpy(self.image.padded_similar(self.image.labels[rows])),
            IMAGE_FEATURES: torch.from_numpy(self.image_features[rows]),
        }
        if self.text is not None:
            batch["text_cluster"] = torch.from_numpy(self.text.labels[rows].astype(np.int64))
            batch["similar_text_clusters"] = torch.from_numpy(self.text.padded_similar(self.text.labels[rows]))
        if self.text_features is not None:
            batch[TEXT_FEATURES] = torch.from_numpy(self.text_features[rows])
        if self.groups is not None:
            batch["group"] = torch.from_numpy(self.groups[rows])
        return batch

    # ---- selection ---------------------------------------------------------------------------------

    def select_negatives(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Explicit negatives for row positions `rows`: (n, m) int64 indices (-1 padded), (n, m) float32
        weights (0 at padding) and, per row, None or why it got fewer than m."""
        self._check_fitted()
        return self.selector.select(rows)

    # ---- the datasets map function -----------------------------------------------------------------

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, Any]:
        """The mining columns of the rows at positions `indices` (``datasets.map(..., with_indices=True)``)."""
        self._check_fitted()
        rows = np.asarray(indices, dtype=np.int64)
        negatives, weights, _ = self.select_negatives(rows)
        out: dict[str, Any] = {
            "row_id": rows,
            "image_cluster": self.image.labels[rows],
            "similar_image_clusters": self.image.similar_lists(self.image.labels[rows]),
            "negative_indices": negatives,
            "negative_weights": weights,
        }
        if self.text is not None:
            out["text_cluster"] = self.text.labels[rows]
            out["similar_text_clusters"] = self.text.similar_lists(self.text.labels[rows])
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
