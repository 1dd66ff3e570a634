"""The demo: mine the embedded synthetic data once, train one model per negative strategy with the same
seed and budget, and compare retrieval on held-out rows."""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class DemoArguments:
    """Settings of `hf-clipneg demo` (the defaults took 57 s on 2 CPU cores, load average 1.2-1.5, fp32)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Folder of the per-strategy training runs."})
    num_train: int = field(default=600, metadata={"help": "Synthetic training rows."})
    num_eval: int = field(default=200, metadata={"help": "Synthetic test rows."})
    strategies: str = field(
        default="vanilla,random,cluster,cluster_weighted",
        metadata={"help": "Comma list; `cluster` is the default MiningConfig rule, `cluster_weighted` adds weights."},
    )
    image_size: int = field(
        default=96, metadata={"help": "Side the vision tower sees (the synthetic images are 64 px; 224 is 5x slower)."}
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs per strategy."})
    batch_size: int = field(default=64, metadata={"help": "Training (contrastive) and evaluation batch size."})
    learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Peak learning rate of what trains (projections, logit scale, trainable blocks)."},
    )
    tower_training: str = field(
        default="partial",
        metadata={"help": "frozen | partial | full: which tower weights train (as `hf-clipneg train`).",
                  "choices": ["frozen", "partial", "full"]},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data, the mining and the projections' initialisation."})
    tiny_random_towers: bool = field(default=False, metadata={"help": "Seconds-long smoke run with tiny random towers."})
    bf16: bool = field(
        default=False,
        metadata={"help": "bfloat16 autocast in training (frozen-tower inference picks its precision by hardware)."},
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars (embedding, mining, training)."})


def run_demo(args: DemoArguments) -> list[dict[str, Any]]:
    """Run the demo and return one result row per strategy.

    Relevance counts a hit for any image of the same synthetic object (`object_id`): near-identical
    renderings of one object are exactly the false negatives vanilla CLIP pushes apart.

    Example:
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its training summary
        ...     rows = run_demo(DemoArguments(num_train=64, num_eval=32, strategies="vanilla", tiny_random_towers=True,
        ...                                   num_train_epochs=1, batch_size=16, output_dir="/tmp/hf_clipneg_demo_doc"))
        >>> rows[0]["strategy"], 0 <= rows[0]["t2i_R@1"] <= 100
        ('vanilla', True)
    """
    from .features import compute_features
    from .mining import MiningConfig, mine_negatives
    from .pipeline import ModelArguments
    from .data import make_synthetic_splits
    from .training import ClipNegTrainer
    from .training import ClipNegTrainingArguments

    model_args = ModelArguments(tiny_random_towers=args.tiny_random_towers)
    splits = make_synthetic_splits(args.num_train, args.num_eval, seed=args.seed)
    base_model, processor = _load(model_args, args.image_size, args.seed)
    mined, _ = mine_negatives(splits["train"], MiningConfig(seed=args.seed), model=base_model, processor=processor)
    test = splits["test"]  # with tower_training="full" the towers run on every step: nothing to cache
    if args.tower_training == "frozen":
        # The test rows' tower features, once: every strategy's trainer reuses them (same towers).
        test = compute_features(test, base_model, processor, batch_size=args.batch_size)
    elif args.tower_training == "partial":
        # Datasets on disk, so that the first trainer's cached block inputs (a `Dataset.map`) are found in the
        # cache by the others; in-memory datasets cache nothing.
        mined, test = (_reloaded(part, os.path.join(args.output_dir, "data", name))
                       for name, part in (("train", mined), ("test", splits["test"])))

    results = []
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for number, strategy in enumerate(strategies, start=1):
        logger.info("Strategy %d of %d: %s", number, len(strategies), strategy)
        model = copy.deepcopy(base_model)  # every strategy starts from the same projections
        training_args = ClipNegTrainingArguments(
            output_dir=os.path.join(args.output_dir, strategy),
            negative_strategy=strategy,
            num_train_epochs=args.num_train_epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            tower_training=args.tower_training,
            seed=args.seed,
            bf16=args.bf16,
            use_cpu=not _has_cuda(),
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            logging_steps=10,
            retrieval_group_column="object_id",
            disable_tqdm=args.disable_tqdm,
        )
        trainer = ClipNegTrainer(
            model=model, args=training_args, train_dataset=mined, eval_dataset=test, processing_class=processor
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        metrics = trainer.evaluate(metric_key_prefix="test")
        results.append(
            {
                "strategy": strategy,
                **{key: metrics[f"test_{key}"] for key in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1")},
                "train_seconds": seconds,
            }
        )
    return results


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of result rows (floats to two decimals)."""
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in header]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _load(model_args: Any, image_size: int, seed: int) -> tuple[Any, Any]:
    from transformers import set_seed

    from .pipeline import load_model

    from .pipeline import set_image_size

    set_seed(seed)  # the new projection heads are random: seeded, as in `hf-clipneg train`
    model, processor = load_model(model_args)
    if not model_args.tiny_random_towers:
        set_image_size(processor, image_size)
    return model, processor


def _reloaded(dataset: Any, path: str) -> Any:
    from datasets import load_from_disk

    dataset.save_to_disk(path)
    return load_from_disk(path)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
