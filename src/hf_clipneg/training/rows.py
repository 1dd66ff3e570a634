"""The rows `ClipNegTrainer` trains on: the mining rule they follow, the rows the mining step skipped, and the
metadata columns the collator passes (row indices, dataset-wide group codes)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from ..data import map_cache_file
from ..mining import CONFIG_PREFIX, DuplicateEvidence, MiningConfig, NegativeStrategy, group_codes, rule_conflicts
from .arguments import ClipNegTrainingArguments
from .collator import FEATURE_META_COLUMNS, LIST_META_COLUMNS, ROW_INDEX

logger = logging.getLogger(__name__)

#: Columns ClipNegTrainer adds to its training dataset: each row's position (which copies of one row in a
#: gathered batch share) and the dataset-wide integer code of its group value (any type in the dataset).
ROW_INDEX_COLUMN = "_hf_clipneg_row_index"
GROUP_CODE_COLUMN = "_hf_clipneg_group_code"
STRATEGIES_WITH_MINED_TEXTS = (NegativeStrategy.CLUSTER, NegativeStrategy.CLUSTER_WEIGHTED)


def resolve_mining_config(
    config: MiningConfig | None, train_dataset: Any, args: ClipNegTrainingArguments
) -> MiningConfig:
    """The rule the trainer applies: the one `train_dataset` was mined with (a given `config` must agree with
    it), else `config`, else vanilla; `args.negative_strategy` overrides the strategy.

    Raises:
        ValueError: `config` contradicts the dataset's rule, or a strategy needs a mined dataset.
    """
    if train_dataset is not None and CONFIG_PREFIX in (train_dataset.info.description or ""):
        stored = MiningConfig.from_dataset(train_dataset)
        if config is not None:
            conflicts = rule_conflicts(config, stored)
            if conflicts:
                listed = ", ".join(f"{name}={mine!r} (mined with {theirs!r})" for name, (mine, theirs) in conflicts.items())
                raise ValueError(
                    f"mining_config contradicts the rule train_dataset was mined with: {listed}. The mined "
                    "negatives, clusters and thresholds follow the dataset's rule, so these values cannot take "
                    "effect. Leave out mining_config to train with the dataset's rule, or mine the original "
                    "data again with this config (mine_negatives / `hf-clipneg mine`)."
                )
        config = stored  # the resolved rule (thresholds, cluster counts) the rows were mined with
    if config is None:
        if args.negative_strategy not in (None, NegativeStrategy.VANILLA):
            raise ValueError(
                f"negative_strategy={args.negative_strategy.value!r} needs a mined dataset: run "
                "`hf_clipneg.mine_negatives` (or `hf-clipneg mine`) on the training data first, or pass "
                "`mining_config=`. A dataset loaded from the Hub gets its config with `load_mined_dataset`."
            )
        config = MiningConfig(strategy=NegativeStrategy.VANILLA)
    if args.negative_strategy is not None:
        config = dataclasses.replace(config, strategy=args.negative_strategy)
    return config


def drop_skipped_rows(dataset: Any) -> Any:
    """`dataset` without the rows the mining step skipped (logged)."""
    # Rows the mining step skipped (unreadable images, `on_bad_image="skip"`) carry image_cluster = -1.
    if "image_cluster" not in dataset.column_names:
        return dataset
    clusters = np.asarray(dataset.with_format("numpy")["image_cluster"])
    if (clusters >= 0).all():
        return dataset
    skipped = np.flatnonzero(clusters < 0)
    logger.warning(
        "Training skips %d rows the mining step could not embed (rows %s%s).",
        skipped.size, skipped[:10].tolist(), " ..." if skipped.size > 10 else "",
    )
    return dataset.select(np.flatnonzero(clusters >= 0))


def with_training_metadata(dataset: Any, config: MiningConfig) -> tuple[Any, dict[str, str] | None]:
    """`dataset` with the trainer's metadata columns, and `{batch key: column}` for the collator.

    Every training row gets a unique index (`row_index`: copies of one row in a gathered batch are never each
    other's negatives): the mining step's `row_id` when it holds unique integers, else a column of positions.
    When the rule reads groups, group values of any type (strings, integers, missing values) reach the batch
    as dataset-wide integer codes, computed once so codes agree across batches and processes (an integer
    column, such as the codes the mining step writes, is used as it is). Only mining columns are read as
    mining metadata: a user column that happens to be called `group` or `row_id` is left alone.
    """
    if dataset is None or not hasattr(dataset, "add_column"):
        return dataset, None
    # Mining columns by their own names (the feature columns may only appear later: the cached-tower path).
    meta = {c: c for c in ("image_cluster", "text_cluster", *LIST_META_COLUMNS, *FEATURE_META_COLUMNS)}
    for name in (ROW_INDEX_COLUMN, GROUP_CODE_COLUMN):
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
    added: dict[str, np.ndarray] = {}
    if has_row_ids(dataset):
        meta[ROW_INDEX] = meta["row_id"] = "row_id"
    else:
        added[ROW_INDEX_COLUMN] = np.arange(len(dataset), dtype=np.int64)
        meta[ROW_INDEX] = meta["row_id"] = ROW_INDEX_COLUMN
    source = group_source(dataset, config)
    if source is not None:
        values = dataset.select_columns([source]).with_format("arrow")[source]
        values = values.column(0) if hasattr(values, "column") else values
        mined_codes = source == "group" and CONFIG_PREFIX in (dataset.info.description or "")
        if mined_codes and pa.types.is_integer(values.type):
            meta["group"] = source  # the mining step's codes of the group column (-1: no group)
        else:
            added[GROUP_CODE_COLUMN] = group_codes(values.to_pylist(), len(dataset), column=source)
            meta["group"] = GROUP_CODE_COLUMN
    if added and getattr(dataset, "_indices", None) is not None:
        from datasets.fingerprint import Hasher

        # add_column needs a flat table; never write it beside a read-only input
        fingerprint = Hasher.hash([dataset._fingerprint, "hf_clipneg.flatten_indices"])
        dataset = dataset.flatten_indices(cache_file_name=map_cache_file(dataset, fingerprint), new_fingerprint=fingerprint)
    for name, column in added.items():
        dataset = dataset.add_column(name, column)
    return dataset, meta


def has_row_ids(dataset: Any) -> bool:
    """True when `row_id` holds unique integers (the mining step's row ids), not some column of the user's."""
    if "row_id" not in dataset.column_names:
        return False
    values = dataset.select_columns(["row_id"]).with_format("numpy")["row_id"]
    values = np.asarray(values)
    return values.dtype.kind in "iu" and np.unique(values).size == values.size


def group_source(dataset: Any, config: MiningConfig) -> str | None:
    """The column whose values are the rule's groups (None when the rule reads no groups)."""
    column = config.group_column
    if column is None:
        return None
    if column in dataset.column_names:
        return column
    if "group" in dataset.column_names and CONFIG_PREFIX in (dataset.info.description or ""):
        return "group"  # the codes the mining step wrote (the original column was removed since)
    reads_groups = config.strategy in STRATEGIES_WITH_MINED_TEXTS and config.evidence in (
        DuplicateEvidence.GROUP, DuplicateEvidence.ANY
    )
    if reads_groups:
        raise ValueError(
            f"The rule reads groups from the column {column!r} (evidence={config.evidence.value!r}), which the "
            f"training dataset lacks (columns: {dataset.column_names}). Keep that column in the dataset, or "
            "mine without group_column."
        )
    return None
