"""The trainer's cached-tower path: what can be cached, and the datasets of cached tower outputs it trains on.

With frozen towers the trainer feeds the projections the towers' cached features (`compute_features`); with
only the last blocks training it feeds each tower's trainable tail the cached input of its first trainable block
(`compute_block_inputs`). Either way the losses and gradients equal running the towers (tests/test_cached_training.py,
tests/test_partial_depth.py).
"""

from __future__ import annotations

import logging
from typing import Any

from ..block_features import BLOCK_INPUT_COLUMNS, IMAGE_BLOCK_INPUTS, TEXT_BLOCK_INPUTS, compute_block_inputs
from ..features import compute_features, feature_provenance, has_feature_columns, stored_provenance
from ..mining import MiningConfig
from ..tower_tails import tail_start
from .arguments import ClipNegTrainingArguments, TowerTraining
from .collator import FEATURE_META_COLUMNS

logger = logging.getLogger(__name__)

#: (vision, text) index of the block whose cached input a tower's tail starts from; None: cached features.
TailStarts = tuple[int | None, int | None] | None


def plan_cached_inputs(
    args: ClipNegTrainingArguments, data_collator: Any, train_dataset: Any, model: Any, processor: Any
) -> tuple[bool, TailStarts]:
    """Whether the trainer can train on cached outputs of the frozen part of the towers, and the (vision, text)
    `tail_starts`: where a tower runs a tail on cached block inputs (the trainable blocks at partial depth; with
    frozen towers and the TTD term, the vision tower's post-block layers, since TTD reads its spatial output);
    None where a tower's cached features are used.

    Raises:
        ValueError: `args.cached_tower_features=True` but caching is not possible (the message says why).
    """
    if args.cached_tower_features is False or args.tower_training is TowerTraining.FULL:
        return False, None
    towers = {"vision": model.vision_model, "text": model.text_model}
    blocks = args.trainable_blocks if args.tower_training is TowerTraining.PARTIAL else 0
    reasons = []
    if data_collator is not None:
        reasons.append("a custom data_collator was given")
    if args.image_augmentation:
        reasons.append("image_augmentation changes the pixels every epoch")
    if blocks > 0:
        starts = {name: tail_start(tower, blocks) for name, tower in towers.items()}
        reasons += [
            f"{type(towers[name]).__name__} cannot be cut before its last {blocks} block(s) (supported: "
            "EfficientNet, ViT, BERT-style towers with more blocks than train)"
            for name, start in starts.items() if start is None
        ]
    elif args.ttd_weight > 0:
        starts = {"vision": tail_start(towers["vision"], 0), "text": None}
        if starts["vision"] is None:
            reasons.append(
                f"the TTD term needs the vision tower's spatial output, and {type(towers['vision']).__name__} "
                "cannot be cut after its blocks (supported: EfficientNet, ViT)"
            )
    else:
        starts = {"vision": None, "text": None}
    if None in starts.values() and train_dataset is not None and has_feature_columns(train_dataset):
        if stored_provenance(train_dataset) != feature_provenance(model, processor):
            reasons.append(
                "the dataset's image_features/text_features were not made by this model's towers and settings "
                "(re-mine with this model to train on cached features)"
            )
    if reasons and args.cached_tower_features:
        raise ValueError("cached_tower_features=True is not possible here: " + "; ".join(reasons) + ".")
    if reasons:
        logger.warning("Running the frozen towers on every step: %s.", "; ".join(reasons))
        return False, None
    if any(start is not None for start in starts.values()):
        return True, (starts["vision"], starts["text"])
    return True, None


def cached_columns(tail_starts: TailStarts) -> list[str]:
    """The columns the cached path feeds the model: tower features and/or block inputs per tower."""
    image_start, text_start = tail_starts or (None, None)
    return [
        "image_features" if image_start is None else IMAGE_BLOCK_INPUTS,
        "text_features" if text_start is None else TEXT_BLOCK_INPUTS,
    ]


def with_cached_inputs(
    dataset: Any, model: Any, processor: Any, tail_starts: TailStarts, config: MiningConfig, device: Any
) -> Any:
    """`dataset` (or each dataset of a dict) with the cached columns the collator feeds the model, its image
    column dropped and those columns formatted as numpy."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {
            name: with_cached_inputs(part, model, processor, tail_starts, config, device) for name, part in dataset.items()
        }
    columns = dict(image_column=config.image_column, caption_column=config.caption_column)
    if tail_starts is None or None in tail_starts:
        dataset = compute_features(dataset, model, processor, device=device, **columns)
    if tail_starts is not None:
        dataset = compute_block_inputs(dataset, model, processor, tail_starts, device=device, **columns)
    cached = [c for c in (*FEATURE_META_COLUMNS, *BLOCK_INPUT_COLUMNS) if c in dataset.column_names]
    # Only cached columns and mining columns reach the collator: no image is decoded again.
    unused = [c for c in (config.image_column,) if c in dataset.column_names]
    return dataset.remove_columns(unused).with_format("numpy", columns=cached, output_all_columns=True)
