"""Run under 2 processes (see tests/test_gather_distributed.py): DDP + WeightedContrastiveLoss with gather.

Every process builds the same tiny dual encoder, takes its contiguous share of a fixed batch (shares may be
unequal), computes the global loss with gathered features, backpropagates through DDP and saves its loss and
parameter gradients to OUTPUT_DIR/rank{r}.pt. The test recomputes the same on one process and compares.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/distributed_gather.py OUTPUT_DIR

`--multi_gpu` only selects accelerate's torchrun launcher (`--cpu` with several processes expects mpirun in
accelerate 1.x); the script itself asks for `Accelerator(cpu=True)`, i.e. DDP over gloo on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

IMAGE_DIM, TEXT_DIM, EMBED_DIM = 6, 7, 5


class TinyDualEncoder(nn.Module):
    """Linear 'towers' over random features; the mined texts go through the text tower."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.image_proj = nn.Linear(IMAGE_DIM, EMBED_DIM)
        self.text_proj = nn.Linear(TEXT_DIM, EMBED_DIM)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def forward(self, images, texts, mined_texts=None):
        mined = None if mined_texts is None else self.text_proj(mined_texts)
        return self.image_proj(images), self.text_proj(texts), mined, self.logit_scale


def make_cases() -> list[dict]:
    """Fixed global batches; `sizes` are the per-process shares in rank order (2 processes)."""
    generator = torch.Generator().manual_seed(1234)
    vanilla = {
        "name": "vanilla",
        "sizes": [4, 4],
        "images": torch.randn(8, IMAGE_DIM, generator=generator),
        "texts": torch.randn(8, TEXT_DIM, generator=generator),
    }
    batch, mined = 7, 3
    weights = torch.rand(batch, batch, generator=generator) * 3
    weights[torch.rand(batch, batch, generator=generator) < 0.3] = 0.0  # masked (false-negative) pairs
    weights[0, 5] = weights[5, 0] = weights[2, 6] = 0.0  # cross-process masked pairs
    positives = torch.eye(batch)
    positives[1, 4] = positives[4, 1] = 1.0  # an extra positive across the two processes
    positives[3, 3] = 2.0
    mined_weights = torch.rand(batch, mined, generator=generator) * 2
    mined_weights[4:, mined - 1] = 0.0  # process 1 mined only 2 texts: its third column is padding
    weighted = {
        "name": "weighted",
        "sizes": [4, 3],
        "images": torch.randn(batch, IMAGE_DIM, generator=generator),
        "texts": torch.randn(batch, TEXT_DIM, generator=generator),
        "negative_weights": weights,
        "positive_weights": positives,
        "mined_texts": torch.randn(batch, mined, TEXT_DIM, generator=generator),
        "mined_weights": mined_weights,
        "local_mined_counts": [mined, mined - 1],
    }
    return [vanilla, weighted]


def loss_and_grads(model: nn.Module, loss_fn: nn.Module, case: dict, rows: slice | None = None,
                   mined_count: int | None = None, backward=None) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients for the rows `rows` of a case (all rows when None)."""
    rows = rows if rows is not None else slice(None)
    mined_texts = mined_weights = None
    if "mined_texts" in case:
        mined_texts = case["mined_texts"][rows, :mined_count]
        mined_weights = case["mined_weights"][rows, :mined_count]
    model.zero_grad(set_to_none=True)
    images, texts, mined, logit_scale = model(case["images"][rows], case["texts"][rows], mined_texts)
    loss = loss_fn(
        images, texts, logit_scale,
        negative_weights=case.get("negative_weights"),
        positive_weights=case.get("positive_weights"),
        mined_text_embeds=mined,
        mined_text_weights=mined_weights,
    )
    (backward or torch.Tensor.backward)(loss)
    grads = {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()}
    return loss.item(), {name.removeprefix("module."): grad for name, grad in grads.items()}


def main(output_dir: str) -> None:
    from accelerate import Accelerator

    from hf_clipneg.losses import WeightedContrastiveLoss, gather_features, gather_metadata

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    if world != 2:
        raise SystemExit(f"expected 2 processes, got {world}")
    model = accelerator.prepare(TinyDualEncoder())
    share = make_cases()[0]
    vanilla_rows = {key: share[key][4 * rank : 4 * rank + 4] for key in ("images", "texts")}
    loss_fn = WeightedContrastiveLoss()
    results = {"rank": rank, "world_size": world, "wrapper": type(model).__name__, "cases": {}}
    for case in make_cases():
        start = sum(case["sizes"][:rank])
        rows = slice(start, start + case["sizes"][rank])
        mined_count = case["local_mined_counts"][rank] if "local_mined_counts" in case else None
        loss, grads = loss_and_grads(model, loss_fn, case, rows, mined_count, backward=accelerator.backward)
        (global_rows,) = gather_metadata(torch.arange(rows.start, rows.stop))
        results["cases"][case["name"]] = {"loss": loss, "grads": grads, "gathered_rows": global_rows.tolist()}
    # gather_with_grad=False: plain collective, the local shard keeps its own graph
    local = torch.full((rank + 1, 2), float(rank), requires_grad=True)
    (gathered,) = gather_features(local, gather_with_grad=False)
    (gathered * torch.arange(1, gathered.shape[0] + 1).unsqueeze(1)).sum().backward()
    results["no_grad_gather"] = {"values": gathered.detach().tolist(), "local_grad": local.grad.tolist()}
    # a LOCAL weight matrix under gathering is refused with an explanation
    try:
        with torch.no_grad():
            images, texts, _, logit_scale = model(vanilla_rows["images"], vanilla_rows["texts"])
        loss_fn(images, texts, logit_scale, negative_weights=torch.ones(4, 4))
    except ValueError as err:
        results["local_weights_error"] = str(err)
    # negative control: without gathering, each process only contrasts its own share
    vanilla = make_cases()[0]
    start = sum(vanilla["sizes"][:rank])
    rows = slice(start, start + vanilla["sizes"][rank])
    local_fn = WeightedContrastiveLoss(gather_across_processes=False)
    loss, grads = loss_and_grads(model, local_fn, vanilla, rows, backward=accelerator.backward)
    results["cases"]["vanilla_local_only"] = {"loss": loss, "grads": grads}
    torch.save(results, Path(output_dir) / f"rank{rank}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
