"""Which weights train and how they are kept in bounds: freezing by tower-training mode, the logit-scale cap, and
clearing the gradients of trained parameters outside the model."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..tower_tails import block_list
from .arguments import TowerTraining


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


class ZeroGradAfterStep(TrainerCallback):
    """Clear the gradients of `module` after every optimiser step, as Trainer does for the model's own: for
    parameters outside the model that the optimiser trains (the sigmoid loss's bias)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.module.zero_grad(set_to_none=True)
