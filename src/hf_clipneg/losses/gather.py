"""All-gather per-example tensors across processes, so every process can contrast against the global batch.

This is the single place where hf_clipneg gathers across processes; the losses, the collator metadata and the
evaluation all call it. Local batches may differ in size (the last batch of an epoch): sizes are exchanged first,
each shard is padded to the largest one for the collective and trimmed again afterwards.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["gather_features", "gather_metadata", "is_distributed", "world_size_and_rank"]


def is_distributed() -> bool:
    """True when `torch.distributed` is initialised with more than one process.

    Example:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size_and_rank() -> tuple[int, int]:
    """`(world_size, rank)` of the default process group, `(1, 0)` when not distributed.

    Example:
        >>> world_size_and_rank()
        (1, 0)
    """
    if not is_distributed():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def _check_tensors(tensors: tuple[Tensor, ...]) -> None:
    for position, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"gather: argument #{position} is a {type(tensor).__name__}, expected a torch.Tensor.")
        if tensor.dim() == 0:
            raise ValueError(
                f"gather: argument #{position} is a 0-d tensor; pass per-example tensors of shape (batch, ...) "
                "(use `tensor.reshape(1)` for a single value)."
            )


def _all_shapes(tensors: tuple[Tensor, ...], world_size: int) -> list[list[tuple[int, ...]]]:
    """shapes[rank][position]: every process's shape of every tensor, exchanged in one collective."""
    ndims = [tensor.dim() for tensor in tensors]
    local = torch.tensor([size for tensor in tensors for size in tensor.shape], dtype=torch.long)
    # The shapes travel on the tensors' own device: NCCL cannot move CPU tensors.
    local = local.to(tensors[0].device)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    shapes: list[list[tuple[int, ...]]] = []
    for flat in gathered:
        values = flat.tolist()
        per_rank, offset = [], 0
        for ndim in ndims:
            per_rank.append(tuple(values[offset : offset + ndim]))
            offset += ndim
        shapes.append(per_rank)
    return shapes


def _pad_to(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(tensor.shape) == shape:
        return tensor.contiguous()
    padded = tensor.new_zeros(shape)
    padded[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return padded


def _gather_one(
    tensor: Tensor,
    shapes: list[tuple[int, ...]],
    position: int,
    rank: int,
    mode: str,
    pad_trailing_dims: bool,
) -> Tensor:
    """mode: "autograd" (differentiable collective), "local" (plain collective, own shard keeps its graph),
    "detached" (plain collective, no graph)."""
    trailing = {shape[1:] for shape in shapes}
    if len(trailing) > 1 and not pad_trailing_dims:
        listing = ", ".join(f"rank {r}: {tuple(s)}" for r, s in enumerate(shapes))
        raise ValueError(
            f"gather: argument #{position} has different trailing dimensions across processes ({listing}). "
            "Only the first (batch) dimension may differ; pad the other dimensions to a common size in the "
            "collator, or pass pad_trailing_dims=True to zero-pad them to the largest size."
        )
    target_trailing = tuple(max(dims) for dims in zip(*(shape[1:] for shape in shapes)))
    max_rows = max(shape[0] for shape in shapes)
    padded = _pad_to(tensor, (max_rows, *target_trailing))

    is_bool = padded.dtype == torch.bool
    if is_bool:  # not every backend reduces or gathers bool tensors
        padded = padded.to(torch.uint8)

    if mode == "autograd":
        import torch.distributed.nn.functional as dist_nn

        with warnings.catch_warnings():
            # Deprecated in torch 2.13 for functional collectives whose backward needs reduce_scatter, which
            # gloo (CPU) lacks; this one falls back to all-to-all on gloo, so keep it while it exists.
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
            pieces = list(dist_nn.all_gather(padded))
    else:
        pieces = [torch.empty_like(padded) for _ in shapes]
        dist.all_gather(pieces, padded)

    if is_bool:
        pieces = [piece.bool() for piece in pieces]
    trimmed = []
    for r, (piece, shape) in enumerate(zip(pieces, shapes)):
        if mode == "local" and r == rank:
            piece = _pad_to(tensor, (max_rows, *target_trailing))
        trimmed.append(piece[: shape[0]])
    return torch.cat(trimmed, dim=0)


def gather_features(
    *tensors: Tensor, gather_with_grad: bool = True, pad_trailing_dims: bool = False
) -> tuple[Tensor, ...]:
    """All-gather each `(B_local, ...)` tensor into `(B_global, ...)`, in rank order, across processes.

    Does nothing (returns the inputs) unless `torch.distributed` is initialised with world size > 1.

    Args:
        *tensors: per-example tensors with the batch on dimension 0. Local batch sizes may differ between
            processes (each process's rows end up contiguous, process 0 first).
        gather_with_grad: `True` (default) uses `torch.distributed.nn.functional.all_gather`, whose backward
            SUMS the gradients that all processes computed for each shard and returns them to the process that
            owns it. Combined with a loss computed identically on every process and DDP's gradient averaging,
            this yields exactly the single-process gradient of the global batch (see
            `WeightedContrastiveLoss`). `False` gathers without autograd and puts this process's own tensor back
            in its slot, so gradients flow only from this process's computation to its local shard (open_clip's
            `gather_with_grad=False`; cheaper, but the gradient is then not the global-batch gradient).
        pad_trailing_dims: zero-pad dimensions other than the first to their largest size across processes
            (e.g. a different number of mined negatives per process) instead of raising.

    Returns:
        A tuple with one gathered tensor per input, even for a single input.

    Example:
        >>> import torch
        >>> images, texts = gather_features(torch.ones(2, 4), torch.zeros(2, 4))  # not distributed: unchanged
        >>> images.shape
        torch.Size([2, 4])
    """
    _check_tensors(tensors)
    if not tensors or not is_distributed():
        return tuple(tensors)
    world_size, rank = world_size_and_rank()
    shapes = _all_shapes(tensors, world_size)
    mode = "autograd" if gather_with_grad else "local"
    return tuple(
        _gather_one(tensor, [shapes[r][position] for r in range(world_size)], position, rank, mode, pad_trailing_dims)
        for position, tensor in enumerate(tensors)
    )


def gather_metadata(*tensors: Tensor, pad_trailing_dims: bool = False) -> tuple[Tensor, ...]:
    """All-gather per-example metadata (cluster ids, indices, weights...) without autograd.

    Same layout rules as `gather_features`; results are detached. Any dtype works (bool is sent as uint8).
    Use it to build the GLOBAL weight matrices `WeightedContrastiveLoss` expects under multi-process training.

    Example:
        >>> import torch
        >>> (cluster_ids,) = gather_metadata(torch.tensor([3, 1, 3]))  # not distributed: unchanged
        >>> cluster_ids.tolist()
        [3, 1, 3]
    """
    _check_tensors(tensors)
    if not tensors or not is_distributed():
        return tuple(tensor.detach() for tensor in tensors)
    world_size, rank = world_size_and_rank()
    shapes = _all_shapes(tensors, world_size)
    return tuple(
        _gather_one(
            tensor.detach(), [shapes[r][position] for r in range(world_size)], position, rank, "detached",
            pad_trailing_dims,
        )
        for position, tensor in enumerate(tensors)
    )
