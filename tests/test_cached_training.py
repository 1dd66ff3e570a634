"""Cached-tower training: the same loss, gradients and trained model as running the frozen towers; a cache
that no longer matches its towers or data is never used; samplers and the logit-scale cap."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from datasets import Dataset, load_dataset
from PIL import Image

from hf_clipneg.features import compute_features, stored_provenance
from hf_clipneg.data import make_synthetic_pairs
from hf_clipneg.testing import build_tiny_dual_encoder
from hf_clipneg.training import ClipNegTrainer, ClipNegTrainingArguments
from hf_clipneg.training.samplers import CrowdedBatchSampler
from trainer_steps import assert_same_step, assert_same_training, mine_tiny, one_step, tiny_args, tiny_trainer



def _args(tmp_path, **overrides):
    return tiny_args(tmp_path, **{"tower_training": "frozen", **overrides})  # the cached tower-feature path


@pytest.fixture(scope="module")
def mined():
    return mine_tiny()


def _trainer(tmp_path, dataset, cached, **overrides):
    return tiny_trainer(tmp_path, dataset, cached_tower_features=cached, **{"tower_training": "frozen", **overrides})


@pytest.mark.parametrize("strategy,mined_per_row", [("vanilla", 0), ("cluster_weighted", 0), ("cluster_weighted", None)])
def test_cached_loss_and_projection_gradients_equal_the_tower_path(tmp_path, mined, strategy, mined_per_row):
    steps = {}
    for cached in (True, False):
        trainer = _trainer(tmp_path, mined, cached, negative_strategy=strategy, mined_negatives_per_row=mined_per_row)
        assert trainer.cached_tower_features is cached
        steps[cached] = one_step(trainer)
        assert ("pixel_values" in steps[cached][2]) is not cached
    names = assert_same_step(steps[True], steps[False])
    assert names == {"visual_projection.weight", "text_projection.weight", "logit_scale"}


def test_cached_training_and_evaluation_match_the_tower_path(tmp_path, mined):
    assert_same_training(
        lambda cached: _trainer(tmp_path / str(cached), mined, cached, max_steps=3, optim="sgd", learning_rate=0.5),
        mined.select(range(16)), eval_atol=1e-4,
    )


def test_cached_path_resumes_to_the_same_losses_and_weights(tmp_path, mined):
    def run(output, resume=None):
        trainer = _trainer(tmp_path, mined, True, output_dir=str(output), max_steps=4, save_strategy="steps", save_steps=2)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    losses = [{log["step"]: log["loss"] for log in t.state.log_history if "loss" in log} for t in (full, resumed)]
    np.testing.assert_allclose([losses[1][s] for s in (3, 4)], [losses[0][s] for s in (3, 4)], rtol=1e-5)
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, msg=name)


def test_features_of_other_towers_are_never_trained_on(tmp_path, mined, caplog):
    other = build_tiny_dual_encoder(seed=1)  # same architecture, other tower weights
    with pytest.raises(ValueError, match="not made by this model's towers"):
        ClipNegTrainer(model=other[0], args=_args(tmp_path, cached_tower_features=True), train_dataset=mined,
                       processing_class=other[1])
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.training"):
        trainer = ClipNegTrainer(model=other[0], args=_args(tmp_path), train_dataset=mined, processing_class=other[1])
    assert trainer.cached_tower_features is False and "not made by this model's towers" in caplog.text
    # compute_features itself recomputes columns that other towers made.
    recomputed = compute_features(mined, *other)
    assert stored_provenance(recomputed) != stored_provenance(mined)
    assert not np.allclose(np.asarray(recomputed["image_features"]), np.asarray(mined["image_features"]))


def test_cached_features_are_refused_with_fully_trainable_towers(tmp_path):
    with pytest.raises(ValueError, match="got tower_training='full'"):
        ClipNegTrainingArguments(output_dir=str(tmp_path), cached_tower_features=True, tower_training="full",
                                 report_to="none")
    model, processor = build_tiny_dual_encoder()
    pairs = make_synthetic_pairs(num_rows=8, seed=0, image_size=32)
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path, tower_training="full", negative_strategy="vanilla"),
                             train_dataset=pairs, processing_class=processor)
    assert trainer.cached_tower_features is False


def test_a_changed_image_file_or_new_weights_invalidate_cached_features(tmp_path):
    model, processor = build_tiny_dual_encoder()
    colours = ["red", "green", "blue", "yellow"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.csv").write_text(
        "image,caption\n" + "".join(f"{tmp_path / f'{i}.png'},a {c} square\n" for i, c in enumerate(colours))
    )

    def features():
        ds = load_dataset("csv", data_files=str(tmp_path / "pairs.csv"), split="train", cache_dir=str(tmp_path / "cache"))
        return np.asarray(compute_features(ds, model, processor, device="cpu")["image_features"])

    first = features()
    np.testing.assert_array_equal(features(), first)  # unchanged files: the same (cached) features
    Image.new("RGB", (32, 32), "purple").save(tmp_path / "2.png")  # same path, new picture
    second = features()
    np.testing.assert_array_equal(second[[0, 1, 3]], first[[0, 1, 3]])
    assert not np.allclose(second[2], first[2])
    with torch.no_grad():
        model.vision_model.embeddings.patch_embeddings.projection.weight.add_(0.1)
    assert not np.allclose(features(), second)


def test_repeated_images_and_captions_are_embedded_once():
    model, processor = build_tiny_dual_encoder()
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "red", "red", "blue", "green")]
    captions = ["a", "b", "a", "c", "b", "a"]
    seen = {"images": 0, "texts": 0}
    model.vision_model.register_forward_hook(lambda m, args, out: seen.__setitem__("images", seen["images"] + len(out.pooler_output)))
    model.text_model.register_forward_hook(lambda m, args, kwargs, out: seen.__setitem__("texts", seen["texts"] + len(out.last_hidden_state)), with_kwargs=True)
    out = compute_features(Dataset.from_dict({"image": images, "caption": captions}), model, processor, batch_size=2)
    assert seen == {"images": 3, "texts": 3}
    features = np.asarray(out["image_features"])
    np.testing.assert_allclose(features[3], features[0], atol=1e-6)
    np.testing.assert_allclose(features[4], features[1], atol=1e-6)
    # A dataset with more captions of the same images reuses what `known` holds: only the new caption runs.
    more = Dataset.from_dict({"image": images[:2], "caption": ["a", "d"]})
    compute_features(more, model, processor, known=out)
    assert seen == {"images": 3, "texts": 4}


def test_crowded_sampler_fills_the_share_of_each_batch_from_one_group():
    groups = np.repeat(np.arange(8), 16)
    sampler = CrowdedBatchSampler(groups, batch_size=16, share=0.5, seed=0)
    order = np.asarray(list(sampler))
    assert len(order) == len(sampler) == 128
    top_share = [np.bincount(groups[batch]).max() / 16 for batch in order.reshape(-1, 16)]
    assert min(top_share) >= 0.5  # the crowded half comes from one group (a group holds a whole batch half)
    plain = [np.bincount(groups[batch]).max() / 16 for batch in np.random.default_rng(0).permutation(128).reshape(-1, 16)]
    assert np.mean(top_share) > np.mean(plain) + 0.2
    sampler.set_epoch(1)
    assert list(sampler) != order.tolist()


def test_trainer_uses_the_crowded_sampler_on_a_group_column(tmp_path, mined):
    trainer = _trainer(tmp_path, mined, True, train_sampler="crowded", crowded_share=1.0, sampler_group_column="image_cluster")
    batches = np.asarray(list(trainer._get_train_sampler())).reshape(-1, 8)
    clusters = np.asarray(mined["image_cluster"])
    assert all(len(set(clusters[b])) <= 2 for b in batches)  # a whole batch from one cluster, or two at a seam
    with pytest.raises(ValueError, match="'product_id'"):
        _trainer(tmp_path, mined, True, train_sampler="crowded", sampler_group_column="product_id")._get_train_sampler()


def test_logit_scale_never_exceeds_its_cap(tmp_path, mined):
    trainer = _trainer(tmp_path, mined, True, negative_strategy="vanilla", max_steps=6, learning_rate=1e-6,
                       max_logit_scale=20.0)
    with torch.no_grad():
        trainer.model.logit_scale.fill_(math.log(50.0))  # above the cap, as after a too-large update
    seen = []
    trainer.add_callback(type("Watch", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, model=None, **kw: seen.append(float(model.logit_scale.detach().exp()))
    })())
    trainer.train()
    assert len(seen) == 6 and max(seen) <= 20.0 + 1e-4
    assert seen[0] == pytest.approx(20.0, abs=1e-3)  # clamped right after the first optimiser step


def test_encoding_runs_without_dropout_and_restores_the_training_mode():
    from hf_clipneg.encoding import encode_images, encode_texts

    model, processor = build_tiny_dual_encoder()
    model.train()
    texts = [encode_texts(model, processor.tokenizer, ["a red circle"], project=True) for _ in range(2)]
    images = [encode_images(model, processor.image_processor, [Image.new("RGB", (32, 32), "red")]) for _ in range(2)]
    torch.testing.assert_close(texts[0], texts[1], rtol=0, atol=0)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)
    assert model.training and model.text_model.training
