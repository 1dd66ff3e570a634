"""End-to-end steps shared by the CLI and the example scripts: argument dataclasses, loading the model
and the data, mining when needed, and training with `ClipNegTrainer`."""

from __future__ import annotations

import dataclasses
import logging
import os
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
    train_split: str = field(default="train", metadata={"help": "Split of train_data to train on."})
    eval_split: str = field(default="validation", metadata={"help": "Split of eval_data (or of train_data) to evaluate on."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use at most this many training rows (None: all)."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Use at most this many evaluation rows (None: all)."})
    synthetic_rows: int = field(default=1200, metadata={"help": "Training rows of the synthetic data."})
    synthetic_eval_rows: int = field(default=300, metadata={"help": "Evaluation rows of the synthetic data."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of the data."})
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
    group = "group" if config.group_column else None
    return dataclasses.replace(config, image_column="image", caption_column="caption", group_column=group)


@dataclass
class ModelArguments:
    """Which dual encoder to train: a saved one, or one built from two towers (packaged by default)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved VisionTextDualEncoderModel (e.g. one trained by hf_clipneg)."}
    )
    vision_model: str | None = field(default=None, metadata={"help": "Vision tower (default: packaged EfficientNet-Lite0)."})
    text_model: str | None = field(default=None, metadata={"help": "Text tower (default: packaged MiniLM-L6)."})
    projection_dim: int = field(default=256, metadata={"help": "Size of the joint embedding (new projections only)."})
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Side in pixels the vision tower sees (the processor's resize, saved with the model). Default: the "
            "tower's own (224 for the packaged EfficientNet-Lite0). Smaller is faster on CPU: the synthetic images are "
            "64 px, so 96 loses nothing there."
        },
    )
    text_pooling: str = field(
        default="auto",
        metadata={
            "help": "How the text tower's tokens become one vector: mean (masked mean, how sentence-transformers "
            "models such as the packaged MiniLM were trained), pooler (the tower's pooled output, e.g. CLIP text "
            "models), or auto (the tower's sentence-transformers pooling config, else mean; CLIP/SigLIP: pooler).",
            "choices": ["auto", "mean", "pooler"],
        },
    )
    tiny_random_towers: bool = field(
        default=False, metadata={"help": "Tiny random ViT+BERT towers: a seconds-long smoke run, meaningless results."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the Hub repository; only for repositories you trust."}
    )


def load_model(model_args: ModelArguments) -> tuple[Any, Any]:
    """Return `(model, processor)` as `model_args` says.

    Example:
        >>> model, processor = load_model(ModelArguments(tiny_random_towers=True))
        >>> type(model).__name__
        'ClipNegDualEncoderModel'
    """
    if model_args.tiny_random_towers:
        from .testing import build_tiny_dual_encoder

        if model_args.image_size is not None:
            logger.warning("--image_size is ignored with --tiny_random_towers (their ViT has a fixed input size).")
        return build_tiny_dual_encoder()
    if model_args.model_name_or_path:
        from transformers import VisionTextDualEncoderProcessor

        from .modeling import ClipNegDualEncoderModel

        kwargs = {"trust_remote_code": model_args.trust_remote_code}
        model, processor = (
            ClipNegDualEncoderModel.from_pretrained(model_args.model_name_or_path, **kwargs),
            VisionTextDualEncoderProcessor.from_pretrained(model_args.model_name_or_path, **kwargs),
        )
    else:
        from .towers import build_dual_encoder

        model, processor = build_dual_encoder(
            vision=model_args.vision_model,
            text=model_args.text_model,
            projection_dim=model_args.projection_dim,
            trust_remote_code=model_args.trust_remote_code,
            text_pooling=model_args.text_pooling,
        )
    if model_args.image_size is not None:
        set_image_size(processor, model_args.image_size)
    return model, processor


def set_image_size(processor: Any, image_size: int) -> None:
    """Make the processor resize images to `image_size` x `image_size` (and crop to it, when it crops)."""
    if image_size < 8:
        raise ValueError(f"--image_size must be at least 8 pixels, got {image_size}.")
    image_processor = processor.image_processor
    image_processor.size = {"height": image_size, "width": image_size}
    if getattr(image_processor, "crop_size", None) is not None:
        image_processor.crop_size = {"height": image_size, "width": image_size}
    logger.info("Images are resized to %d x %d pixels for the vision tower.", image_size, image_size)


def load_data(
    data_args: DataArguments, columns: ColumnArguments | Any | None = None, seed: int = 0, load_eval: bool = True
) -> tuple[Dataset, Dataset | None]:
    """Return `(train, eval)` datasets with canonical `image`/`caption` (and `group`) columns.

    `columns` names the user's columns (a `ColumnArguments`, or a `MiningConfig`, which has the same fields).
    The evaluation rows are `eval_data` (its `eval_split`) when given. Otherwise they are the `eval_split` of
    `train_data` when that split exists; when it does not (or `train_data` is a file or a single saved dataset,
    which has no splits), `eval` is None and a warning says that training runs without evaluation: the
    training rows are never used as evaluation rows. `load_eval=False` skips the evaluation rows.
    """
    from .data import SplitNotFoundError

    columns = columns if columns is not None else ColumnArguments()
    if data_args.train_data == SYNTHETIC:
        from .data import make_synthetic_splits

        splits = make_synthetic_splits(data_args.synthetic_rows, data_args.synthetic_eval_rows, seed=seed)
        return splits["train"], splits["validation"] if load_eval else None
    from .data import load_pairs

    train = load_pairs(data_args.train_data, split=data_args.train_split, max_rows=data_args.max_train_rows,
                       **_load_options(data_args, columns))
    if not load_eval:
        return train, None
    if data_args.eval_data is not None:
        return train, load_eval_data(data_args, columns, seed)
    try:
        evaluation = load_eval_data(data_args, columns, seed)
    except SplitNotFoundError as err:
        logger.warning(
            "No evaluation data: %s Training without evaluation, so no evaluation metrics are reported (pass "
            "--eval_data, or a dataset with a %r split, to evaluate).", err, data_args.eval_split,
        )
        evaluation = None
    return train, evaluation


def load_eval_data(data_args: DataArguments, columns: ColumnArguments | Any | None = None, seed: int = 0) -> Dataset:
    """The evaluation rows: `eval_data` (its `eval_split`), else the `eval_split` of `train_data`.

    A missing split raises `hf_clipneg.data.SplitNotFoundError` naming the split and the ones that exist;
    a `train_data` without splits (a file, a single saved dataset) is never evaluated on as a stand-in.
    """
    columns = columns if columns is not None else ColumnArguments()
    if data_args.eval_data is None and data_args.train_data == SYNTHETIC:
        from .data import make_synthetic_splits

        return make_synthetic_splits(data_args.synthetic_rows, data_args.synthetic_eval_rows, seed=seed)["validation"]
    from .data import load_pairs

    source = data_args.eval_data if data_args.eval_data is not None else data_args.train_data
    return load_pairs(
        source,
        split=data_args.eval_split,
        max_rows=data_args.max_eval_rows,
        split_required=data_args.eval_data is None,
        **_load_options(data_args, columns),
    )


def _load_options(data_args: DataArguments, columns: Any) -> dict[str, Any]:
    return dict(
        image_column=columns.image_column,
        caption_column=columns.caption_column,
        group_column=columns.group_column,
        revision=data_args.revision,
    )


def read_mining_config(path: str) -> tuple[Any, set[str]]:
    """`(config, keys)`: the `MiningConfig` of a JSON file and the fields it sets. Every value is
    type-checked and unknown keys are refused; errors name the key and the file."""
    import json

    from ._config import ConfigTypeError, check_config_types
    from .mining import MiningConfig

    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"The mining config file {path!r} does not exist.") from None
    except ValueError as err:
        raise ConfigTypeError(f"The mining config file {path!r} is not valid JSON: {err}.") from err
    if not isinstance(values, dict):
        raise ConfigTypeError(f"The mining config file {path!r} must hold a JSON object of MiningConfig fields.")
    known = {f.name for f in dataclasses.fields(MiningConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigTypeError(
            f"The mining config file {path!r} has unknown keys {unknown}; MiningConfig fields are {sorted(known)}."
        )
    check_config_types([MiningConfig], values, source=f"The mining config file {path!r}")
    return MiningConfig.from_dict(values), set(values)


def is_mined(dataset: Dataset) -> bool:
    """Whether `dataset` already carries the columns the mining step writes."""
    return "image_cluster" in dataset.column_names and "row_id" in dataset.column_names


def _with_sampler_clusters(mining_config: Any, training_args: Any) -> Any:
    """`mining_config`, asking for image k-means when the training sampler groups batches by ``image_cluster``
    and the rule itself needs no clusters (mining would then write one placeholder cluster)."""
    sampler = getattr(training_args, "train_sampler", "random")
    if sampler == "random" or getattr(training_args, "sampler_group_column", None) != "image_cluster":
        return mining_config
    if mining_config.needs_image_clusters():
        return mining_config
    logger.info("train_sampler=%r groups batches by image_cluster: mining runs the image k-means for it.", sampler)
    return dataclasses.replace(mining_config, cluster_images=True)


def train(
    data_args: DataArguments,
    model_args: ModelArguments,
    training_args: Any,
    mining_config: Any = None,
    columns: ColumnArguments | None = None,
) -> tuple[Any, dict[str, float]]:
    """Load, mine (unless the data is mined already or the strategy is vanilla), train, evaluate and save.

    The mining rule is `mining_config`, else the JSON file `data_args.mining_config`, else the default.
    On data that is mined already, a rule that contradicts the one the data was mined with raises before
    any work starts (it could not take effect). `columns` names the user's columns (default: those of the
    mining config). Returns the trainer and the final evaluation metrics (empty, with a warning, without
    evaluation data). The final model is written to a temporary folder first and moved into `output_dir`
    only once complete, so a failed save leaves an earlier model there loadable.
    """
    import shutil

    from transformers import set_seed

    from ._atomic import check_output_path, replace_files_into
    from .data import check_images
    from .mining import CONFIG_PREFIX, MiningConfig, NegativeStrategy, mine_negatives, rule_conflicts
    from .training import ClipNegTrainer
    from .training.checkpoints import checkpoint_problem

    if training_args.output_dir is not None:
        check_output_path(training_args.output_dir, [data_args.train_data, data_args.eval_data], "output_dir",
                          inputs_may_lie_inside=True)
    explicit_keys: set[str] | None = None  # the rule fields the user set
    rule_source = "mining_config"
    if mining_config is None:
        if data_args.mining_config:
            mining_config, explicit_keys = read_mining_config(data_args.mining_config)
            rule_source = f"--mining_config {data_args.mining_config}"
        else:
            mining_config = MiningConfig(seed=training_args.seed)
    else:
        default = MiningConfig()
        explicit_keys = {f.name for f in dataclasses.fields(MiningConfig)
                         if getattr(mining_config, f.name) != getattr(default, f.name)}
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() not in ("true", "false"):
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"resume_from_checkpoint: {resume!r} is not a checkpoint folder.")
        problem = checkpoint_problem(resume)
        if problem is not None:
            raise ValueError(
                f"Cannot resume from {resume}: {problem}. Pass an earlier, complete checkpoint, or "
                "resume_from_checkpoint=True to take the newest complete one."
            )

    train_set, eval_set = load_data(data_args, columns or mining_config, seed=training_args.seed)
    eval_strategy = getattr(training_args, "eval_strategy", "no")
    if eval_set is None and getattr(eval_strategy, "value", eval_strategy) != "no":
        raise ValueError(
            f"eval_strategy={training_args.eval_strategy!r} needs evaluation data, and there is none (see the warning "
            "above). Pass --eval_data, or set --eval_strategy no."
        )
    mined_with_rule = is_mined(train_set) and CONFIG_PREFIX in (train_set.info.description or "")
    if mined_with_rule and explicit_keys is not None:
        conflicts = rule_conflicts(mining_config, MiningConfig.from_dataset(train_set), explicit_keys)
        if conflicts:
            listed = ", ".join(f"{name}={mine!r} (mined with {theirs!r})" for name, (mine, theirs) in conflicts.items())
            raise ValueError(
                f"The training data {data_args.train_data!r} is already mined, and {rule_source} contradicts the "
                f"rule it was mined with: {listed}. Those values cannot take effect on mined data. Leave out the "
                "mining config to train with the dataset's rule, or mine the original (unmined) data with it "
                "(`hf-clipneg mine ...`) and train on the result."
            )

    set_seed(training_args.seed)  # new projection heads are initialised here, before the Trainer seeds
    model, processor = load_model(model_args)
    mining_config = canonical_columns(mining_config)
    strategy = training_args.negative_strategy or mining_config.strategy
    if not is_mined(train_set) and strategy is not NegativeStrategy.VANILLA:
        mining_config = _with_sampler_clusters(mining_config, training_args)
        train_set, _ = mine_negatives(  # mine_negatives logs the statistics once
            train_set, mining_config, model=model, processor=processor,
            batch_size=training_args.per_device_eval_batch_size, on_bad_image=data_args.on_bad_image,
        )
    elif data_args.on_bad_image == "skip":
        train_set, skipped = check_images(train_set, on_bad_image="skip")
        if skipped:
            logger.warning("Skipped %d training rows with unreadable images: %s", len(skipped), skipped[:20])
    carries_rule = CONFIG_PREFIX in (train_set.info.description or "")
    trainer = ClipNegTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=processor,
        # The dataset's own rule when it carries one; the given rule for unmined data or when the user set one.
        mining_config=None if carries_rule or (is_mined(train_set) and explicit_keys is None) else mining_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if eval_set is not None:
        metrics = trainer.evaluate()
    else:
        logger.warning("No evaluation data: no evaluation metrics are reported.")
        metrics = {}
    # Written beside the result first: a failure (e.g. a full disk) leaves an earlier model in output_dir intact.
    output_dir = trainer.args.output_dir
    staging = os.path.join(output_dir, ".hf_clipneg-final-model-tmp")
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        trainer.save_model(staging, _internal_call=True)
        if trainer.args.should_save:
            processor.save_pretrained(staging)
            replace_files_into(staging, output_dir)
    finally:
        if trainer.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="Model save", revision=training_args.hub_revision)
    return trainer, metrics
