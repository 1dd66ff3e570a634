"""Run under 2 processes (see tests/test_sigmoid_loss.py): DDP + SigmoidContrastiveLoss with gather.

The same tiny dual encoder, fixed batches and per-process shares as tests/scripts/distributed_gather.py (imported
from it); each process computes the global sigmoid loss with gathered features, backpropagates through DDP and
saves its loss and gradients (the model's parameters and the loss's own `logit_bias`) to OUTPUT_DIR/rank{r}.pt.
The test recomputes the same on one process and compares.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/sigmoid_gather.py OUTPUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_gather import TinyDualEncoder, loss_and_grads, make_cases  # noqa: E402

#: A bias nearer 0 than SigLIP's -10 so that, in a batch of 8, the negative pairs' gradients are not negligible.
INIT_LOGIT_BIAS = -3.0


def make_loss(gather_across_processes: bool = True) -> nn.Module:
    from hf_clipneg.losses import SigmoidContrastiveLoss

    return SigmoidContrastiveLoss(gather_across_processes=gather_across_processes, init_logit_bias=INIT_LOGIT_BIAS)


def sigmoid_loss_and_grads(model: nn.Module, loss_fn: nn.Module, case: dict, rows: slice | None = None,
                           mined_count: int | None = None, backward=None) -> tuple[float, dict[str, torch.Tensor]]:
    """`loss_and_grads` of distributed_gather.py, plus the gradient of the loss's `logit_bias`."""
    loss_fn.zero_grad(set_to_none=True)
    loss, grads = loss_and_grads(model, loss_fn, case, rows, mined_count, backward=backward)
    grads["logit_bias"] = loss_fn.logit_bias.grad.detach().clone()
    return loss, grads


def main(output_dir: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # DDP over gloo on CPU
    world = accelerator.num_processes
    if world != 2:
        raise SystemExit(f"expected 2 processes, got {world}")
    rank, model, loss_fn = accelerator.process_index, accelerator.prepare(TinyDualEncoder()), make_loss()
    results = {"rank": rank, "wrapper": type(model).__name__, "cases": {}}
    for case in make_cases():
        # this process's contiguous share of the rows, and of the mined columns (fewer on rank 1: padding)
        first = sum(case["sizes"][:rank])
        share = (slice(first, first + case["sizes"][rank]), case.get("local_mined_counts", [None] * world)[rank])
        loss, grads = sigmoid_loss_and_grads(model, loss_fn, case, *share, backward=accelerator.backward)
        results["cases"][case["name"]] = {"loss": loss, "grads": grads}
    # negative control: without gathering, each process only compares its own share
    vanilla = make_cases()[0]
    rows = slice(4 * rank, 4 * rank + 4)
    loss, grads = sigmoid_loss_and_grads(model, make_loss(False), vanilla, rows, backward=accelerator.backward)
    results["cases"]["vanilla_local_only"] = {"loss": loss, "grads": grads}
    # a LOCAL weight matrix under gathering is refused with an explanation
    try:
        with torch.no_grad():
            images, texts, _, logit_scale = model(vanilla["images"][rows], vanilla["texts"][rows])
        loss_fn(images, texts, logit_scale, negative_weights=torch.ones(4, 4))
    except ValueError as err:
        results["local_weights_error"] = str(err)
    torch.save(results, Path(output_dir) / f"rank{rank}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
