"""`mine_negatives`: the datasets step that embeds, clusters and adds the mining columns to a dataset."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, Features
from tqdm.auto import tqdm

from ..data import map_cache_file
from ..features import IMAGE_FEATURES, TEXT_FEATURES, check_captions, compute_features, has_feature_columns
from .arrays import feature_matrix
from .config import CONFIG_PREFIX, MiningConfig, describe_evidence
from .miner import NegativeMiner
from .stats import DEGENERATE_MASKED_FRACTION, MiningStats

logger = logging.getLogger(__name__)


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

    k-means runs only when the rule reads clusters or an option asks for them
    (:meth:`MiningConfig.needs_image_clusters`). Otherwise (the default ``evidence="pair_cosine"``) the
    cluster columns are still written, so that consumers find them: ``image_cluster`` is 0 for every usable
    row and -1 for skipped rows, ``similar_image_clusters`` is ``[0]`` (``[]`` when skipped), and there are no
    text cluster columns.

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
        from ..towers import build_dual_encoder

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
    indices = feature_matrix(mined, "negative_indices") if len(mined) else np.zeros((0, m))
    short = np.flatnonzero((indices >= 0).sum(1) < m)
    reasons: dict[str, int] = {}
    for start in tqdm(range(0, short.size, 10_000), desc="Counting short rows", disable=short.size < 100_000):
        _, _, why = miner.select_negatives(short[start : start + 10_000])
        for reason in why:
            if reason:
                reasons[reason] = reasons.get(reason, 0) + 1
    return int(short.size), reasons
