"""`ClipNegTrainer`: a `transformers.Trainer` that trains a `VisionTextDualEncoderModel` with the weighted
contrastive loss, builds in-batch weights from the mined dataset, and evaluates retrieval."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, SequentialSampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import speed_metrics

from .block_features import BLOCK_INPUT_COLUMNS, IMAGE_BLOCK_INPUTS, TEXT_BLOCK_INPUTS, compute_block_inputs
from .data import map_cache_file, without_image_decoding
from .collator import (
    FEATURE_META_COLUMNS,
    LIST_META_COLUMNS,
    META_COLUMNS,
    ROW_INDEX,
    ClipNegCollator,
    captions_by_row_id,
    text_features_by_row_id,
)
from .encoding import DEFAULT_TEXT_MAX_LENGTH, as_clipneg_model, text_max_length
from .features import compute_features, feature_provenance, has_feature_columns, stored_provenance
from .losses import WeightedContrastiveLoss, gather_metadata
from .losses.tag_distillation import TagSelfDistillationLoss, ttd_loss_term
from .metrics import groups_from_captions, retrieval_metrics
from .mining import (
    CONFIG_PREFIX,
    DEGENERATE_MASKED_FRACTION,
    DuplicateAction,
    DuplicateEvidence,
    MiningConfig,
    NegativeStrategy,
    describe_evidence,
    group_codes,
    pair_weights,
)
from .samplers import ClusterSpreadSampler, CrowdedBatchSampler
from .setup_checks import check_training_setup
from .tower_tails import block_list, tail_start
from .training_args import ClipNegTrainingArguments, TowerTraining

logger = logging.getLogger(__name__)

TAG_BATCH_KEYS = ("tag_input_ids", "tag_attention_mask", "tag_mask")
#: Columns ClipNegTrainer adds to its training dataset: each row's position (which copies of one row in a
#: gathered batch share) and the dataset-wide integer code of its group value (any type in the dataset).
ROW_INDEX_COLUMN = "_hf_clipneg_row_index"
GROUP_CODE_COLUMN = "_hf_clipneg_group_code"
_STRATEGIES_WITH_MINED_TEXTS = (NegativeStrategy.CLUSTER, NegativeStrategy.CLUSTER_WEIGHTED)


def set_tower_training(model: nn.Module, mode: TowerTraining | str, trainable_blocks: int = 1) -> list[nn.Module]:
    """Freeze tower weights of a dual encoder as `mode` says and return the fully frozen modules.

    Projections and the logit scale always train. `partial` trains the last `trainable_blocks` blocks of
    each tower and every parameter registered after them (final norm, pooler, head convolution). Frozen
    modules are returned so the trainer can keep them in eval mode (batch-norm statistics and dropout of
    a frozen tower must not change during training).

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, _ = build_tiny_dual_encoder()
        >>> frozen = set_tower_training(model, "partial", trainable_blocks=1)
        >>> model.text_model.encoder.layer[-1].output.dense.weight.requires_grad
        True
        >>> model.text_model.encoder.layer[0].output.dense.weight.requires_grad
        False
    """
    mode = TowerTraining(mode)
    frozen: list[nn.Module] = []
    for tower in (model.vision_model, model.text_model):
        if mode is TowerTraining.FULL:
            tower.requires_grad_(True)
            continue
        tower.requires_grad_(False)
        if mode is TowerTraining.FROZEN or trainable_blocks == 0:
            frozen.append(tower)
            continue
        blocks = block_list(tower)
        if blocks is None:
            raise ValueError(f"Cannot find the blocks of {type(tower).__name__} to train partially; use 'full'.")
        kept = list(blocks)[-trainable_blocks:]
        for block in kept:
            block.requires_grad_(True)
        last_block_params = {id(p) for p in blocks[-1].parameters()}
        after_blocks = False
        for param in tower.parameters():
            if after_blocks and id(param) not in last_block_params:
                param.requires_grad_(True)
            after_blocks = after_blocks or id(param) in last_block_params
        frozen.extend(list(blocks)[: len(blocks) - len(kept)])
        frozen.extend(m for m in tower.children() if m is not blocks and not any(p.requires_grad for p in m.parameters()))
    return frozen


class LogitScaleCap(TrainerCallback):
    """Clamp the model's `logit_scale` parameter to log(max_logit_scale) after every optimiser step
    (CLIP and open_clip cap the scale at 100)."""

    def __init__(self, max_logit_scale: float) -> None:
        self.max_log_scale = math.log(max_logit_scale)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        scale = getattr(model, "logit_scale", None)
        if isinstance(scale, torch.Tensor):
            with torch.no_grad():
                scale.clamp_(max=self.max_log_scale)


class ClipNegTrainer(Trainer):
    """Train a `VisionTextDualEncoderModel` on a mined dataset with `WeightedContrastiveLoss`.

    The in-batch negative weights come from `hf_clipneg.mining.pair_weights` (the one implementation of
    the mining rule) applied to the mining columns of the (global) batch. Evaluation embeds the eval split
    and reports text->image and image->text R@K and median rank (`eval_t2i_R@1`, ...), usable with
    `metric_for_best_model="t2i_R@1"`.

    Losses: `loss` (default `WeightedContrastiveLoss()`) is the contrastive term; with `args.ttd_weight > 0`,
    `ttd_weight * ttd_loss` is added (default `TagSelfDistillationLoss(args.ttd_temperature, args.ttd_margin)`;
    pass your own, e.g. with `detach_image=True`).

    Gradient accumulation: the loss of each micro-batch is the contrastive loss within that micro-batch,
    and `loss_is_scaled_for_ga = False` lets the Trainer divide it by the accumulation steps, so GA=2 with
    batch B gives the mean of two B-batch losses (not one 2B contrastive batch: negatives never cross
    micro-batches).

    Example:
        >>> from datasets import Dataset
        >>> from PIL import Image
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> rows = Dataset.from_dict({"image": [Image.new("RGB", (8, 8), c) for c in ("red", "blue")],
        ...                           "caption": ["a red square", "a blue square"]})
        >>> args = ClipNegTrainingArguments(output_dir="/tmp/clipneg_doc", max_steps=1, per_device_train_batch_size=2,
        ...                                 negative_strategy="vanilla", report_to="none", use_cpu=True)
        >>> trainer = ClipNegTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows, processing_class=processor)
        >>> "eval_t2i_R@1" in trainer.evaluate()
        True
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module,
        args: ClipNegTrainingArguments,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        mining_config: MiningConfig | None = None,
        loss: WeightedContrastiveLoss | None = None,
        data_collator: Any = None,
        ttd_loss: TagSelfDistillationLoss | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, ClipNegTrainingArguments):
            raise TypeError("ClipNegTrainer needs ClipNegTrainingArguments (a TrainingArguments subclass).")
        if processing_class is None:
            raise ValueError("Pass the VisionTextDualEncoderProcessor as `processing_class`.")
        check_training_setup(args)
        self.mining_config = self._resolve_mining_config(mining_config, train_dataset, args)
        model = as_clipneg_model(model)
        if args.max_text_length is not None:
            model.config.text_max_length = args.max_text_length
        elif not getattr(model.config, "text_max_length", None):
            model.config.text_max_length = DEFAULT_TEXT_MAX_LENGTH
        image_column = self.mining_config.image_column
        if train_dataset is not None:
            train_dataset = self._drop_skipped_rows(without_image_decoding(train_dataset, image_column))
        train_dataset, meta_columns = self._with_training_metadata(train_dataset)
        collator_given = data_collator is not None
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: without_image_decoding(part, image_column) for name, part in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = without_image_decoding(eval_dataset, image_column)
        strategy = self.mining_config.strategy
        mined_per_row = 0 if strategy not in _STRATEGIES_WITH_MINED_TEXTS else args.mined_negatives_per_row
        if args.tower_training is not TowerTraining.FULL and args.cached_tower_features is not False:
            model.to(args.device)  # the features' provenance includes the precision chosen for this device
        #: (vision, text) index of the first trainable block whose cached input the partial-depth path trains on
        self.tail_starts: tuple[int, int] | None = None
        self.cached_tower_features = self._use_cached_features(args, data_collator, train_dataset, model, processing_class)
        mined_texts = (
            train_dataset is not None and mined_per_row != 0 and "negative_indices" in train_dataset.column_names
        )
        if self.cached_tower_features:
            with args.main_process_first(desc="embedding the training and evaluation rows"):
                train_dataset, eval_dataset = (
                    self._with_tower_features(part, model, processing_class, args) for part in (train_dataset, eval_dataset)
                )
            cached_texts = "text_features" if self.tail_starts is None or self.tail_starts[1] is None else TEXT_BLOCK_INPUTS
            data_collator = ClipNegCollator(
                processing_class,
                caption_column=self.mining_config.caption_column,
                max_length=text_max_length(model, processing_class.tokenizer),
                mined_negatives_per_row=mined_per_row,
                cached_features=True,
                mined_text_features=text_features_by_row_id(train_dataset, cached_texts) if mined_texts else None,
                tail_starts=self.tail_starts,
                ttd_max_tags=args.ttd_max_tags if args.ttd_weight > 0 else 0,
                tags_column=args.ttd_tags_column,
            )
        elif data_collator is None:
            data_collator = ClipNegCollator(
                processing_class,
                captions=captions_by_row_id(train_dataset, self.mining_config.caption_column) if mined_texts else None,
                image_column=self.mining_config.image_column,
                caption_column=self.mining_config.caption_column,
                max_length=text_max_length(model, processing_class.tokenizer),
                mined_negatives_per_row=mined_per_row,
                augment=args.image_augmentation,
                seed=args.seed,
                ttd_max_tags=args.ttd_max_tags if args.ttd_weight > 0 else 0,
                tags_column=args.ttd_tags_column,
            )
        eval_meta = None
        if not collator_given and isinstance(data_collator, ClipNegCollator):
            data_collator = dataclasses.replace(data_collator, meta_columns=meta_columns)
            eval_meta = {c: c for c in FEATURE_META_COLUMNS}  # evaluation reads no mining metadata
        self.eval_collator = (
            dataclasses.replace(data_collator, mined_negatives_per_row=0, augment=False, ttd_max_tags=0,
                                **({"meta_columns": eval_meta} if eval_meta is not None else {}))
            if isinstance(data_collator, ClipNegCollator)
            else data_collator
        )
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        self.loss_fn = loss if loss is not None else WeightedContrastiveLoss(
            gather_across_processes=args.gather_across_processes
        )
        self.ttd_loss = ttd_loss if ttd_loss is not None else TagSelfDistillationLoss(
            temperature=args.ttd_temperature, margin=args.ttd_margin
        )
        self._frozen_modules = set_tower_training(self.model, args.tower_training, args.trainable_blocks)
        self.add_callback(LogitScaleCap(args.max_logit_scale))
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info(
            "Negative strategy %s, towers %s%s: %d trainable parameters.", strategy.value, args.tower_training.value,
            " (training on cached tower features)" if self.cached_tower_features else "", trainable,
        )

    def _use_cached_features(
        self, args: ClipNegTrainingArguments, data_collator: Any, train_dataset: Any, model: Any, processor: Any
    ) -> bool:
        """Whether to train on cached outputs of the frozen part of the towers. Sets `tail_starts` where a tower
        runs a tail on cached block inputs: the trainable blocks at partial depth, and with frozen towers and the
        TTD term the vision tower's post-block layers (TTD reads its spatial output)."""
        if args.cached_tower_features is False or args.tower_training is TowerTraining.FULL:
            return False
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
            return False
        if any(start is not None for start in starts.values()):
            self.tail_starts = (starts["vision"], starts["text"])
        return True

    def _cached_columns(self) -> list[str]:
        """The columns the cached path feeds the model: tower features and/or block inputs per tower."""
        image_start, text_start = self.tail_starts or (None, None)
        return [
            "image_features" if image_start is None else IMAGE_BLOCK_INPUTS,
            "text_features" if text_start is None else TEXT_BLOCK_INPUTS,
        ]

    def _with_tower_features(self, dataset: Any, model: Any, processor: Any, args: ClipNegTrainingArguments) -> Any:
        if dataset is None:
            return None
        if isinstance(dataset, dict):
            return {name: self._with_tower_features(part, model, processor, args) for name, part in dataset.items()}
        columns = dict(image_column=self.mining_config.image_column, caption_column=self.mining_config.caption_column)
        if self.tail_starts is None or None in self.tail_starts:
            dataset = compute_features(dataset, model, processor, device=args.device, **columns)
        if self.tail_starts is not None:
            dataset = compute_block_inputs(dataset, model, processor, self.tail_starts, device=args.device, **columns)
        cached = [c for c in (*FEATURE_META_COLUMNS, *BLOCK_INPUT_COLUMNS) if c in dataset.column_names]
        # Only cached columns and mining columns reach the collator: no image is decoded again.
        unused = [c for c in (self.mining_config.image_column,) if c in dataset.column_names]
        return dataset.remove_columns(unused).with_format("numpy", columns=cached, output_all_columns=True)

    @staticmethod
    def _resolve_mining_config(
        config: MiningConfig | None, train_dataset: Any, args: ClipNegTrainingArguments
    ) -> MiningConfig:
        if train_dataset is not None and CONFIG_PREFIX in (train_dataset.info.description or ""):
            stored = MiningConfig.from_dataset(train_dataset)
            if config is not None:
                from .mining import rule_conflicts

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

    @staticmethod
    def _drop_skipped_rows(dataset: Any) -> Any:
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

    def _with_training_metadata(self, dataset: Any) -> tuple[Any, dict[str, str] | None]:
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
        if self._has_row_ids(dataset):
            meta[ROW_INDEX] = meta["row_id"] = "row_id"
        else:
            added[ROW_INDEX_COLUMN] = np.arange(len(dataset), dtype=np.int64)
            meta[ROW_INDEX] = meta["row_id"] = ROW_INDEX_COLUMN
        source = self._group_source(dataset)
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

    @staticmethod
    def _has_row_ids(dataset: Any) -> bool:
        """True when `row_id` holds unique integers (the mining step's row ids), not some column of the user's."""
        if "row_id" not in dataset.column_names:
            return False
        values = dataset.select_columns(["row_id"]).with_format("numpy")["row_id"]
        values = np.asarray(values)
        return values.dtype.kind in "iu" and np.unique(values).size == values.size

    def _group_source(self, dataset: Any) -> str | None:
        """The column whose values are the rule's groups (None when the rule reads no groups)."""
        config = self.mining_config
        column = config.group_column
        if column is None:
            return None
        if column in dataset.column_names:
            return column
        if "group" in dataset.column_names and CONFIG_PREFIX in (dataset.info.description or ""):
            return "group"  # the codes the mining step wrote (the original column was removed since)
        reads_groups = config.strategy in _STRATEGIES_WITH_MINED_TEXTS and config.evidence in (
            DuplicateEvidence.GROUP, DuplicateEvidence.ANY
        )
        if reads_groups:
            raise ValueError(
                f"The rule reads groups from the column {column!r} (evidence={config.evidence.value!r}), which the "
                f"training dataset lacks (columns: {dataset.column_names}). Keep that column in the dataset, or "
                "mine without group_column."
            )
        return None

    def get_train_dataloader(self) -> DataLoader:
        """`Trainer.get_train_dataloader`, except that a last batch of a single row is dropped (with a note):
        a contrastive batch of one row has no negative, so its loss is 0 and teaches nothing."""
        dataset = self.train_dataset
        single = (
            dataset is not None
            and hasattr(dataset, "__len__")
            and self.args.world_size == 1
            and not self.args.dataloader_drop_last
            and len(dataset) > 1
            and len(dataset) % self._train_batch_size == 1
        )
        if not single:
            return super().get_train_dataloader()
        logger.warning(
            "The last training batch of each epoch would hold a single row (%d rows, batch size %d): it is dropped, "
            "since a contrastive batch needs at least 2 rows (one row has no negative and a loss of 0).",
            len(dataset), self._train_batch_size,
        )
        self.args.dataloader_drop_last = True
        try:
            return super().get_train_dataloader()
        finally:
            self.args.dataloader_drop_last = False

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """`Trainer.train`; `resume_from_checkpoint=True` takes the newest checkpoint that was completely
        written (one a killed process left half-written lacks `trainer_state.json`, which is written last)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_complete_checkpoint()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _last_complete_checkpoint(self) -> str:
        output_dir = self.args.output_dir
        names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
        steps = sorted((int(n.split("-")[1]) for n in names if re.fullmatch(r"checkpoint-\d+", n)), reverse=True)
        skipped = []
        for step in steps:
            folder = os.path.join(output_dir, f"checkpoint-{step}")
            problem = self._checkpoint_problem(folder)
            if problem is None:
                return folder
            logger.warning("Ignoring the incomplete checkpoint %s: %s", folder, problem)
            skipped.append(f"{folder} ({problem})")
        detail = f" Incomplete ones: {'; '.join(skipped)}." if skipped else ""
        raise ValueError(
            f"No complete checkpoint in {output_dir} to resume from.{detail} Delete the incomplete checkpoint "
            "folders and train from the start (resume_from_checkpoint=None), or pass the path of a complete one."
        )

    @staticmethod
    def _checkpoint_problem(folder: str) -> str | None:
        """Why the checkpoint `folder` cannot be resumed from (None when it is complete): its
        `trainer_state.json` must parse and its weights files must load (a disk that filled up while they
        were written leaves them empty or truncated)."""
        import json
        import zipfile

        from safetensors import SafetensorError, safe_open

        state_path = os.path.join(folder, "trainer_state.json")
        if not os.path.isfile(state_path):
            return "no trainer_state.json (it is written last)"
        try:
            with open(state_path, encoding="utf-8") as handle:
                state = json.load(handle)
        except (ValueError, UnicodeDecodeError) as err:
            return f"{state_path} is not valid JSON ({err}); it was not completely written"
        if not isinstance(state, dict) or "global_step" not in state:
            return f"{state_path} holds no trainer state"

        def unreadable(path: str) -> str | None:
            try:
                if path.endswith(".safetensors"):
                    with safe_open(path, framework="pt") as handle:
                        handle.keys()
                else:
                    with zipfile.ZipFile(path) as archive:  # torch.save files are zip archives
                        archive.namelist()
            except (SafetensorError, zipfile.BadZipFile, OSError) as err:
                return f"{path} cannot be read ({err}): it is truncated or corrupt"
            return None

        weights = []
        index_path = next(
            (os.path.join(folder, n) for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
             if os.path.isfile(os.path.join(folder, n))),
            None,
        )
        if index_path is not None:
            try:
                with open(index_path, encoding="utf-8") as handle:
                    shards = sorted(set(json.load(handle)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                return f"{index_path} is not a valid weights index ({err!r})"
            weights = [os.path.join(folder, shard) for shard in shards]
            missing = [path for path in weights if not os.path.isfile(path)]
            if missing:
                return f"the weights shard {missing[0]} is missing"
        else:
            weights = [os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin",
                                                         "adapter_model.safetensors")
                       if os.path.isfile(os.path.join(folder, n))]
            if not weights:
                if any(n.startswith(("pytorch_model_fsdp", "global_step")) for n in os.listdir(folder)):
                    return None  # FSDP / DeepSpeed shards: written in their own formats, left to their loaders
                return "no model weights (model.safetensors)"
        others = [os.path.join(folder, n) for n in ("optimizer.pt", "scheduler.pt") if os.path.isfile(os.path.join(folder, n))]
        for path in weights + others:
            problem = unreadable(path)
            if problem:
                return problem
        return None

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampler == "random":
            return super()._get_train_sampler(train_dataset)
        column = self.args.sampler_group_column
        if column not in dataset.column_names:
            raise ValueError(
                f"train_sampler={self.args.train_sampler!r} reads groups from column {column!r}, which the training "
                f"dataset lacks (columns: {dataset.column_names}): mine the dataset first (image_cluster) or set "
                "sampler_group_column."
            )
        groups = dataset.select_columns([column]).with_format("numpy")[column]
        if self.args.train_sampler == "cluster_spread":
            return ClusterSpreadSampler(groups, seed=self.args.seed)
        return CrowdedBatchSampler(
            groups, self.args.per_device_train_batch_size, self.args.crowded_share, seed=self.args.seed
        )

    def _global_metadata(self, meta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not (self.args.gather_across_processes and self.accelerator.num_processes > 1) or not meta:
            return meta
        names = list(meta)
        # Ragged cluster lists are padded with -1; shift them so the gather's zero padding also reads as -1.
        shifted = [meta[n] + 1 if n in LIST_META_COLUMNS else meta[n] for n in names]
        gathered = gather_metadata(*shifted, pad_trailing_dims=True)
        return {n: g - 1 if n in LIST_META_COLUMNS else g for n, g in zip(names, gathered)}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        for module in self._frozen_modules:  # frozen batch-norm statistics and dropout never change
            module.eval()
        meta = {name: inputs.pop(name) for name in META_COLUMNS if name in inputs}
        mined_weights = inputs.pop("negative_weights", None)
        num_mined = int(inputs.pop("num_mined", 0))
        tag_batch = {name: inputs.pop(name) for name in TAG_BATCH_KEYS if name in inputs}
        outputs = model(**inputs, return_dict=True)
        image_embeds = outputs.image_embeds
        batch_size = image_embeds.shape[0]
        text_embeds = outputs.text_embeds[:batch_size]
        mined_text_embeds = None
        if num_mined:
            mined_text_embeds = outputs.text_embeds[batch_size:].reshape(batch_size, num_mined, -1)
            if self.mining_config.strategy is NegativeStrategy.CLUSTER:
                mined_weights = (mined_weights > 0).to(image_embeds.dtype)
        negative_weights = positive_weights = None
        global_meta = self._global_metadata(meta)
        if self.mining_config.strategy is not NegativeStrategy.VANILLA:
            negative_weights, positive_weights = pair_weights(global_meta, self.mining_config, step=self.state.global_step)
        negative_weights = self._without_repeated_rows(global_meta.get(ROW_INDEX), negative_weights)
        if not getattr(self, "_checked_first_batch", False) and model.training:
            self._checked_first_batch = True
            self._warn_if_degenerate(negative_weights, positive_weights)
        logit_scale = self.accelerator.unwrap_model(model).logit_scale
        loss = self.loss_fn(
            image_embeds,
            text_embeds,
            logit_scale,
            negative_weights=negative_weights,
            positive_weights=positive_weights,
            mined_text_embeds=mined_text_embeds,
            mined_text_weights=mined_weights,
        )
        if self.args.ttd_weight > 0:
            loss = loss + self.args.ttd_weight * ttd_loss_term(model, outputs, text_embeds, tag_batch, self.ttd_loss)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _without_repeated_rows(row_index: torch.Tensor | None, weights: torch.Tensor | None) -> torch.Tensor | None:
        """Weights with 0 wherever two positions of the (gathered) batch hold the same row: accelerate pads an
        uneven last batch by repeating rows, and a row must never be its own negative. Unchanged when no row
        repeats (the plain CLIP loss keeps its fast path)."""
        if row_index is None:
            return weights
        row_index = row_index.flatten()
        same = row_index[:, None] == row_index[None, :]
        same.fill_diagonal_(False)
        if not bool(same.any()):
            return weights
        if weights is None:
            weights = torch.ones(same.shape, device=same.device)
        return weights.masked_fill(same.to(weights.device), 0.0)

    def _warn_if_degenerate(self, negative_weights: torch.Tensor | None, positive_weights: torch.Tensor | None) -> None:
        """Warn (once, on the first training batch) when the rule leaves most in-batch pairs without a negative."""
        if negative_weights is None or negative_weights.shape[0] < 2:
            return
        off = ~torch.eye(negative_weights.shape[0], dtype=torch.bool, device=negative_weights.device)
        masked = (negative_weights == 0) & off
        if positive_weights is not None:
            masked |= (positive_weights > 0) & off
        if self.mining_config.duplicate_action is DuplicateAction.DOWNWEIGHT:
            masked |= (negative_weights <= self.mining_config.downweight_factor) & off
        fraction = float(masked.sum()) / float(off.sum())
        if fraction > DEGENERATE_MASKED_FRACTION:
            logger.warning(
                "Degenerate batches: the first training batch (%d rows) has %.0f%% of its in-batch negatives "
                "masked or down-weighted by the rule (%s), so the loss is near 0 and teaches little. Check for "
                "identical or placeholder images and towers whose features are all alike (MiningStats.median_pair_"
                "image_cosine), make the evidence stricter, or train with negative_strategy='vanilla'.",
                negative_weights.shape[0], 100 * fraction, describe_evidence(self.mining_config),
            )

    # ----- checkpoints -----

    def _load_checkpoint_weights(self, checkpoint: str, model: nn.Module | None = None) -> bool:
        # transformers v5 renames some tower weights at load time (e.g. ViT's legacy `encoder.layer.N`),
        # and Trainer's raw state-dict loading skips that conversion; `from_pretrained` applies it.
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return False
        if not os.path.isfile(os.path.join(checkpoint, "config.json")):
            return False
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        loaded = type(target).from_pretrained(checkpoint)
        target.load_state_dict(loaded.state_dict())
        logger.info("Loaded model weights from %s.", checkpoint)
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._load_checkpoint_weights(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not self._load_checkpoint_weights(best):
            super()._load_best_model()

    # ----- Hub -----

    def create_model_card(self, dataset: str | list[str] | None = None, **kwargs: Any) -> None:
        """Write README.md into `output_dir` from `model_card_template.md`: towers, dataset, mining config,
        negative strategy and the last evaluation's retrieval metrics (used by `push_to_hub`)."""
        from .hub import render_model_card

        if not self.is_world_process_zero():
            return
        config = self.model.config
        towers = {
            "vision": getattr(config.vision_config, "_name_or_path", "") or config.vision_config.model_type,
            "text": getattr(config.text_config, "_name_or_path", "") or config.text_config.model_type,
        }
        last_eval = next((log for log in reversed(self.state.log_history) if any(k.startswith("eval_") for k in log)), {})
        eval_results = {
            k.removeprefix("eval_"): v
            for k, v in last_eval.items()
            if k.startswith("eval_") and isinstance(v, (int, float)) and ("R@" in k or "rank" in k)
        }
        card = render_model_card(
            towers,
            dataset=dataset if isinstance(dataset, str) else None,
            mining_config=self.mining_config.to_dict(),
            negative_strategy=self.mining_config.strategy.value,
            eval_results=eval_results,
            training_args={k: v for k, v in self.args.to_dict().items() if not k.endswith("token")},
            repo_id=self.hub_model_id if hasattr(self, "hub_model_id") else self.args.hub_model_id,
        )
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)

    # ----- evaluation -----

    def _eval_groups(self, dataset: Any) -> list[Any]:
        """One relevance label per eval row: the value of `retrieval_group_column` (any type; a row without a
        value is a group of its own), or the normalised caption."""
        column = self.args.retrieval_group_column
        if column is not None:
            if column not in dataset.column_names:
                raise KeyError(
                    f"retrieval_group_column {column!r} is not a column of the eval dataset (columns: "
                    f"{dataset.column_names})."
                )
            values = dataset.select_columns([column]).with_format("arrow")[column]
            values = (values.column(0) if hasattr(values, "column") else values).to_pylist()
            codes = group_codes(values, len(values), column=column)
            # a missing value is a group of its own: codes past the used ones, one per such row
            missing = np.flatnonzero(codes < 0)
            codes[missing] = codes.max(initial=-1) + 1 + np.arange(missing.size)
            return codes.tolist()
        return groups_from_captions(dataset[self.mining_config.caption_column])

    @torch.no_grad()
    def embed_dataset(self, dataset: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Projected image and text embeddings of every row of `dataset` (in order) and the vanilla contrastive
        loss of the whole set at once (every other row is a negative: the value does not depend on where batch
        boundaries fall)."""
        model = self.model
        model.eval()
        loader = DataLoader(
            dataset,
            batch_size=self.args.eval_batch_size,
            sampler=SequentialSampler(dataset),
            collate_fn=self.eval_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        loader = self.accelerator.prepare(loader)
        image_parts, text_parts = [], []
        for batch in loader:
            for name in META_COLUMNS:
                batch.pop(name, None)
            with self.autocast_smart_context_manager():
                outputs = model(**batch, return_dict=True)
            image_parts.append(self.accelerator.gather_for_metrics(outputs.image_embeds.float()))
            text_parts.append(self.accelerator.gather_for_metrics(outputs.text_embeds.float()))
        image_embeds, text_embeds = torch.cat(image_parts), torch.cat(text_parts)
        scale = self.accelerator.unwrap_model(model).logit_scale.detach().float()
        return image_embeds, text_embeds, _whole_set_clip_loss(image_embeds, text_embeds, scale)

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Embed the eval split and report retrieval metrics (`{prefix}_t2i_R@1`, ...) and `{prefix}_loss`."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset.")
        if isinstance(dataset, dict):
            metrics: dict[str, float] = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        self._memory_tracker.start()
        start = time.time()
        if self.cached_tower_features and hasattr(dataset, "column_names") and not set(self._cached_columns()) <= set(
            dataset.column_names
        ):
            # a dataset passed to evaluate() directly: embed it with the frozen towers, as the eval split was
            dataset = self._with_tower_features(
                without_image_decoding(dataset, self.mining_config.image_column), self.model, self.processing_class,
                self.args,
            )
        was_training = self.model.training
        image_embeds, text_embeds, loss = self.embed_dataset(dataset)
        if was_training:
            self.model.train()
        groups = self._eval_groups(dataset)
        metrics = {
            f"{metric_key_prefix}_{name}": value
            for name, value in retrieval_metrics(image_embeds, text_embeds, groups, groups).items()
        }
        metrics[f"{metric_key_prefix}_groups"] = float(len(set(groups)))
        best = self.args.metric_for_best_model
        if len(set(groups)) < 2 and best is not None and "R@" in best:
            logger.warning(
                "metric_for_best_model=%r cannot rank checkpoints on %r: its %d rows form a single relevance group "
                "(%s), so every model scores 100 and the best checkpoint is picked arbitrarily.",
                best, metric_key_prefix, len(groups),
                f"retrieval_group_column {self.args.retrieval_group_column!r}" if self.args.retrieval_group_column
                else "identical captions",
            )
        metrics[f"{metric_key_prefix}_loss"] = loss if math.isfinite(loss) else float("nan")
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=len(dataset)))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics


def _whole_set_clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                         chunk_size: int = 4096) -> float:
    """The plain CLIP loss of N pairs with all N - 1 other rows as negatives (`weighted_contrastive_loss`
    without weights), computed in row chunks so no N x N matrix is held at once."""
    if len(image_embeds) == 0:
        return float("nan")
    images = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    texts = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    scale = logit_scale.exp().to(images.device)
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    for queries, gallery in ((images, texts), (texts, images)):
        for start in range(0, len(queries), chunk_size):
            logits = scale * queries[start : start + chunk_size] @ gallery.T
            labels = torch.arange(start, start + len(logits), device=logits.device)
            total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
    return float(total / (2 * len(images)))
