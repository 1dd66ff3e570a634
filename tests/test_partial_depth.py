"""Partial-depth training on cached block inputs: the tail of each tower computes what the whole tower computes,
and the trainer's cached path gives the tower path's losses, gradients and trained weights."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import EfficientNetConfig, EfficientNetModel

from hf_clipneg.block_features import compute_block_inputs
from hf_clipneg.testing import build_tiny_dual_encoder
from hf_clipneg.tower_tails import block_inputs, block_list, run_tail, tail_start
from hf_clipneg.training import ClipNegTrainingArguments
from trainer_steps import assert_same_step, assert_same_training, mine_tiny, one_step, tiny_trainer


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
    return mine_tiny()


def _trainer(tmp_path, dataset, cached, **overrides):
    overrides = {"tower_training": "partial", "trainable_blocks": 1, **overrides}
    return tiny_trainer(tmp_path, dataset, cached_tower_features=cached, **overrides)


@pytest.mark.parametrize("strategy,mined_per_row", [("vanilla", 0), ("cluster_weighted", None)])
def test_cached_block_inputs_give_the_tower_paths_loss_and_gradients(tmp_path, mined, strategy, mined_per_row):
    steps = {}
    for cached in (True, False):
        trainer = _trainer(tmp_path, mined, cached, negative_strategy=strategy, mined_negatives_per_row=mined_per_row)
        assert trainer.cached_tower_features is cached
        assert trainer.tail_starts == ((1, 1) if cached else None)
        steps[cached] = one_step(trainer, seed=1)  # the trainable blocks run with dropout: the same draws on both paths
        assert ("text_block_inputs" in steps[cached][2]) is cached and ("pixel_values" in steps[cached][2]) is not cached
    names = assert_same_step(steps[True], steps[False])
    assert any(".layers.1." in n for n in names) and any("encoder.layer.1." in n for n in names)
    assert not any(".layers.0." in n or "encoder.layer.0." in n for n in names)


def test_partial_depth_training_and_evaluation_match_the_tower_path(tmp_path, mined):
    assert_same_training(
        lambda cached: _trainer(tmp_path / str(cached), mined, cached, max_steps=3, optim="sgd", learning_rate=0.5),
        mined.select(range(16)), eval_atol=1e-5,
    )


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
    steps = {}
    for cached in (True, False):
        trainer = _trainer(tmp_path, mined, cached, tower_training=depth, ttd_weight=1.0, negative_strategy="vanilla")
        assert trainer.cached_tower_features is cached
        if cached:  # frozen: the vision tower's post-block layers run on its cached last-block output
            assert trainer.tail_starts == ((2, None) if depth == "frozen" else (1, 1))
        steps[cached] = one_step(trainer, seed=1)
        assert "tag_input_ids" in steps[cached][2]
    assert_same_step(steps[True], steps[False])
