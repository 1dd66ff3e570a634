"""`ClipNegTrainingArguments`: `transformers.TrainingArguments` plus the weighted-contrastive options."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from transformers import TrainingArguments

from ..mining.config import NegativeStrategy


class TowerTraining(str, Enum):
    """Which tower parameters train: none (`frozen`: only projections and logit scale), the last
    `trainable_blocks` blocks of each tower (`partial`), or everything (`full`)."""

    FROZEN = "frozen"
    PARTIAL = "partial"
    FULL = "full"


@dataclass
class ClipNegTrainingArguments(TrainingArguments):
    """Training arguments for `ClipNegTrainer`.

    The negative strategy overrides the one stored with the mined dataset when given, so one mined
    dataset serves every strategy of a comparison.

    Example:
        >>> args = ClipNegTrainingArguments(output_dir="out", negative_strategy="vanilla", report_to="none")
        >>> args.negative_strategy.value, args.remove_unused_columns
        ('vanilla', False)
    """

    negative_strategy: str | None = field(
        default=None,
        metadata={
            "help": "vanilla | random | cluster | cluster_weighted; default: the strategy stored with the mined dataset.",
            "choices": ["vanilla", "random", "cluster", "cluster_weighted"],
        },
    )
    mined_negatives_per_row: int | None = field(
        default=0,
        metadata={
            "help": "How many mined incorrect texts per image join the loss (None: all mined). Default 0: each costs "
            "a text-tower pass (4 per row made a trainer step 1.18x slower, README 'Speed') and they measured no "
            "retrieval gain in this project's study."
        },
    )
    contrastive_loss: str = field(
        default="infonce",
        metadata={
            "help": "infonce: symmetric InfoNCE (CLIP, WeightedContrastiveLoss). sigmoid: pairwise sigmoid loss "
            "(SigLIP, SigmoidContrastiveLoss: a learnable bias, SigLIP's initial logit scale log 10 and bias -10). "
            "Both take the rule's negative weights and positives.",
            "choices": ["infonce", "sigmoid"],
        },
    )
    guided_negative_margin: float | None = field(
        default=None,
        metadata={
            "help": "Model-guided false-negative filter (label-free): also mask the in-batch negatives that the model "
            "being trained scores above the positive minus this margin (cosine units), in either direction "
            "(`mining.model_guided_flags`). None: off."
        },
    )
    mini_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "GradCache (Gao et al. 2021): embed each contrastive batch in chunks of this many rows without "
            "gradients, compute the loss on the whole batch, then back-propagate chunk by chunk: the gradient of "
            "the large batch with the activation memory of one chunk, for about one extra forward pass. None: one "
            "pass. Not with the TTD term or fp16."
        },
    )
    gather_across_processes: bool = field(
        default=True, metadata={"help": "Contrast against the global batch of all processes (open_clip style)."}
    )
    tower_training: str = field(
        default="partial",
        metadata={
            "help": "Which tower weights train besides the projections and the logit scale. partial (default): the "
            "last trainable_blocks block(s) of each tower (chosen on validation: +10.9 category R@1 over frozen on "
            "fashion-products, README Benchmarks); frozen: none (cheapest: seconds on cached tower features); "
            "full: all.",
            "choices": ["frozen", "partial", "full"],
        },
    )
    trainable_blocks: int = field(
        default=1, metadata={"help": "With tower_training=partial: how many last blocks of each tower train."}
    )
    cached_tower_features: bool | None = field(
        default=None,
        metadata={
            "help": "Run the frozen part of the towers once per distinct image and caption and train on its "
            "cached output (same losses and gradients as running the towers, far faster): with "
            "tower_training='frozen' the tower features (only the projections and logit scale run), with "
            "'partial' the inputs of the first trainable block (only the trainable blocks run; EfficientNet, ViT "
            "and BERT-style towers). Default: on where possible, else the towers run (logged); refused with 'full'."
        },
    )
    train_sampler: str = field(
        default="random",
        metadata={
            "help": "random: shuffled batches. cluster_spread: each batch spreads over many groups of "
            "sampler_group_column. crowded: a crowded_share of each batch comes from a stream sorted by "
            "sampler_group_column (batches crowded with similar items, as in a one-category shop).",
            "choices": ["random", "cluster_spread", "crowded"],
        },
    )
    sampler_group_column: str = field(
        default="image_cluster",
        metadata={"help": "Column of group ids the cluster_spread and crowded samplers read (a mined column by default)."},
    )
    crowded_share: float = field(
        default=0.5, metadata={"help": "crowded sampler: share of each batch drawn from the group-sorted stream."}
    )
    cluster_spread_sampler: bool = field(
        default=False, metadata={"help": "Same as train_sampler='cluster_spread' (kept for older scripts)."}
    )
    image_augmentation: bool = field(
        default=False, metadata={"help": "Light augmentation (random resized crop, horizontal flip) of train images."}
    )
    max_text_length: int | None = field(
        default=None,
        metadata={
            "help": "Captions are cut to this many tokens, in training, evaluation, mining and retrieval alike "
            "(stored in the model config as text_max_length). Default: the model's (64 for towers built by hf_clipneg)."
        },
    )
    max_logit_scale: float = field(
        default=100.0,
        metadata={"help": "Cap of the learned logit scale exp(t), applied after every optimiser step (CLIP: 100)."},
    )
    retrieval_group_column: str | None = field(
        default=None,
        metadata={"help": "Evaluation counts a hit for any item of the same group (default: the same caption)."},
    )
    ttd_weight: float = field(
        default=0.0, metadata={"help": "Weight of the text-tag self-distillation (TTD) term (0 disables it)."}
    )
    ttd_max_tags: int = field(default=8, metadata={"help": "TTD: tags taken from each caption."})
    ttd_temperature: float = field(default=0.5, metadata={"help": "TTD: temperature of the soft similarity masks."})
    ttd_margin: float = field(default=0.0, metadata={"help": "TTD: grounding margin a tag needs to be selected."})
    ttd_tags_column: str = field(default="tags", metadata={"help": "TTD: a list column of tags used instead of extraction."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs the image, caption and mining columns."}
    )

    def __getstate__(self) -> dict:
        # Trainer pickles its arguments into training_args.bin beside every save: never with the Hub token.
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state

    def __post_init__(self) -> None:
        if self.negative_strategy is not None and not isinstance(self.negative_strategy, NegativeStrategy):
            self.negative_strategy = NegativeStrategy(self.negative_strategy)
        if not isinstance(self.tower_training, TowerTraining):
            self.tower_training = TowerTraining(self.tower_training)
        if self.trainable_blocks < 0:
            raise ValueError(f"trainable_blocks must be >= 0, got {self.trainable_blocks}.")
        if self.mined_negatives_per_row is not None and self.mined_negatives_per_row < 0:
            raise ValueError(f"mined_negatives_per_row must be >= 0, got {self.mined_negatives_per_row}.")
        if self.ttd_weight < 0:
            raise ValueError(f"ttd_weight must be >= 0, got {self.ttd_weight}.")
        if self.cluster_spread_sampler:
            self.train_sampler = "cluster_spread"
        if self.train_sampler not in ("random", "cluster_spread", "crowded"):
            raise ValueError(f"train_sampler must be random, cluster_spread or crowded, got {self.train_sampler!r}.")
        if not 0.0 < self.crowded_share <= 1.0:
            raise ValueError(f"crowded_share must be in (0, 1], got {self.crowded_share}.")
        if self.contrastive_loss not in ("infonce", "sigmoid"):
            raise ValueError(f"contrastive_loss must be 'infonce' or 'sigmoid', got {self.contrastive_loss!r}.")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1 or None, got {self.mini_batch_size}.")
        if self.mini_batch_size is not None and self.ttd_weight > 0:
            raise ValueError(
                "mini_batch_size (GradCache) cannot be combined with the TTD term (ttd_weight > 0): TTD needs the "
                "vision outputs of the whole batch. Leave one of them unset."
            )
        if self.mini_batch_size is not None and self.fp16:
            raise ValueError(
                "mini_batch_size (GradCache) does not support fp16 loss scaling; use bf16 or fp32 (bf16=True)."
            )
        if self.max_logit_scale <= 1.0:
            raise ValueError(f"max_logit_scale must be > 1, got {self.max_logit_scale}.")
        if self.max_text_length is not None and self.max_text_length < 2:
            raise ValueError(f"max_text_length must be >= 2, got {self.max_text_length}.")
        if self.cached_tower_features and self.tower_training is TowerTraining.FULL:
            raise ValueError(
                "cached_tower_features=True needs a frozen part of the towers (tower_training='frozen' or "
                "'partial'), got tower_training='full': every tower weight changes its outputs every step. Leave "
                "cached_tower_features unset to run the towers."
            )
        super().__post_init__()
        if self.per_device_train_batch_size < 2:
            global_batch = self.per_device_train_batch_size * (self.world_size if self.gather_across_processes else 1)
            if global_batch < 2:
                raise ValueError(
                    f"per_device_train_batch_size={self.per_device_train_batch_size} gives contrastive batches of "
                    f"{global_batch} row: a row's negatives are the other rows of its batch, so a batch needs at least "
                    "2 rows (with 1 the loss is 0 on every step and nothing is learnt). Use a batch size of 2 or more "
                    "(contrastive training gains from large batches; use gradient_accumulation_steps only for memory)."
                )
