"""Partial-depth training on cached block inputs: the tail of each tower computes what the whole tower computes,
and the trainer's cached path gives the tower path's losses, gradients and trained weights."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import EfficientNetConfig, EfficientNetModel

from hf_clipneg.block_features import compute_block_inputs
from hf_clipneg.mining import MiningConfig, mine_negatives
from hf_clipneg.data import make_synthetic_pairs
from hf_clipneg.testing import build_tiny_dual_encoder
from hf_clipneg.tower_tails import block_inputs, block_list, run_tail, tail_start
from hf_clipneg.training import ClipNegTrainer
from hf_clipneg.training import ClipNegTrainingArguments

MINING = MiningConfig(evidence="image_cluster", n_image_clusters=4, n_text_clusters=4, negatives_per_row=2)


def _tiny_efficientnet() -> EfficientNetModel:
    torch.manual_seed(0)
    config = EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)
    return EfficientNetModel(config).eval()


@pytest.mark.parametrize("tower_name", ["vit", "bert", "efficientnet"])
def test_the_tail_from_cached_block_inputs_equals_the_whole_tower(tower_name):
    model, processor = build_tiny_dual_encoder()
    if tower_name == "bert":
        tower = model.text_model.eval()
        inputs = dict(processor.tokenizer(["a red circle", "the big blue square with a dotted ring"], padding=True,
                                          return_tensors="pt"))
    else:
        tower = model.vision_model.eval() if tower_name == "vit" else _tiny_efficientnet()
        inputs = {"pixel_values": torch.randn(3, 3, 32, 32)}
    expected = tower(**inputs)
    for start in range(len(block_list(tower)) + 1):
        hidden = block_inputs(tower, start, **inputs)
        got = run_tail(tower, start, hidden, inputs.get("attention_mask"))
        torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-6, rtol=0)


def test_tail_start_refuses_what_cannot_be_cut():
    model, _ = build_tiny_dual_encoder()
    assert tail_start(model.text_model, 1) == 1
    assert tail_start(model.text_model, 0) == 2  # frozen: the last block's output
    assert tail_start(model.text_model, 2) is None  # every block trains: nothing frozen to cache
    assert tail_start(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3)), 1) is None


@pytest.fixture(scope="module")
def mined():
    model, processor = build_tiny_dual_encoder()
    dataset, _ = mine_negatives(make_synthetic_pairs(num_rows=48, seed=0, image_size=32), MINING, model, processor)
    return dataset


def _trainer(tmp_path, dataset, cached, **overrides):
    model, processor = build_tiny_dual_encoder()
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        logging_steps=1, seed=0, negative_strategy="cluster_weighted", tower_training="partial", trainable_blocks=1,
        cached_tower_features=cached,
    )
    values.update(overrides)
    return ClipNegTrainer(model=model, args=ClipNegTrainingArguments(**values), train_dataset=dataset,
                          processing_class=processor)


@pytest.mark.parametrize("strategy,mined_per_row", [("vanilla", 0), ("cluster_weighted", None)])
def test_cached_block_inputs_give_the_tower_paths_loss_and_gradients(tmp_path, mined, strategy, mined_per_row):
    results = {}
    for cached in (True, False):
        trainer = _trainer(tmp_path, mined, cached, negative_strategy=strategy, mined_negatives_per_row=mined_per_row)
        assert trainer.cached_tower_features is cached
        assert trainer.tail_starts == ((1, 1) if cached else None)
        model = trainer.model
        model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        assert ("text_block_inputs" in batch) is cached and ("pixel_values" in batch) is not cached
        torch.manual_seed(1)  # the trainable blocks run with dropout: the same draws on both paths
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[cached] = (loss.detach(), grads)
    (cached_loss, cached_grads), (tower_loss, tower_grads) = results[True], results[False]
    torch.testing.assert_close(cached_loss, tower_loss, atol=1e-5, rtol=0)
    assert set(cached_grads) == set(tower_grads)
    assert any(".layers.1." in n for n in tower_grads) and any("encoder.layer.1." in n for n in tower_grads)
    assert not any(".layers.0." in n or "encoder.layer.0." in n for n in tower_grads)
    for name in tower_grads:
        torch.testing.assert_close(cached_grads[name], tower_grads[name], atol=1e-5, rtol=0, msg=name)


def test_partial_depth_training_and_evaluation_match_the_tower_path(tmp_path, mined):
    runs = {}
    for cached in (True, False):
        trainer = _trainer(tmp_path / str(cached), mined, cached, max_steps=3, optim="sgd", learning_rate=0.5)
        trainer.train()
        runs[cached] = (trainer, trainer.evaluate(mined.select(range(16))))
    (cached, cached_eval), (tower, tower_eval) = runs[True], runs[False]
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in (cached, tower)]
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-5)
    tower_weights = dict(tower.model.named_parameters())
    for name, weight in cached.model.named_parameters():
        torch.testing.assert_close(weight, tower_weights[name], atol=1e-5, rtol=0, msg=name)
    for key in ("eval_t2i_R@1", "eval_i2t_R@1", "eval_loss"):
        assert cached_eval[key] == pytest.approx(tower_eval[key], abs=1e-5)


def test_block_inputs_follow_the_frozen_weights(mined):
    model, processor = build_tiny_dual_encoder()
    rows = mined.select(range(4))
    first = np.asarray(compute_block_inputs(rows, model, processor, (1, 1), device="cpu")["image_block_inputs"])
    with torch.no_grad():
        model.vision_model.layers[0].mlp.fc2.bias.add_(0.5)
    second = np.asarray(compute_block_inputs(rows, model, processor, (1, 1), device="cpu")["image_block_inputs"])
    assert not np.allclose(first, second)


def test_full_training_or_a_custom_collator_runs_the_towers(tmp_path, mined, caplog):
    with pytest.raises(ValueError, match="tower_training='full'"):
        ClipNegTrainingArguments(output_dir=str(tmp_path), cached_tower_features=True, tower_training="full",
                                 report_to="none")
    assert _trainer(tmp_path, mined, None, tower_training="full").cached_tower_features is False
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, mined, None, trainable_blocks=2)  # every block of the tiny towers trains
    assert trainer.cached_tower_features is False
    assert "cannot be cut before its last 2 block(s)" in caplog.text
    with pytest.raises(ValueError, match="cannot be cut"):
        _trainer(tmp_path, mined, True, trainable_blocks=2)


def test_block_inputs_of_the_same_rows_are_computed_once(tmp_path, mined):
    from datasets import load_from_disk

    model, processor = build_tiny_dual_encoder()
    mined.select(range(6)).save_to_disk(str(tmp_path / "rows"))
    rows = load_from_disk(str(tmp_path / "rows"))
    relabelled = rows.map(lambda row: {"rule": "other"})  # same rows, other columns (e.g. mined with another rule)
    first = compute_block_inputs(rows, model, processor, (1, 1), device="cpu")
    second = compute_block_inputs(relabelled, model, processor, (1, 1), device="cpu")
    block_files = {f["filename"] for f in first.cache_files} - {f["filename"] for f in rows.cache_files}
    assert len(block_files) == 1 and block_files <= {f["filename"] for f in second.cache_files}
    np.testing.assert_array_equal(np.asarray(second["image_block_inputs"]), np.asarray(first["image_block_inputs"]))


@pytest.mark.parametrize("depth", ["frozen", "partial"])
def test_tag_self_distillation_on_cached_inputs_equals_the_tower_path(tmp_path, mined, depth):
    results = {}
    for cached in (True, False):
        trainer = _trainer(tmp_path, mined, cached, tower_training=depth, ttd_weight=1.0, negative_strategy="vanilla")
        assert trainer.cached_tower_features is cached
        if cached:  # frozen: the vision tower's post-block layers run on its cached last-block output
            assert trainer.tail_starts == ((2, None) if depth == "frozen" else (1, 1))
        model = trainer.model
        model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        assert "tag_input_ids" in batch
        torch.manual_seed(1)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results[cached] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (cached_loss, cached_grads), (tower_loss, tower_grads) = results[True], results[False]
    torch.testing.assert_close(cached_loss, tower_loss, atol=1e-5, rtol=0)
    assert set(cached_grads) == set(tower_grads)
    for name in tower_grads:
        torch.testing.assert_close(cached_grads[name], tower_grads[name], atol=1e-5, rtol=0, msg=name)
