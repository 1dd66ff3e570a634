"""Checks `ClipNegTrainer` runs before any work: a launch whose processes disagree on how many they are, a
learning rate meant for other training, a run too short for the new projections, and dataloader settings that
only make noise on this machine.

`ClipNegTrainer.__init__` calls :func:`check_training_setup` once and :func:`check_step_count` with the number of
training rows.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

logger = logging.getLogger(__name__)

TRANSFORMERS_DEFAULT_LEARNING_RATE = 5e-5

# Below this many optimiser steps the new projections are barely trained: on the 600 synthetic pairs of README "The
# CLI" (partial depth) 6 steps of batch 256 gave text->image R@1 83.0, 20 steps of batch 64 gave 95.0.
MIN_OPTIMIZER_STEPS = 20

# What `hf-clipneg train` and examples/train_clipneg.py use when the option is not given, by `tower_training`.
# frozen: only the new projections and the logit scale train (cached tower features): a large step is right
# (1e-3, batch 64: benchmarks/quality.py's frozen regime). partial (the default): the last tower blocks train
# too, at the rate and batch benchmarks/quality.py measured (1e-3, batch 256, 240 steps: +10.9
# category R@1 over frozen on fashion-products, 3 seeds; the earlier 1e-4, chosen from 1e-5 / 3e-5 / 1e-4 for
# extra steps after a frozen schedule, gained 1.7-2.8). full: every tower weight trains; 2e-5 is the usual
# fine-tuning rate of pretrained towers (not benchmarked here).
TOWER_TRAINING_DEFAULTS: dict[str, dict[str, float | int]] = {
    "frozen": {"learning_rate": 1e-3, "per_device_train_batch_size": 64, "per_device_eval_batch_size": 64},
    "partial": {"learning_rate": 1e-3, "per_device_train_batch_size": 256, "per_device_eval_batch_size": 64},
    "full": {"learning_rate": 2e-5, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 64},
}


class LaunchMismatchError(RuntimeError):
    """The processes of a distributed launch and the Trainer disagree on how many processes train."""


def launched_world_size() -> tuple[int, str]:
    """`(world size, where it was read)`: the torch.distributed process group's size when one is initialised,
    else the launcher's `WORLD_SIZE` environment variable, else 1.

    Example:
        >>> launched_world_size()[0] >= 1
        True
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), "the torch.distributed process group"
    value = os.environ.get("WORLD_SIZE")
    if value is not None and value.strip().isdigit():
        return int(value), "the environment variable WORLD_SIZE"
    return 1, "no launcher"


def check_world_size(args: Any) -> None:
    """Raise `LaunchMismatchError` when this process was launched as one of N (accelerate/torchrun) but the
    Trainer's arguments run it alone (`args.world_size == 1`), or the other way round.

    The classic case: `accelerate launch --multi_gpu --num_processes 2 script.py ...` on a machine without GPUs
    and without `--use_cpu`. Accelerate starts 2 processes with a process group of 2, while `TrainingArguments`
    (no GPU, no `use_cpu`) sets up a single non-distributed process; the loss then gathers the features of both
    processes and fails deep inside training with "negative_weights has shape (32, 32), expected (64, 64)".

    Example:
        >>> from hf_clipneg.training import ClipNegTrainingArguments
        >>> check_world_size(ClipNegTrainingArguments(output_dir="/tmp/hf_clipneg_check", report_to="none", use_cpu=True))
    """
    launched, source = launched_world_size()
    trainer_world = int(args.world_size)
    if launched == trainer_world:
        return
    no_gpu = not _has_accelerator()
    if launched > 1 and trainer_world == 1 and no_gpu and not getattr(args, "use_cpu", False):
        fix = (
            "This machine has no GPU and `use_cpu` is not set, so transformers sets up one non-distributed process "
            "while the launcher started several. Add `--use_cpu` to the script's flags (or `use_cpu=True` to "
            "ClipNegTrainingArguments): `accelerate launch --multi_gpu --num_processes 2 examples/train_clipneg.py "
            "... --use_cpu` runs 2 CPU processes. Or start one process without `accelerate launch`."
        )
    else:
        fix = (
            "Launch with as many processes as the Trainer expects (`accelerate launch --num_processes N` / "
            "`torchrun --nproc_per_node N`, `--use_cpu` on a machine without GPUs), or run a single process "
            "without a launcher; check that WORLD_SIZE is not left over in the environment."
        )
    raise LaunchMismatchError(
        f"This process was launched as one of {launched} processes ({source}), but the Trainer's arguments run "
        f"{trainer_world} (args.world_size={trainer_world}, parallel mode {getattr(args.parallel_mode, 'value', args.parallel_mode)}). "
        "The contrastive loss gathers the batches of all launched processes, so training would fail or be "
        f"wrong. {fix}"
    )


def check_learning_rate(args: Any) -> None:
    """Warn when frozen or partly trained towers train at transformers' default learning rate (5e-5, meant for
    fine-tuning whole networks): the new, randomly initialised projections learn slowly at 5e-5."""
    tower_training = getattr(args.tower_training, "value", args.tower_training)
    if tower_training != "full" and args.learning_rate == TRANSFORMERS_DEFAULT_LEARNING_RATE:
        wanted = TOWER_TRAINING_DEFAULTS[tower_training]
        what = "the last tower blocks," if tower_training == "partial" else "only"
        logger.warning(
            "learning_rate=5e-05 is transformers' default, meant for fine-tuning whole networks. With "
            "tower_training=%r %s the new, randomly initialised projections and the logit scale train, and at this "
            "rate the projections learn slowly (README, The CLI: with frozen towers text->image R@1 60.5 %% instead "
            "of 98.0 %% after 2 epochs on 600 synthetic pairs). Pass learning_rate=%g and "
            "per_device_train_batch_size=%d (what `hf-clipneg train` uses with tower_training=%r).",
            tower_training, what, wanted["learning_rate"], wanted["per_device_train_batch_size"], tower_training,
        )


def check_step_count(args: Any, num_rows: int) -> None:
    """Warn when a run whose length follows from its epochs (`max_steps` not set) makes fewer than
    `MIN_OPTIMIZER_STEPS` optimiser steps over `num_rows` training rows: the new projections start random and
    need steps more than epochs. The message gives the batch size that reaches that many steps.

    Example:
        >>> from hf_clipneg.training import ClipNegTrainingArguments
        >>> args = ClipNegTrainingArguments(output_dir="/tmp/hf_clipneg_check", report_to="none", use_cpu=True,
        ...                                 per_device_train_batch_size=64, num_train_epochs=2)
        >>> check_step_count(args, num_rows=600)  # 2 epochs of 10 batches: enough, nothing logged
    """
    if args.max_steps > 0 or num_rows <= 0:
        return
    processes = max(int(args.world_size), 1)
    global_batch = args.per_device_train_batch_size * processes
    batches = math.ceil(num_rows / global_batch)
    steps = math.floor(batches / args.gradient_accumulation_steps * args.num_train_epochs)
    if steps >= MIN_OPTIMIZER_STEPS:
        return
    fitting = num_rows * args.num_train_epochs / (MIN_OPTIMIZER_STEPS * args.gradient_accumulation_steps)
    logger.warning(
        "This run makes %d optimiser step(s): %d training rows in batches of %d (per device %d x %d process(es)), "
        "%g epoch(s), gradient accumulation %d. The new projections start random and learn little in fewer than %d "
        "steps (README, The CLI: 6 steps gave text->image R@1 83.0 where 20 gave 95.0). Train more epochs, or use "
        "a contrastive (global) batch of about %d rows or fewer.",
        steps, num_rows, global_batch, args.per_device_train_batch_size, processes,
        args.num_train_epochs, args.gradient_accumulation_steps, MIN_OPTIMIZER_STEPS, max(2, int(fitting)),
    )


def quiet_pin_memory(args: Any) -> None:
    """Pinned host memory only helps copies to an accelerator; without one torch warns on every dataloader
    ("'pin_memory' argument is set as true but no accelerator is found"). Turn it off there."""
    if getattr(args, "dataloader_pin_memory", False) and (getattr(args, "use_cpu", False) or not _has_accelerator()):
        args.dataloader_pin_memory = False
        logger.debug("dataloader_pin_memory turned off: no accelerator to copy to.")


def check_training_setup(args: Any) -> None:
    """Everything `ClipNegTrainer` checks about its arguments before any work (see the module docstring)."""
    check_world_size(args)
    check_learning_rate(args)
    quiet_pin_memory(args)


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()
