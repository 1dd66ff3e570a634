"""One `ClipNegTrainer` step taken by hand, and the check that two ways of taking it agree (cached vs tower paths)."""

from __future__ import annotations

from typing import Any

import torch


def one_step(trainer: Any, rows: int = 8, seed: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """The loss, the parameter gradients and the batch of one `compute_loss` + backward on the first `rows` training
    rows (`seed`: the random state the step runs with, e.g. for dropout in trained blocks)."""
    model = trainer.model
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    if seed is not None:
        torch.manual_seed(seed)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, batch


def assert_same_step(first: tuple, second: tuple, atol: float = 1e-5) -> set[str]:
    """Assert that two `one_step` results have the same loss and the same gradients; return the parameter names."""
    (loss_a, grads_a, _), (loss_b, grads_b, _) = first, second
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=0)
    assert set(grads_a) == set(grads_b)
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=0, msg=name)
    return set(grads_b)


MINING_OPTIONS = dict(evidence="image_cluster", n_image_clusters=4, n_text_clusters=4, negatives_per_row=2)


def mine_tiny(num_rows: int = 48) -> Any:
    """Synthetic pairs mined with the paper's cluster rule by the tiny towers (2 mined texts per row)."""
    from hf_clipneg.data import make_synthetic_pairs
    from hf_clipneg.mining import MiningConfig, mine_negatives
    from hf_clipneg.testing import build_tiny_dual_encoder

    model, processor = build_tiny_dual_encoder()
    rows = make_synthetic_pairs(num_rows=num_rows, seed=0, image_size=32)
    return mine_negatives(rows, MiningConfig(**MINING_OPTIONS), model, processor)[0]


def tiny_args(tmp_path: Any, **overrides: Any) -> Any:
    """`ClipNegTrainingArguments` for a few quick CPU steps (batch 8, no saving, a log line per step)."""
    from hf_clipneg.training import ClipNegTrainingArguments

    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        logging_steps=1, seed=0, negative_strategy="cluster_weighted",
    )
    values.update(overrides)
    return ClipNegTrainingArguments(**values)


def tiny_trainer(tmp_path: Any, dataset: Any, **overrides: Any) -> Any:
    """A `ClipNegTrainer` of fresh tiny towers on `dataset` with `tiny_args(tmp_path, **overrides)`."""
    from hf_clipneg.testing import build_tiny_dual_encoder
    from hf_clipneg.training import ClipNegTrainer

    model, processor = build_tiny_dual_encoder()
    return ClipNegTrainer(model=model, args=tiny_args(tmp_path, **overrides), train_dataset=dataset,
                          processing_class=processor)


def assert_same_training(make_trainer: Any, eval_rows: Any, eval_atol: float = 1e-5) -> None:
    """Train `make_trainer(cached)` for cached=True and False and assert the same step losses, the same weights
    and the same evaluation on `eval_rows`."""
    import numpy as np
    import pytest

    runs = []
    for cached in (True, False):
        trainer = make_trainer(cached)
        trainer.train()
        runs.append((trainer, trainer.evaluate(eval_rows)))
    (cached, cached_eval), (tower, tower_eval) = runs
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in (cached, tower)]
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-5)
    tower_weights = dict(tower.model.named_parameters())
    for name, weight in cached.model.named_parameters():
        torch.testing.assert_close(weight, tower_weights[name], atol=1e-5, rtol=0, msg=name)
    for key in ("eval_t2i_R@1", "eval_i2t_R@1", "eval_loss"):
        assert cached_eval[key] == pytest.approx(tower_eval[key], abs=eval_atol)
