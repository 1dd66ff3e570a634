"""ClipNegTrainer with the sigmoid (SigLIP) loss: the loss's bias trains, is checkpointed and resumes."""

from __future__ import annotations

import math

import pytest
import torch

from hf_clipneg.data import make_synthetic_pairs
from hf_clipneg.losses import SIGLIP_INIT_LOGIT_BIAS, SigmoidContrastiveLoss, WeightedContrastiveLoss
from hf_clipneg.mining import MiningConfig, mine_negatives
from hf_clipneg.testing import build_tiny_dual_encoder
from hf_clipneg.training import ClipNegTrainer, ClipNegTrainingArguments


@pytest.fixture(scope="module")
def mined():
    model, processor = build_tiny_dual_encoder()
    rows = make_synthetic_pairs(num_rows=32, seed=0, image_size=32)
    return mine_negatives(rows, MiningConfig(evidence="image_cluster", n_image_clusters=4, n_text_clusters=4), model,
                          processor)[0]


def _trainer(tmp_path, dataset, **overrides):
    model, processor = build_tiny_dual_encoder()
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=0.05,
                  report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
                  contrastive_loss="sigmoid", negative_strategy="cluster_weighted")
    values.update(overrides)
    return ClipNegTrainer(model=model, args=ClipNegTrainingArguments(**values), train_dataset=dataset,
                          processing_class=processor)


def test_the_sigmoid_loss_trains_its_bias_with_the_rule_weights(tmp_path, mined):
    trainer = _trainer(tmp_path, mined, max_steps=3)
    assert isinstance(trainer.loss_fn, SigmoidContrastiveLoss)
    assert math.isclose(float(trainer.model.logit_scale), math.log(10), abs_tol=1e-6)  # SigLIP's start
    trainer.train()
    assert float(trainer.loss_fn.logit_bias) != SIGLIP_INIT_LOGIT_BIAS
    assert isinstance(_trainer(tmp_path, mined, contrastive_loss="infonce").loss_fn, WeightedContrastiveLoss)


def test_the_sigmoid_loss_bias_resumes_from_a_checkpoint(tmp_path, mined):
    straight = _trainer(tmp_path / "a", mined, max_steps=4, save_strategy="steps", save_steps=2)
    straight.train()
    resumed = _trainer(tmp_path / "b", mined, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    torch.testing.assert_close(resumed.loss_fn.logit_bias, straight.loss_fn.logit_bias, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.model.logit_scale, straight.model.logit_scale, atol=1e-6, rtol=0)


def test_an_unknown_contrastive_loss_is_refused(tmp_path):
    with pytest.raises(ValueError, match="contrastive_loss must be 'infonce' or 'sigmoid'"):
        ClipNegTrainingArguments(output_dir=str(tmp_path), contrastive_loss="softmax", report_to="none")
