"""Split a tower at its first trainable block: run the frozen prefix once, the trainable tail every step.

With `tower_training="partial"` only the last blocks of each tower (and what follows them: final norm,
head convolution, pooler) train. Everything before them is frozen and deterministic (eval mode), so its
output, the input of the first trainable block, can be computed once per image or caption and cached;
`run_tail` then computes the tower's output from that cached input exactly as the whole tower would.

Supported towers: transformers' EfficientNet (`EfficientNetModel`), ViT (`ViTModel`) and BERT-style text
encoders (`BertModel`; model types whose layers take `(hidden_states, attention_mask)`). For others
`tail_start` returns None and the trainer runs the whole towers every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling

__all__ = ["block_list", "tail_start", "block_inputs", "run_tail", "supports_tail"]


def block_list(tower: nn.Module) -> nn.ModuleList | None:
    """The tower's main stack of blocks: its longest `nn.ModuleList` (ViT/BERT layers, EfficientNet blocks)."""
    lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else None


def _efficientnet_tail(tower: nn.Module, start: int, hidden: torch.Tensor, attention_mask: Any) -> BaseModelOutputWithPooling:
    encoder = tower.encoder
    for block in encoder.blocks[start:]:
        hidden = block(hidden)
    hidden = encoder.top_activation(encoder.top_bn(encoder.top_conv(hidden)))
    pooled = tower.pooler(hidden)
    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled.reshape(pooled.shape[:2]))


def _vit_tail(tower: nn.Module, start: int, hidden: torch.Tensor, attention_mask: Any) -> BaseModelOutputWithPooling:
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=None)
    for layer in tower.layers[start:]:
        hidden = layer(hidden, mask)
    hidden = tower.layernorm(hidden)
    pooled = tower.pooler(hidden) if tower.pooler is not None else None
    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


def _bert_tail(tower: nn.Module, start: int, hidden: torch.Tensor, attention_mask: Any) -> BaseModelOutputWithPooling:
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=attention_mask)
    for layer in tower.encoder.layer[start:]:
        hidden = layer(hidden, mask)
    pooled = tower.pooler(hidden) if tower.pooler is not None else None
    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


_TAILS: dict[str, Callable[..., BaseModelOutputWithPooling]] = {
    "efficientnet": _efficientnet_tail,
    "vit": _vit_tail,
    "bert": _bert_tail,
}


def _tail_of(tower: nn.Module) -> Callable[..., BaseModelOutputWithPooling] | None:
    config = getattr(tower, "config", None)
    tail = _TAILS.get(getattr(config, "model_type", None))
    if tail is None or getattr(config, "is_decoder", False):
        return None
    return tail


def supports_tail(tower: nn.Module) -> bool:
    """True when `run_tail` knows how to finish this tower from a cached block input."""
    return _tail_of(tower) is not None


def tail_start(tower: nn.Module, trainable_blocks: int) -> int | None:
    """Index of the first trainable block when the last `trainable_blocks` blocks train, or None when the tower
    cannot be split (unknown architecture, no blocks, or every block trains). With `trainable_blocks=0` it is
    the number of blocks: the cached value is the last block's output and only what follows the blocks (final
    norm, head convolution, pooler) runs, which gives a frozen tower's full `last_hidden_state` (e.g. the
    spatial map tag self-distillation needs).

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> tower = build_tiny_dual_encoder()[0].text_model
        >>> tail_start(tower, trainable_blocks=1), tail_start(tower, trainable_blocks=0)
        (1, 2)
    """
    blocks = block_list(tower)
    if not supports_tail(tower) or blocks is None or not 0 <= trainable_blocks < len(blocks):
        return None
    return len(blocks) - trainable_blocks


class _PrefixDone(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


@torch.no_grad()
def block_inputs(tower: nn.Module, start: int, **tower_inputs: torch.Tensor) -> torch.Tensor:
    """Run `tower` up to block `start` and return that block's input: (B, C, H, W) for EfficientNet,
    (B, T, D) for ViT/BERT (float, the tower's dtype). The blocks from `start` on do not run; `start` equal to
    the number of blocks returns the last block's output.

    Raises:
        ValueError: the tower never reached block `start` (it is not in the tower's forward pass).
    """
    blocks = block_list(tower)

    def stop_before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _PrefixDone(args[0] if args else kwargs["hidden_states"])

    def stop_after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        raise _PrefixDone(output[0] if isinstance(output, tuple) else output)

    if start < len(blocks):
        handle = blocks[start].register_forward_pre_hook(stop_before, with_kwargs=True)
    else:
        handle = blocks[-1].register_forward_hook(stop_after, with_kwargs=True)
    try:
        tower(**tower_inputs, return_dict=True)
    except _PrefixDone as done:
        return done.hidden
    finally:
        handle.remove()
    raise ValueError(f"{type(tower).__name__} never ran block {start}: cannot cache its input.")


def run_tail(
    tower: nn.Module, start: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> BaseModelOutputWithPooling:
    """The tower's output (`last_hidden_state`, `pooler_output`) computed from `hidden`, the input of block
    `start` (`block_inputs`), running only blocks `start...` and what follows them.

    Args:
        attention_mask: (B, T) 1 for real tokens, for text towers (padding positions are ignored).

    Raises:
        ValueError: the tower's architecture is not supported (see module docstring).

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> tower = model.text_model.eval()
        >>> tokens = processor.tokenizer(["a red circle", "a star"], padding=True, return_tensors="pt")
        >>> hidden = block_inputs(tower, 1, **tokens)
        >>> tail = run_tail(tower, 1, hidden, tokens["attention_mask"]).last_hidden_state
        >>> bool(torch.allclose(tail, tower(**tokens).last_hidden_state, atol=1e-6))
        True
    """
    tail = _tail_of(tower)
    if tail is None:
        raise ValueError(
            f"No cached-tail support for {type(tower).__name__} (model_type "
            f"{getattr(getattr(tower, 'config', None), 'model_type', None)!r}); supported: {sorted(_TAILS)}."
        )
    return tail(tower, start, hidden, attention_mask)
