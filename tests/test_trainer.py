"""ClipNegTrainer: strategies, gradient accumulation, resume, retrieval evaluation, freezing, sampler, Hub push."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import HfArgumentParser, VisionTextDualEncoderModel

from hf_clipneg.training.collator import ClipNegCollator, captions_by_row_id
from hf_clipneg.mining import MiningConfig, NegativeStrategy, mine_negatives
from hf_clipneg.data import make_synthetic_pairs
from hf_clipneg.testing import build_tiny_dual_encoder
from hf_clipneg.training import ClipNegTrainer, ClusterSpreadSampler, set_tower_training
from hf_clipneg.training import ClipNegTrainingArguments, TowerTraining
from hub_fixtures import ALICE_TOKEN, hub, unique_repo  # noqa: F401 - `hub` is a fixture

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def _args(tmp_path, **overrides) -> ClipNegTrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    values.update(overrides)
    return ClipNegTrainingArguments(**values)


@pytest.fixture(scope="module")
def mined():
    pairs = make_synthetic_pairs(num_rows=48, seed=0, image_size=32)
    model, processor = build_tiny_dual_encoder()
    dataset, _ = mine_negatives(
        pairs, MiningConfig(evidence="image_cluster", n_image_clusters=4, n_text_clusters=4, negatives_per_row=2), model=model, processor=processor
    )
    return dataset


def _colour_pairs() -> Dataset:
    return Dataset.from_dict(
        {"image": [Image.new("RGB", (32, 32), c) for c in COLOURS], "caption": [f"a {c} square" for c in COLOURS]}
    )


def _aligned_model(dataset: Dataset, permutation: list[int] | None = None) -> tuple[VisionTextDualEncoderModel, object]:
    """A tiny dual encoder whose projections are solved so that image i and text permutation[i] both map to
    the one-hot vector e_i: retrieval results are then known exactly."""
    model, processor = build_tiny_dual_encoder(projection_dim=16)
    model.eval()
    n = len(dataset)
    captions = list(dataset["caption"])
    if permutation is not None:
        captions = [captions[j] for j in permutation]
    with torch.no_grad():
        pixels = processor.image_processor(images=list(dataset["image"]), return_tensors="pt")["pixel_values"]
        tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")
        image_hidden = model.image_tower_features(pixels)
        text_hidden = model.text_tower_features(**tokens)
        targets = torch.eye(n, 16)
        model.visual_projection.weight.copy_((torch.linalg.pinv(image_hidden) @ targets).T)
        model.text_projection.weight.copy_((torch.linalg.pinv(text_hidden) @ targets).T)
    return model, processor


def test_arguments_parse_strings_into_enums():
    (args,) = HfArgumentParser([ClipNegTrainingArguments]).parse_args_into_dataclasses(
        ["--output_dir", "x", "--negative_strategy", "cluster", "--tower_training", "partial", "--report_to", "none"]
    )
    assert args.negative_strategy is NegativeStrategy.CLUSTER
    assert args.tower_training is TowerTraining.PARTIAL
    assert args.remove_unused_columns is False
    with pytest.raises(ValueError):
        ClipNegTrainingArguments(output_dir="x", negative_strategy="nonsense", report_to="none")


def test_evaluation_reports_known_retrieval_results(tmp_path):
    pairs = _colour_pairs()
    model, processor = _aligned_model(pairs)
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path), eval_dataset=pairs, processing_class=processor)
    metrics = trainer.evaluate()
    assert metrics["eval_t2i_R@1"] == pytest.approx(100.0)
    assert metrics["eval_i2t_R@1"] == pytest.approx(100.0)
    assert metrics["eval_t2i_median_rank"] == pytest.approx(1.0)

    # Texts shifted by one: text i now describes image i+1, so no caption finds its own image first.
    shifted, processor = _aligned_model(pairs, permutation=[(i + 1) % len(pairs) for i in range(len(pairs))])
    trainer = ClipNegTrainer(model=shifted, args=_args(tmp_path), eval_dataset=pairs, processing_class=processor)
    assert trainer.evaluate()["eval_t2i_R@1"] == pytest.approx(0.0)


def test_evaluation_counts_same_caption_as_hit(tmp_path):
    pairs = _colour_pairs()
    model, processor = _aligned_model(pairs)
    # Two rows share a caption: retrieving either image for that caption counts as a hit.
    duplicated = Dataset.from_dict({"image": list(pairs["image"]) + [pairs[0]["image"]],
                                    "caption": list(pairs["caption"]) + [pairs[0]["caption"]]})
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path), eval_dataset=duplicated, processing_class=processor)
    assert trainer.evaluate()["eval_t2i_R@1"] == pytest.approx(100.0)


@pytest.mark.parametrize("strategy", ["vanilla", "random", "cluster", "cluster_weighted"])
def test_every_strategy_trains_and_changes_the_projections(tmp_path, mined, strategy):
    model, processor = build_tiny_dual_encoder()
    before = model.visual_projection.weight.detach().clone()
    frozen_before = model.vision_model.embeddings.patch_embeddings.projection.weight.detach().clone()
    args = _args(tmp_path, negative_strategy=strategy, max_steps=2)
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=mined, processing_class=processor)
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    assert not torch.equal(before, model.visual_projection.weight)
    assert torch.equal(frozen_before, model.vision_model.embeddings.patch_embeddings.projection.weight)


def test_mined_texts_join_the_batch_only_for_cluster_strategies(tmp_path, mined):
    model, processor = build_tiny_dual_encoder()
    for strategy, expect_mined in [("cluster_weighted", True), ("vanilla", False), ("random", False)]:
        for cached, text_key in ((False, "input_ids"), (True, "text_tower_features")):
            trainer = ClipNegTrainer(
                model=model,
                # frozen towers: cached, the batch and the mined texts are text tower features
                args=_args(tmp_path, negative_strategy=strategy, mined_negatives_per_row=None,
                           cached_tower_features=cached, tower_training="frozen"),
                train_dataset=mined, processing_class=processor,
            )
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
            assert ("num_mined" in batch) is expect_mined
            if expect_mined:
                assert batch[text_key].shape[0] == 4 + 4 * int(batch["num_mined"])
                assert batch["negative_weights"].shape == (4, int(batch["num_mined"]))


def test_non_vanilla_strategy_needs_a_mined_dataset(tmp_path):
    model, processor = build_tiny_dual_encoder()
    with pytest.raises(ValueError, match="mined dataset"):
        ClipNegTrainer(model=model, args=_args(tmp_path, negative_strategy="cluster"),
                       train_dataset=_colour_pairs(), processing_class=processor)


def _one_sgd_step(tmp_path, dataset, batch_size, accumulation):
    model, processor = build_tiny_dual_encoder()
    args = _args(
        tmp_path, negative_strategy="cluster_weighted", max_steps=1, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        weight_decay=0.0, train_sampling_strategy="sequential", lr_scheduler_type="constant",
        tower_training="frozen",  # trainable blocks draw dropout masks the manual step below cannot repeat
    )
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    return model, trainer


def test_gradient_accumulation_averages_micro_batch_losses(tmp_path, mined):
    """GA=2 with batch B equals one step on the mean of the two B-batch losses (negatives never cross
    micro-batches), as documented on ClipNegTrainer."""
    subset = mined.select(range(8))
    trained, trainer = _one_sgd_step(tmp_path, subset, batch_size=4, accumulation=2)

    reference, processor = build_tiny_dual_encoder()
    manual = ClipNegTrainer(model=reference,
                            args=_args(tmp_path, negative_strategy="cluster_weighted", tower_training="frozen"),
                            train_dataset=subset, processing_class=processor)
    reference.train()
    losses = []
    for start in (0, 4):
        batch = trainer.data_collator([subset[i] for i in range(start, start + 4)])
        losses.append(manual.compute_loss(reference, batch))
    (sum(losses) / 2).backward()
    with torch.no_grad():
        for param in reference.parameters():
            if param.grad is not None:
                param -= 0.5 * param.grad
    for (name, a), b in zip(trained.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_from_checkpoint_continues_at_the_same_step_and_loss(tmp_path, mined):
    def run(output, max_steps, resume=None):
        model, processor = build_tiny_dual_encoder()
        args = _args(tmp_path, output_dir=str(output), negative_strategy="cluster_weighted", max_steps=max_steps,
                     save_strategy="steps", save_steps=2, learning_rate=1e-2)
        trainer = ClipNegTrainer(model=model, args=args, train_dataset=mined, processing_class=processor)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", 4)
    resumed = run(tmp_path / "resumed", 4, resume=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    full_losses = {log["step"]: log["loss"] for log in full.state.log_history if "loss" in log}
    resumed_losses = {log["step"]: log["loss"] for log in resumed.state.log_history if "loss" in log}
    assert sorted(resumed_losses) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's trainer state
    np.testing.assert_allclose([resumed_losses[s] for s in (3, 4)], [full_losses[s] for s in (3, 4)], rtol=1e-5)
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, msg=name)


def test_partial_training_unfreezes_last_blocks_and_keeps_frozen_parts_in_eval(tmp_path, mined):
    model, processor = build_tiny_dual_encoder()
    frozen = set_tower_training(model, "partial", trainable_blocks=1)
    vision_layers = model.vision_model.layers
    assert all(p.requires_grad for p in vision_layers[-1].parameters())
    assert not any(p.requires_grad for p in vision_layers[0].parameters())
    assert all(p.requires_grad for p in model.vision_model.layernorm.parameters())
    assert not any(p.requires_grad for p in model.text_model.embeddings.parameters())
    assert vision_layers[0] in frozen

    args = _args(tmp_path, negative_strategy="vanilla", max_steps=1, tower_training="partial")
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=mined, processing_class=processor)
    trainer.train()
    assert not model.vision_model.layers[0].training


def test_cluster_spread_sampler_spreads_clusters_and_covers_every_row():
    clusters = [0] * 10 + [1] * 10 + [2] * 10
    sampler = ClusterSpreadSampler(clusters, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(30))
    for start in range(0, 30, 3):
        assert {clusters[i] for i in order[start:start + 3]} == {0, 1, 2}
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_collator_truncates_long_captions_and_pads_cluster_lists(mined):
    _, processor = build_tiny_dual_encoder()
    rows = [copy.deepcopy(mined[i]) for i in range(2)]
    rows[0]["caption"] = "red " * 5000
    rows[1]["similar_image_clusters"] = []
    batch = ClipNegCollator(processor, captions=captions_by_row_id(mined), max_length=16)(rows)
    assert batch["input_ids"].shape[1] <= 16
    assert batch["similar_image_clusters"][1].tolist() == [-1] * batch["similar_image_clusters"].shape[1]


def test_push_to_hub_writes_a_model_card_with_metrics(tmp_path, hub, mined):
    from huggingface_hub import ModelCard

    repo_id = unique_repo("trainer-push")
    pairs = _colour_pairs()
    model, processor = _aligned_model(pairs)
    args = _args(tmp_path, negative_strategy="vanilla", max_steps=1, push_to_hub=True, hub_model_id=repo_id,
                 hub_token=ALICE_TOKEN, hub_strategy="end")
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=mined, eval_dataset=pairs, processing_class=processor)
    trainer.train()
    trainer.evaluate()
    trainer.push_to_hub()
    card = ModelCard.load(repo_id, token=ALICE_TOKEN).content
    assert "t2i_R@1" in card and "Tagami" in card
    assert ALICE_TOKEN not in card
    loaded = VisionTextDualEncoderModel.from_pretrained(repo_id, token=ALICE_TOKEN)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_ttd_term_joins_the_loss_and_training_stays_finite(tmp_path, mined):
    model, processor = build_tiny_dual_encoder()
    args = _args(tmp_path, negative_strategy="cluster_weighted", max_steps=3, ttd_weight=1.0)
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=mined, processing_class=processor)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["tag_mask"].shape[0] == 4 and batch["tag_mask"].any()
    with_ttd = trainer.compute_loss(model, dict(batch)).item()
    trainer.args.ttd_weight = 0.0
    without_ttd = trainer.compute_loss(model, dict(batch)).item()
    assert with_ttd != without_ttd
    trainer.args.ttd_weight = 1.0
    assert np.isfinite(trainer.train().training_loss)


def test_model_card_records_the_losses_and_their_citations(tmp_path, mined):
    model, processor = build_tiny_dual_encoder()
    args = _args(tmp_path, negative_strategy="vanilla", max_steps=1, ttd_weight=0.5, ttd_temperature=0.3)
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=mined, processing_class=processor)
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert '"WeightedContrastiveLoss"' in card and '"TagSelfDistillationLoss"' in card
    assert '"temperature": 0.3' in card
    assert "tagami2024automatic" in card and "jo2024ttd" in card
