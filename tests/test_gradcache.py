"""GradCache (`mini_batch_size`): the same gradients and training as one large step, in chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_clipneg.data import make_synthetic_pairs
from hf_clipneg.mining import MiningConfig, mine_negatives
from hf_clipneg.testing import build_tiny_dual_encoder
from hf_clipneg.training import ClipNegTrainer, ClipNegTrainingArguments

MINING = MiningConfig(evidence="image_cluster", n_image_clusters=4, n_text_clusters=4, negatives_per_row=2)


@pytest.fixture(scope="module")
def mined():
    model, processor = build_tiny_dual_encoder()
    return mine_negatives(make_synthetic_pairs(num_rows=40, seed=0, image_size=32), MINING, model, processor)[0]


def _trainer(tmp_path, dataset, **overrides):
    model, processor = build_tiny_dual_encoder()
    for module in model.modules():  # chunks draw other dropout masks than one large batch: compare without dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=10, learning_rate=0.05,
                  report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, logging_steps=1,
                  negative_strategy="cluster_weighted")
    values.update(overrides)
    return ClipNegTrainer(model=model, args=ClipNegTrainingArguments(**values), train_dataset=dataset,
                          processing_class=processor)


def _gradients(trainer):
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(10)])
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.training_step(model, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"loss.{n}": p.grad.clone() for n, p in trainer.loss_fn.named_parameters() if p.grad is not None})
    return loss, grads


@pytest.mark.parametrize("overrides", [
    dict(negative_strategy="vanilla", mined_negatives_per_row=0),
    dict(mined_negatives_per_row=None),  # cluster_weighted with 2 mined texts per row
    dict(mined_negatives_per_row=None, contrastive_loss="sigmoid"),
    dict(mined_negatives_per_row=None, tower_training="partial", cached_tower_features=False),  # towers run
    dict(mined_negatives_per_row=None, tower_training="partial"),  # cached block inputs
])
def test_gradcache_gradients_equal_the_large_step(tmp_path, mined, overrides):
    plain_loss, plain = _gradients(_trainer(tmp_path, mined, **overrides))
    cached_loss, cached = _gradients(_trainer(tmp_path, mined, mini_batch_size=3, **overrides))  # chunks 3+3+3+1
    torch.testing.assert_close(cached_loss, plain_loss, atol=1e-5, rtol=0)
    assert set(cached) == set(plain) and len(plain) >= 3
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=0, msg=name)


def test_gradcache_training_matches_large_steps_with_accumulation(tmp_path, mined):
    runs = []
    for chunk in (None, 4):
        # Frozen towers: AdamW scales the near-zero gradients of trainable attention keys up to steps of the learning
        # rate, float rounding included; the gradients at partial depth are compared in the test above.
        trainer = _trainer(tmp_path / str(chunk), mined, max_steps=3, gradient_accumulation_steps=2,
                           mini_batch_size=chunk, mined_negatives_per_row=None, tower_training="frozen")
        trainer.train()
        runs.append(trainer)
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in runs]
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5)
    plain = dict(runs[0].model.named_parameters())
    for name, weight in runs[1].model.named_parameters():
        torch.testing.assert_close(weight, plain[name], atol=1e-5, rtol=0, msg=name)


def test_gradcache_is_refused_with_the_ttd_term_or_fp16(tmp_path):
    with pytest.raises(ValueError, match="TTD"):
        ClipNegTrainingArguments(output_dir=str(tmp_path), mini_batch_size=4, ttd_weight=1.0, report_to="none")
    with pytest.raises(ValueError, match="mini_batch_size must be >= 1"):
        ClipNegTrainingArguments(output_dir=str(tmp_path), mini_batch_size=0, report_to="none")
