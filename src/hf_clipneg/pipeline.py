"""End-to-end steps shared by the CLI and the example scripts: argument dataclasses, loading the model
and the data, mining when needed, and training with `ClipNegTrainer`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"


@dataclass
class DataArguments:
    """Where the image-text pairs come from.

    `train_data`/`eval_data` accept a Hub id, a local parquet/csv/json file, a `save_to_disk` folder, an
    imagefolder, or `synthetic` (the embedded procedural demo data).
    """

    train_data: str = field(default=SYNTHETIC, metadata={"help": "Training pairs (Hub id, file, folder or 'synthetic')."})
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation pairs (default: train_data's eval_split)."})
    train_split: str = field(default="train")
    eval_split: str = field(default="validation")
    max_train_rows: int | None = field(default=None)
    max_eval_rows: int | None = field(default=None)
    synthetic_rows: int = field(default=1200, metadata={"help": "Training rows of the synthetic data."})
    synthetic_eval_rows: int = field(default=300)
    revision: str | None = field(default=None)
    on_bad_image: str = field(
        default="error",
        metadata={"help": "error: stop at an unreadable image, naming its row; skip: count, report and leave it out.",
                  "choices": ["error", "skip"]},
    )
    mining_config: str | None = field(
        default=None,
        metadata={"help": "JSON file of MiningConfig fields used when the training data is not mined yet."},
    )


@dataclass
class ColumnArguments:
    """The user's column names; loading renames them to `image`, `caption` (and `group`). Commands that
    mine take these from `MiningConfig`, which has the same three fields."""

    image_column: str = field(default="image", metadata={"help": "The user's image column (renamed to 'image')."})
    caption_column: str = field(default="caption", metadata={"help": "The user's caption column (renamed to 'caption')."})
    group_column: str | None = field(default=None, metadata={"help": "Optional group column, e.g. a product id."})


def canonical_columns(config: Any) -> Any:
    """`config` (a MiningConfig) with its column names set to the canonical ones `load_data` produces."""
    import dataclasses

    group = "group" if config.group_column else None
    return dataclasses.replace(config, image_column="image", caption_column="caption", group_column=group)


@dataclass
class ModelArguments:
    """Which dual encoder to train: a saved one, or one built from two towers (packaged by default)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved VisionTextDualEncoderModel."})
    vision_model: str | None = field(default=None, metadata={"help": "Vision tower (default: packaged EfficientNet-Lite0)."})
    text_model: str | None = field(default=None, metadata={"help": "Text tower (default: packaged MiniLM-L6)."})
    projection_dim: int = field(default=256)
    tiny_random_towers: bool = field(
        default=False, metadata={"help": "Tiny random ViT+BERT towers: a seconds-long smoke run, meaningless results."}
    )
    trust_remote_code: bool = field(default=False)


def load_model(model_args: ModelArguments) -> tuple[Any, Any]:
    """Return `(model, processor)` as `model_args` says.

    Example:
        >>> model, processor = load_model(ModelArguments(tiny_random_towers=True))
        >>> type(model).__name__
        'VisionTextDualEncoderModel'
    """
    if model_args.tiny_random_towers:
        from .testing import build_tiny_dual_encoder

        return build_tiny_dual_encoder()
    if model_args.model_name_or_path:
        from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

        kwargs = {"trust_remote_code": model_args.trust_remote_code}
        return (
            VisionTextDualEncoderModel.from_pretrained(model_args.model_name_or_path, **kwargs),
            VisionTextDualEncoderProcessor.from_pretrained(model_args.model_name_or_path, **kwargs),
        )
    from .towers import build_dual_encoder

    return build_dual_encoder(
        vision=model_args.vision_model,
        text=model_args.text_model,
        projection_dim=model_args.projection_dim,
        trust_remote_code=model_args.trust_remote_code,
    )


def load_data(
    data_args: DataArguments, columns: ColumnArguments | Any | None = None, seed: int = 0
) -> tuple[Dataset, Dataset | None]:
    """Return `(train, eval)` datasets with canonical `image`/`caption` (and `group`) columns.

    `columns` names the user's columns (a `ColumnArguments`, or a `MiningConfig`, which has the same fields).
    """
    columns = columns if columns is not None else ColumnArguments()
    if data_args.train_data == SYNTHETIC:
        from .synthetic import make_synthetic_splits

        splits = make_synthetic_splits(data_args.synthetic_rows, data_args.synthetic_eval_rows, seed=seed)
        return splits["train"], splits["validation"]
    from .data import load_pairs

    common = dict(
        image_column=columns.image_column,
        caption_column=columns.caption_column,
        group_column=columns.group_column,
        revision=data_args.revision,
    )
    train = load_pairs(data_args.train_data, split=data_args.train_split, max_rows=data_args.max_train_rows, **common)
    eval_source = data_args.eval_data or data_args.train_data
    try:
        evaluation = load_pairs(eval_source, split=data_args.eval_split, max_rows=data_args.max_eval_rows, **common)
    except (ValueError, KeyError, FileNotFoundError) as err:
        if data_args.eval_data is not None:
            raise
        logger.warning("No evaluation split %r in %s (%s): training without evaluation.", data_args.eval_split, eval_source, err)
        evaluation = None
    return train, evaluation


def is_mined(dataset: Dataset) -> bool:
    """Whether `dataset` already carries the columns the mining step writes."""
    return "image_cluster" in dataset.column_names and "row_id" in dataset.column_names


def train(
    data_args: DataArguments,
    model_args: ModelArguments,
    training_args: Any,
    mining_config: Any = None,
    columns: ColumnArguments | None = None,
) -> tuple[Any, dict[str, float]]:
    """Load, mine (unless the data is mined already or the strategy is vanilla), train, evaluate and save.

    The mining rule is `mining_config`, else the JSON file `data_args.mining_config`, else the default.
    `columns` names the user's columns (default: those of the mining config).
    Returns the trainer and the final evaluation metrics (empty without an eval split).
    """
    from transformers import set_seed

    from .data import check_images
    from .mining import MiningConfig, NegativeStrategy, mine_negatives
    from .trainer import ClipNegTrainer

    if mining_config is None:
        if data_args.mining_config:
            with open(data_args.mining_config, encoding="utf-8") as f:
                mining_config = MiningConfig.from_json(f.read())
        else:
            mining_config = MiningConfig(seed=training_args.seed)

    set_seed(training_args.seed)  # new projection heads are initialised here, before the Trainer seeds
    model, processor = load_model(model_args)
    train_set, eval_set = load_data(data_args, columns or mining_config, seed=training_args.seed)
    mining_config = canonical_columns(mining_config)
    strategy = training_args.negative_strategy or mining_config.strategy
    if not is_mined(train_set) and strategy is not NegativeStrategy.VANILLA:
        train_set, stats = mine_negatives(
            train_set, mining_config, model=model, processor=processor,
            batch_size=training_args.per_device_eval_batch_size, on_bad_image=data_args.on_bad_image,
        )
        logger.info("Mining statistics:\n%s", stats.to_markdown())
    elif data_args.on_bad_image == "skip":
        train_set, skipped = check_images(train_set, on_bad_image="skip")
        if skipped:
            logger.warning("Skipped %d training rows with unreadable images: %s", len(skipped), skipped[:20])
    trainer = ClipNegTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=processor,
        mining_config=mining_config if not is_mined(train_set) else None,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate() if eval_set is not None else {}
    trainer.save_model()
    processor.save_pretrained(training_args.output_dir)
    return trainer, metrics
