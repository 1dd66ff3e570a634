"""`ClipNegTrainer`: a `transformers.Trainer` that trains a `VisionTextDualEncoderModel` with the weighted
contrastive loss, builds in-batch weights from the mined dataset, and evaluates retrieval."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, SequentialSampler
from safetensors.torch import load_file, save_file
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.trainer_utils import speed_metrics

from ..data import without_image_decoding
from ..encoding import DEFAULT_TEXT_MAX_LENGTH, as_clipneg_model, text_max_length
from ..losses import SIGLIP_INIT_LOGIT_SCALE, SigmoidContrastiveLoss, WeightedContrastiveLoss, gather_metadata
from ..losses.tag_distillation import TagSelfDistillationLoss, ttd_loss_term
from ..metrics import retrieval_metrics
from ..mining import MiningConfig, NegativeStrategy, pair_weights
from ..block_features import TEXT_BLOCK_INPUTS
from .arguments import ClipNegTrainingArguments, TowerTraining
from .batch_weights import guided_weights, warn_if_degenerate, without_repeated_rows
from .cached import cached_columns, plan_cached_inputs, with_cached_inputs
from .checkpoints import last_complete_checkpoint
from .collator import (
    FEATURE_META_COLUMNS,
    LIST_META_COLUMNS,
    META_COLUMNS,
    ROW_INDEX,
    ClipNegCollator,
    captions_by_row_id,
    text_features_by_row_id,
)
from .evaluation import eval_groups, whole_set_clip_loss
from .freezing import LogitScaleCap, ZeroGradAfterStep, set_tower_training
from .gradcache import BatchExtras, batch_rows, gradcache_step, split_batch
from .model_card import write_model_card
from .rows import STRATEGIES_WITH_MINED_TEXTS, drop_skipped_rows, resolve_mining_config, with_training_metadata
from .samplers import ClusterSpreadSampler, CrowdedBatchSampler
from .setup_checks import check_step_count, check_training_setup

logger = logging.getLogger(__name__)

#: File in a checkpoint folder that holds the loss's own parameters (the sigmoid loss's bias).
LOSS_STATE_FILE = "loss.safetensors"


class ClipNegTrainer(Trainer):
    """Train a `VisionTextDualEncoderModel` on a mined dataset with a weighted contrastive loss.

    The in-batch negative weights come from `hf_clipneg.mining.pair_weights` (the one implementation of
    the mining rule) applied to the mining columns of the (global) batch. Evaluation embeds the eval split
    and reports text->image and image->text R@K and median rank (`eval_t2i_R@1`, ...), usable with
    `metric_for_best_model="t2i_R@1"`.

    Losses: `loss` is the contrastive term (default: `WeightedContrastiveLoss()` for
    `args.contrastive_loss="infonce"`, `SigmoidContrastiveLoss()` for `"sigmoid"`; the trainer optimises and
    checkpoints a loss's own parameters); with `args.ttd_weight > 0`, `ttd_weight * ttd_loss` is added (default
    `TagSelfDistillationLoss(args.ttd_temperature, args.ttd_margin)`; pass your own, e.g. with `detach_image=True`).
    `eval_loss` is always the plain InfoNCE of the whole eval set (comparable across losses and strategies).

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
        loss: WeightedContrastiveLoss | SigmoidContrastiveLoss | None = None,
        data_collator: Any = None,
        ttd_loss: TagSelfDistillationLoss | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, ClipNegTrainingArguments):
            raise TypeError("ClipNegTrainer needs ClipNegTrainingArguments (a TrainingArguments subclass).")
        if processing_class is None:
            raise ValueError("Pass the VisionTextDualEncoderProcessor as `processing_class`.")
        check_training_setup(args)
        if ttd_loss is not None and args.ttd_weight <= 0:
            raise ValueError("ttd_loss was given but args.ttd_weight is 0, so it would never run: set ttd_weight > 0.")
        self.mining_config = resolve_mining_config(mining_config, train_dataset, args)
        model = as_clipneg_model(model)
        if args.max_text_length is not None:
            model.config.text_max_length = args.max_text_length
        elif not getattr(model.config, "text_max_length", None):
            model.config.text_max_length = DEFAULT_TEXT_MAX_LENGTH
        image_column = self.mining_config.image_column
        if train_dataset is not None:
            train_dataset = drop_skipped_rows(without_image_decoding(train_dataset, image_column))
        train_dataset, meta_columns = with_training_metadata(train_dataset, self.mining_config)
        if train_dataset is not None and hasattr(train_dataset, "__len__"):
            check_step_count(args, len(train_dataset))
        collator_given = data_collator is not None
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: without_image_decoding(part, image_column) for name, part in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = without_image_decoding(eval_dataset, image_column)
        strategy = self.mining_config.strategy
        mined_per_row = 0 if strategy not in STRATEGIES_WITH_MINED_TEXTS else args.mined_negatives_per_row
        if args.tower_training is not TowerTraining.FULL and args.cached_tower_features is not False:
            model.to(args.device)  # the features' provenance includes the precision chosen for this device
        #: whether the towers' frozen part runs once (cached) instead of every step, and where cached tails start
        self.cached_tower_features, self.tail_starts = plan_cached_inputs(
            args, data_collator, train_dataset, model, processing_class
        )
        mined_texts = (
            train_dataset is not None and mined_per_row != 0 and "negative_indices" in train_dataset.column_names
        )
        if self.cached_tower_features:
            with args.main_process_first(desc="embedding the training and evaluation rows"):
                train_dataset, eval_dataset = (
                    with_cached_inputs(part, model, processing_class, self.tail_starts, self.mining_config, args.device)
                    for part in (train_dataset, eval_dataset)
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
        self.loss_fn = loss if loss is not None else self._default_loss(args)
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn.to(self.args.device)
        self.ttd_loss = ttd_loss if ttd_loss is not None else TagSelfDistillationLoss(
            temperature=args.ttd_temperature, margin=args.ttd_margin
        )
        self._frozen_modules = set_tower_training(self.model, args.tower_training, args.trainable_blocks)
        text_pooler = getattr(self.model.text_model, "pooler", None)
        if self.model.text_pooling == "mean" and isinstance(text_pooler, nn.Module):
            text_pooler.requires_grad_(False)  # mean pooling never uses it: no gradient, nothing to train
        self.add_callback(LogitScaleCap(args.max_logit_scale))
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info(
            "Negative strategy %s, %s loss, towers %s%s%s: %d trainable parameters.", strategy.value,
            args.contrastive_loss, args.tower_training.value, self._cache_description(),
            f", TTD weight {args.ttd_weight:g}" if args.ttd_weight > 0 else "", trainable,
        )

    def _cache_description(self) -> str:
        if not self.cached_tower_features:
            return ", towers run every step"
        if self.tail_starts is None:
            return ", training on cached tower features"
        parts = [f"{name} tower from its cached block-{start} input" if start is not None else f"{name} tower features"
                 for name, start in zip(("vision", "text"), self.tail_starts)]
        return ", training on cached " + " and ".join(parts)

    def _default_loss(self, args: ClipNegTrainingArguments) -> WeightedContrastiveLoss | SigmoidContrastiveLoss:
        if args.contrastive_loss == "infonce":
            return WeightedContrastiveLoss(gather_across_processes=args.gather_across_processes)
        scale = self.model.logit_scale
        if math.isclose(float(scale.detach()), self.model.config.logit_scale_init_value, abs_tol=1e-6):
            with torch.no_grad():  # an untrained scale starts where SigLIP starts it
                scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
            logger.info("Sigmoid loss: logit scale initialised to SigLIP's log 10 (bias -10).")
        return SigmoidContrastiveLoss(gather_across_processes=args.gather_across_processes)

    def _loss_parameters(self) -> list[nn.Parameter]:
        """The parameters the loss owns (the sigmoid loss's bias); none for a plain loss function."""
        return list(self.loss_fn.parameters()) if isinstance(self.loss_fn, nn.Module) else []

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        """`Trainer.create_optimizer`, plus the loss's own parameters (the sigmoid loss's bias), without weight
        decay."""
        optimizer = super().create_optimizer(model)
        extra = [p for p in self._loss_parameters() if p.requires_grad]
        if extra and not any(p is q for group in optimizer.param_groups for p in group["params"] for q in extra):
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
            self.add_callback(ZeroGradAfterStep(self.loss_fn))  # Trainer zeroes only the model's gradients
        return optimizer

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # The loss's parameters go into the checkpoint folder before Trainer writes trainer_state.json (last).
        if self._loss_parameters() and self.is_world_process_zero():
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.loss_fn.state_dict().items()},
                      os.path.join(folder, LOSS_STATE_FILE))
        super()._save_checkpoint(model, trial)

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
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

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
        model_inputs, batch = split_batch(inputs)
        outputs = model(**model_inputs, return_dict=True)
        image_embeds = outputs.image_embeds
        text_embeds = outputs.text_embeds[: image_embeds.shape[0]]
        loss = self.contrastive_loss(model, image_embeds, outputs.text_embeds, batch)
        if self.args.ttd_weight > 0:
            loss = loss + self.args.ttd_weight * ttd_loss_term(model, outputs, text_embeds, batch.tags, self.ttd_loss)
        return (loss, outputs) if return_outputs else loss

    def contrastive_loss(
        self, model: nn.Module, image_embeds: torch.Tensor, text_embeds: torch.Tensor, batch: BatchExtras
    ) -> torch.Tensor:
        """The contrastive term of one batch: `self.loss_fn` with the rule's in-batch weights.

        Args:
            image_embeds: (B, d) image embeddings of this process's rows.
            text_embeds: (B + B*m, d): the B captions, then the m mined texts of each row in row order.
            batch: the batch's mining metadata and mined-text weights (`split_batch`).
        """
        batch_size = image_embeds.shape[0]
        mined_weights = batch.mined_weights
        mined_text_embeds = None
        if batch.num_mined:
            mined_text_embeds = text_embeds[batch_size:].reshape(batch_size, batch.num_mined, -1)
            if self.mining_config.strategy is NegativeStrategy.CLUSTER:
                mined_weights = (mined_weights > 0).to(image_embeds.dtype)
        negative_weights = positive_weights = None
        global_meta = self._global_metadata(batch.meta)
        if self.mining_config.strategy is not NegativeStrategy.VANILLA:
            negative_weights, positive_weights = pair_weights(global_meta, self.mining_config, step=self.state.global_step)
        if self.args.guided_negative_margin is not None:
            negative_weights = guided_weights(
                image_embeds, text_embeds[:batch_size], negative_weights, self.args.guided_negative_margin,
                gather=self.args.gather_across_processes and self.accelerator.num_processes > 1,
            )
        negative_weights = without_repeated_rows(global_meta.get(ROW_INDEX), negative_weights)
        if not getattr(self, "_checked_first_batch", False) and model.training:
            self._checked_first_batch = True
            warn_if_degenerate(negative_weights, positive_weights, self.mining_config)
        return self.loss_fn(
            image_embeds,
            text_embeds[:batch_size],
            self.accelerator.unwrap_model(model).logit_scale,
            negative_weights=negative_weights,
            positive_weights=positive_weights,
            mined_text_embeds=mined_text_embeds,
            mined_text_weights=mined_weights,
        )

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """`Trainer.training_step`; with `args.mini_batch_size` smaller than the batch, a GradCache step
        (`training.gradcache.gradcache_step`): the full batch's gradient with the activation memory of one chunk."""
        chunk = self.args.mini_batch_size
        if chunk is None or batch_rows(inputs) <= chunk:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        for module in self._frozen_modules:
            module.eval()
        return gradcache_step(self, model, self._prepare_inputs(inputs), chunk)

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
        loss_state = os.path.join(resume_from_checkpoint, LOSS_STATE_FILE)
        if os.path.isfile(loss_state):
            self.loss_fn.load_state_dict(load_file(loss_state, device=str(self.args.device)))

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not self._load_checkpoint_weights(best):
            super()._load_best_model()

    def _last_complete_checkpoint(self) -> str:
        return last_complete_checkpoint(self.args.output_dir)

    def create_model_card(self, dataset: str | list[str] | None = None, **kwargs: Any) -> None:
        """Write README.md into `output_dir` (`training.model_card.write_model_card`; used by `push_to_hub`)."""
        if self.is_world_process_zero():
            write_model_card(self, dataset)

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
        return image_embeds, text_embeds, whole_set_clip_loss(image_embeds, text_embeds, scale)

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Embed the eval split (or each split of a dict) and report retrieval metrics (`{prefix}_t2i_R@1`, ...,
        relevance by `args.retrieval_group_column` or the caption) and `{prefix}_loss`, the plain InfoNCE of the
        whole set with every other row a negative (whatever the training loss).

        Raises:
            ValueError: no eval dataset. KeyError: `retrieval_group_column` is not a column of it.
        """
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
        if self.cached_tower_features and hasattr(dataset, "column_names") and not set(cached_columns(self.tail_starts)) <= set(
            dataset.column_names
        ):
            # a dataset passed to evaluate() directly: embed it with the frozen towers, as the eval split was
            dataset = with_cached_inputs(
                without_image_decoding(dataset, self.mining_config.image_column), self.model, self.processing_class,
                self.tail_starts, self.mining_config, self.args.device,
            )
        was_training = self.model.training
        image_embeds, text_embeds, loss = self.embed_dataset(dataset)
        if was_training:
            self.model.train()
        groups = eval_groups(dataset, self.args.retrieval_group_column, self.mining_config.caption_column)
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

