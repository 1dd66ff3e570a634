"""GradCache: the gradient of one large contrastive batch with the activation memory of a small chunk.

Gao, Zhang, Han and Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
RepL4NLP 2021. A contrastive loss couples every row of the batch, so the batch cannot simply be split into
micro-batches (gradient accumulation gives the mean of small-batch losses, a different objective). GradCache
splits the work instead:

1. embed the whole batch chunk by chunk without building a graph (`torch.no_grad`), remembering each chunk's
   random-number state;
2. compute the loss on the whole batch from those embeddings (detached leaves) and its gradient with respect to
   every embedding, the logit scale and the loss's own parameters;
3. run each chunk again with a graph (same random numbers, so the same dropout masks) and back-propagate the
   cached embedding gradients into the towers and projections.

The parameter gradients equal those of the single large step (tests/test_gradcache.py, 1e-5 in fp32) for every
negative strategy and weight, mined texts, the cross-process gather and gradient accumulation. Two exceptions,
as in other GradCache implementations: batch-norm layers that train see chunk statistics (and update their
running statistics twice per step), and the TTD term, which needs the whole batch's vision outputs, is refused.
Each chunk but the last runs the model twice, so a step costs about one extra forward pass of all but one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from .collator import META_COLUMNS

TAG_BATCH_KEYS = ("tag_input_ids", "tag_attention_mask", "tag_mask")
_IMAGE_KEYS = ("pixel_values", "image_tower_features", "image_block_inputs")
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "text_tower_features",
              "text_block_inputs")


@dataclass
class BatchExtras:
    """What a collated batch carries besides the model's inputs: mining metadata, mined-text weights, tags."""

    meta: dict[str, torch.Tensor] = field(default_factory=dict)
    mined_weights: torch.Tensor | None = None
    num_mined: int = 0
    tags: dict[str, torch.Tensor] = field(default_factory=dict)


def split_batch(inputs: dict[str, Any]) -> tuple[dict[str, Any], BatchExtras]:
    """Split a `ClipNegCollator` batch into the model's inputs and the `BatchExtras` the losses read."""
    inputs = dict(inputs)
    extras = BatchExtras(
        meta={name: inputs.pop(name) for name in META_COLUMNS if name in inputs},
        mined_weights=inputs.pop("negative_weights", None),
        num_mined=int(inputs.pop("num_mined", 0)),
        tags={name: inputs.pop(name) for name in TAG_BATCH_KEYS if name in inputs},
    )
    return inputs, extras


def batch_rows(inputs: dict[str, Any]) -> int:
    """The number of (image, caption) rows of a batch."""
    image = next((inputs[key] for key in _IMAGE_KEYS if key in inputs), None)
    if image is None:
        raise KeyError(f"The batch has no image input (one of {_IMAGE_KEYS}); keys: {sorted(inputs)}.")
    return int(image.shape[0])


def chunk_inputs(model_inputs: dict[str, Any], rows: int, num_mined: int, start: int, stop: int) -> dict[str, Any]:
    """The model inputs of rows `start:stop`: their images, their captions and their mined texts (texts are
    laid out as the B captions, then each row's m mined texts in row order)."""
    texts = torch.arange(start, stop)
    if num_mined:
        texts = torch.cat([texts, rows + torch.arange(start * num_mined, stop * num_mined)])
    chunk = {}
    for key, value in model_inputs.items():
        if key in _IMAGE_KEYS:
            chunk[key] = value[start:stop]
        elif key in _TEXT_KEYS and value is not None:
            chunk[key] = value[texts.to(value.device)]
        else:
            chunk[key] = value  # e.g. the index of the block cached inputs start at
    return chunk


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


@contextmanager
def _replayed_rng(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> Iterator[None]:
    """Run with the random-number state of the first pass (the same dropout masks), then restore the current one."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        yield


def gradcache_step(trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], mini_batch_size: int) -> torch.Tensor:
    """One training step of `trainer` (a `ClipNegTrainer`) on `inputs` in chunks of `mini_batch_size` rows;
    accumulates the parameter gradients and returns the detached loss (scaled for gradient accumulation, as
    `Trainer.training_step` returns it).

    Raises:
        ValueError: the batch carries TTD tags (the TTD term needs the whole batch's vision outputs).
    """
    model_inputs, extras = split_batch(inputs)
    if extras.tags:
        raise ValueError("mini_batch_size (GradCache) cannot be combined with the TTD term (ttd_weight > 0).")
    rows = batch_rows(model_inputs)
    chunks = [chunk_inputs(model_inputs, rows, extras.num_mined, a, min(a + mini_batch_size, rows))
              for a in range(0, rows, mini_batch_size)]

    # Pass 1: embed every chunk without a graph, except the last one, whose graph is kept (it is back-propagated
    # first in pass 2, so it is never recomputed and the peak memory stays one chunk's activations).
    kept = len(chunks) - 1
    states, image_leaves, text_leaves = [], [], []
    for k, chunk in enumerate(chunks):
        states.append(_rng_state())
        with (torch.enable_grad() if k == kept else torch.no_grad()), trainer.accelerator.no_sync(model):
            with trainer.compute_loss_context_manager():
                outputs = model(**chunk, return_dict=True)
        if k == kept:
            kept_outputs = outputs
        image_leaves.append(outputs.image_embeds.detach().requires_grad_())
        text_leaves.append(outputs.text_embeds.detach().requires_grad_())

    images = torch.cat(image_leaves)
    sizes = [len(leaf) for leaf in image_leaves]
    captions = torch.cat([leaf[:n] for leaf, n in zip(text_leaves, sizes)])
    mined = [leaf[n:] for leaf, n in zip(text_leaves, sizes)]
    texts = torch.cat([captions, *mined]) if extras.num_mined else captions
    with trainer.compute_loss_context_manager():
        loss = trainer.contrastive_loss(model, images, texts, extras)
    loss = loss / trainer.current_gradient_accumulation_steps
    core = trainer.accelerator.unwrap_model(model)
    extra_params = [core.logit_scale, *(p for p in trainer._loss_parameters() if p.requires_grad)]
    grads = torch.autograd.grad(loss, [*image_leaves, *text_leaves, *extra_params], allow_unused=True)
    image_grads, text_grads = grads[: len(chunks)], grads[len(chunks) : 2 * len(chunks)]
    extra_grads = grads[2 * len(chunks) :]

    # Pass 2: back-propagate each chunk's cached embedding gradients (the kept chunk first, the others recomputed
    # with their pass-1 random numbers); parameters sync across processes once, on the final backward.
    order = [kept, *range(kept)]
    for position, k in enumerate(order):
        final = position == len(order) - 1
        with (nullcontext() if final else trainer.accelerator.no_sync(model)):
            if k == kept:
                outputs = kept_outputs
            else:
                with _replayed_rng(states[k]), trainer.compute_loss_context_manager():
                    outputs = model(**chunks[k], return_dict=True)
            surrogate = sum(
                (embeds * grad).sum()
                for embeds, grad in ((outputs.image_embeds, image_grads[k]), (outputs.text_embeds, text_grads[k]))
                if grad is not None
            )
            if final:  # the logit scale and the loss's parameters take their gradient once
                for param, grad in zip(extra_params, extra_grads):
                    if grad is not None:
                        surrogate = surrogate + (param * grad).sum()
            trainer.accelerator.backward(surrogate)
        del outputs
    return loss.detach()
