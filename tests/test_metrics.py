"""Retrieval metrics on hand-built embeddings whose right answers are known."""

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_clipneg.metrics import RETRIEVAL_METRIC_PATH, groups_from_captions, load_retrieval_metric, retrieval_metrics


def _angles(degrees):
    """Unit vectors in 2-D at the given angles: similarities are cosines of the angle differences."""
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_perfect_retrieval_is_100_and_rank_1():
    rng = np.random.default_rng(0)
    embeds = np.linalg.qr(rng.normal(size=(12, 12)))[0].astype(np.float32)  # orthonormal rows
    metrics = retrieval_metrics(embeds * 3.0, embeds, ks=(1, 5, 10))  # scale must not matter
    for direction in ("t2i", "i2t", "mean"):
        for k in (1, 5, 10):
            assert metrics[f"{direction}_R@{k}"] == 100.0
    for direction in ("t2i", "i2t"):
        assert metrics[f"{direction}_median_rank"] == 1.0
        assert metrics[f"{direction}_mean_rank"] == 1.0
    assert list(metrics) == [
        "t2i_R@1", "t2i_R@5", "t2i_R@10", "t2i_median_rank", "t2i_mean_rank",
        "i2t_R@1", "i2t_R@5", "i2t_R@10", "i2t_median_rank", "i2t_mean_rank",
        "mean_R@1", "mean_R@5", "mean_R@10",
    ]  # fmt: skip
    assert all(type(value) is float for value in metrics.values())


def test_known_ranks_without_ties():
    images = _angles([0, 40, 80, 120])
    # text 0 (30 deg) sits nearest image 1 (rank 2); text 3 (95 deg) nearest image 2 (rank 2); texts 1, 2 are exact.
    texts = _angles([30, 40, 80, 95])
    metrics = retrieval_metrics(images, texts, ks=(1, 2, 3))
    # t2i ranks: text0 -> [img1 (10), img0 (30)] rank 2; text1 rank 1; text2 rank 1; text3 -> [img2, img3] rank 2
    assert metrics["t2i_R@1"] == 50.0
    assert metrics["t2i_R@2"] == 100.0
    assert metrics["t2i_median_rank"] == 1.5
    assert metrics["t2i_mean_rank"] == 1.5
    # i2t: image0 -> [text0 (30), text1 (40)] rank 1; image1 -> text1 exact rank 1; image2 -> text2 rank 1;
    # image3 (120) -> [text3 (25), text2 (40)] rank 1.
    assert metrics["i2t_R@1"] == 100.0
    assert metrics["mean_R@1"] == 75.0


def test_swapped_pair_with_ties_counts_pessimistically():
    embeds = np.eye(4, dtype=np.float32)
    texts = embeds[[1, 0, 2, 3]]  # texts 0 and 1 swapped; the swapped ones tie (score 0) with two others
    metrics = retrieval_metrics(embeds, texts, ks=(1, 3))
    # text 0: image 1 scores 1; images 0, 2, 3 all score 0 -> the relevant image 0 is ranked after all of them.
    assert metrics["t2i_R@1"] == 50.0
    assert metrics["t2i_R@3"] == 50.0
    assert metrics["t2i_median_rank"] == 2.5  # ranks (4, 4, 1, 1)
    assert metrics["t2i_mean_rank"] == 2.5
    assert metrics["i2t_R@1"] == 50.0


def test_collapsed_embeddings_score_zero_not_100():
    same = np.ones((5, 8), dtype=np.float32)
    metrics = retrieval_metrics(same, same, ks=(1,))
    assert metrics["t2i_R@1"] == 0.0
    assert metrics["i2t_R@1"] == 0.0
    assert metrics["t2i_median_rank"] == 5.0


def test_duplicate_caption_retrieved_first_is_a_hit():
    captions = ["A red circle", "a blue square", "a red  circle ", "a green star"]
    groups = groups_from_captions(captions)
    assert groups.tolist() == [0, 1, 0, 2]
    images = _angles([0, 60, 120, 180])
    texts = _angles([118, 60, 2, 180])  # text 0 lands on image 2 and text 2 on image 0: same caption
    paired = retrieval_metrics(images, texts, ks=(1,))
    grouped = retrieval_metrics(images, texts, text_groups=captions, ks=(1,))
    grouped_ids = retrieval_metrics(images, texts, image_groups=groups, text_groups=groups, ks=(1,))
    assert paired["t2i_R@1"] == 50.0
    assert paired["i2t_R@1"] == 50.0
    # Raw caption strings differ in case/spacing, so they are different groups without normalisation.
    assert grouped["t2i_R@1"] == 50.0
    assert grouped_ids["t2i_R@1"] == 100.0
    assert grouped_ids["i2t_R@1"] == 100.0
    assert grouped_ids["t2i_median_rank"] == 1.0


def test_unpaired_images_and_texts_with_groups():
    images = _angles([0, 90, 180])
    texts = _angles([5, -5, 85, 100, 270])
    image_groups = ["a", "b", "c"]
    text_groups = ["a", "a", "b", "b", "c"]
    metrics = retrieval_metrics(images, texts, image_groups=image_groups, text_groups=text_groups, ks=(1, 2))
    # t2i: the text at 270 deg is 90 deg from both image a (0) and its own image c (180): a tie, so the
    # irrelevant image a counts as ranked first -> rank 2. The other four texts are nearest their own image.
    assert metrics["t2i_R@1"] == 80.0
    assert metrics["t2i_R@2"] == 100.0
    # i2t: image c (180) -> texts at 100 (80 deg) and 270 (90 deg): text "b" at 100 wins -> rank 2.
    assert metrics["i2t_R@1"] == pytest.approx(200 / 3)
    assert metrics["i2t_mean_rank"] == pytest.approx(4 / 3)


def test_chunked_equals_unchunked_and_torch_equals_numpy():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(53, 16)).astype(np.float32)
    texts = (images + 1.5 * rng.normal(size=(53, 16))).astype(np.float32)
    groups = rng.integers(0, 20, size=53)
    full = retrieval_metrics(images, texts, text_groups=groups, ks=(1, 5, 10), chunk_size=1024)
    assert 0.0 < full["t2i_R@1"] < 100.0  # a non-trivial case
    for chunk_size in (1, 7, 52):
        assert retrieval_metrics(images, texts, text_groups=groups, ks=(1, 5, 10), chunk_size=chunk_size) == full
    as_torch = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), text_groups=torch.from_numpy(groups))
    assert as_torch == full
    as_half = retrieval_metrics(torch.from_numpy(images).half(), torch.from_numpy(texts).half(), text_groups=groups)
    assert as_half["t2i_R@1"] == pytest.approx(full["t2i_R@1"], abs=100 / 53 * 2)


def test_prefix_and_trainer_best_metric_lookup(tmp_path):
    from transformers import Trainer, TrainerState, TrainingArguments

    images = _angles([0, 90, 180])
    metrics = retrieval_metrics(images, images, ks=(1,), prefix="eval_")
    assert set(metrics) >= {"eval_t2i_R@1", "eval_i2t_median_rank", "eval_mean_R@1"}
    args = TrainingArguments(
        output_dir=str(tmp_path), metric_for_best_model="t2i_R@1", report_to="none", save_strategy="steps"
    )
    assert args.greater_is_better is True
    fake_trainer = SimpleNamespace(args=args, state=TrainerState())
    assert Trainer._determine_best_metric(fake_trainer, metrics=metrics, trial=None) is True
    assert fake_trainer.state.best_metric == 100.0


def test_k_larger_than_gallery_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.metrics"):
        metrics = retrieval_metrics(np.eye(3), np.eye(3), ks=(1, 10))
    assert metrics["t2i_R@10"] == 100.0
    assert "trivially 100" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"image_embeds": np.eye(3), "text_embeds": np.arange(1.0, 13.0).reshape(4, 3)}, ValueError, "paired"),
        ({"image_embeds": np.eye(3), "text_embeds": np.eye(3)[:, :2]}, ValueError, "dimension 3"),
        ({"image_embeds": np.eye(3), "text_embeds": np.array([[1.0, 0, 0], [0, np.nan, 0], [0, 0, 1]])}, ValueError, "text_embeds row 1"),
        ({"image_embeds": np.eye(3) * [[1], [0], [1]], "text_embeds": np.eye(3)}, ValueError, "image_embeds row 1 is the zero vector"),
        ({"image_embeds": np.eye(3), "text_embeds": np.eye(3), "ks": (0,)}, ValueError, "positive integer"),
        ({"image_embeds": np.eye(3), "text_embeds": np.eye(3), "ks": ()}, ValueError, "empty"),
        ({"image_embeds": np.eye(3), "text_embeds": np.eye(3), "chunk_size": 0}, ValueError, "chunk_size"),
        ({"image_embeds": np.ones(3), "text_embeds": np.eye(3)}, ValueError, "2-D"),
        ({"image_embeds": np.array([["a", "b"]]), "text_embeds": np.eye(2)[:1]}, TypeError, "numeric"),
        ({"image_embeds": np.eye(3), "text_embeds": np.eye(3), "text_groups": [0, 1]}, ValueError, "2 labels"),
        ({"image_embeds": np.eye(3), "text_embeds": np.eye(3), "text_groups": [0, None, 1]}, ValueError, "row 1 is missing"),
        (
            {"image_embeds": np.eye(2), "text_embeds": np.eye(2), "image_groups": ["a", "b"], "text_groups": ["a", "c"]},
            ValueError,
            "text row 1 (group 'c') has no image",
        ),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=None) as info:
        retrieval_metrics(**kwargs)
    assert message in str(info.value)


def test_groups_from_captions_normalisation_and_errors():
    assert groups_from_captions(["A  Cat", "a cat", "dog"], normalise=False).tolist() == [0, 1, 2]
    assert groups_from_captions(["A  Cat", "a cat\n", "dog"]).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="row 1 is empty"):
        groups_from_captions(["a cat", "  "])
    with pytest.raises(TypeError, match="row 0"):
        groups_from_captions([None])


def test_evaluate_module_loads_offline_and_matches(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(2)
    images = rng.normal(size=(20, 8)).astype(np.float32)
    texts = (images + rng.normal(size=(20, 8))).astype(np.float32)
    groups = [f"g{i % 7}" for i in range(20)]
    expected = retrieval_metrics(images, texts, text_groups=groups, ks=(1, 5))

    metric = load_retrieval_metric()
    assert isinstance(metric, evaluate.Metric)
    result = metric.compute(image_embeds=images, text_embeds=texts, text_groups=groups, ks=(1, 5))
    assert result.keys() == expected.keys()
    for key in expected:
        assert math.isclose(result[key], expected[key], rel_tol=0, abs_tol=1e-9), key

    by_path = evaluate.load(RETRIEVAL_METRIC_PATH)
    for start in range(0, 20, 6):  # the usual add_batch-then-compute pattern
        by_path.add_batch(image_embeds=images[start : start + 6], text_embeds=texts[start : start + 6])
    assert by_path.compute(ks=[1, 5]) == retrieval_metrics(images, texts, ks=(1, 5))
