"""The quality benchmark's helpers (benchmarks/_quality_lib.py): the trainer's batch order reproduced from its
samplers (used to measure in-batch false negatives), the many-texts rows, category codes and the table statistics."""

import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _quality_lib as Q  # noqa: E402


def _images(n):
    colours = ["red", "blue", "green", "yellow", "white", "black", "purple"]
    return [Image.new("RGB", (16, 16), colours[i % len(colours)]).rotate(i) for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    from hf_clipneg.testing import build_tiny_dual_encoder

    return build_tiny_dual_encoder()


@pytest.fixture(scope="module")
def featured(tiny):
    from hf_clipneg.features import compute_features

    n = 42
    ds = Dataset.from_dict({
        "image": _images(n),
        "caption": [f"a {c} circle {i % 9}" for i, c in enumerate(["red", "blue", "green"] * 14)],
        "colour": [["red", "blue", "green"][i % 3] for i in range(n)],
        "shape": [["circle", "square"][i % 2] for i in range(n)],
    })
    return compute_features(ds, *tiny, device="cpu")


def _trained_batches(tiny, train, output_dir, **kwargs):
    """Row ids of every batch ClipNegTrainer really trains on."""
    from hf_clipneg.training import ClipNegTrainer
    from hf_clipneg.training import ClipNegTrainingArguments

    seen = []

    class Recording(ClipNegTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            seen.append(inputs["row_id"].numpy().copy())
            return super().compute_loss(model, inputs, *a, **kw)

    model, processor = tiny
    args = ClipNegTrainingArguments(output_dir=str(output_dir), report_to="none",
                                    use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                    negative_strategy="vanilla", learning_rate=1e-3,
                                    **{"tower_training": "frozen", **kwargs})  # quality.py's frozen regime
    trainer = Recording(model, args, train_dataset=train, processing_class=processor)
    assert trainer.cached_tower_features
    trainer.train()
    return seen


def _mined(featured, groups=None):
    from hf_clipneg.mining import MiningConfig, mine_negatives

    ds = featured if groups is None else featured.add_column(Q.CROWD_GROUP, groups)
    mined, _ = mine_negatives(ds, MiningConfig(evidence="image_cluster", n_image_clusters=3, n_text_clusters=3,
                                               negatives_per_row=1))
    return mined


def test_random_sampler_order_is_the_trainers(tiny, featured, tmp_path):
    mined = _mined(featured)
    seen = _trained_batches(tiny, mined, tmp_path, max_steps=13, per_device_train_batch_size=8, seed=3)
    expected = Q.sampler_batches(len(mined), 8, 13, seed=3)
    assert [len(b) for b in expected][:6] == [8, 8, 8, 8, 8, 2]  # the last batch of an epoch is partial
    assert len(seen) == 13
    for got, want in zip(seen, expected):
        np.testing.assert_array_equal(got, want)
    assert not all(np.array_equal(a, b) for a, b in zip(expected, Q.sampler_batches(len(mined), 8, 13, seed=4)))


def test_crowded_sampler_order_is_the_trainers(tiny, featured, tmp_path):
    groups = [i % 4 for i in range(len(featured))]
    mined = _mined(featured, groups)
    seen = _trained_batches(tiny, mined, tmp_path, max_steps=11, per_device_train_batch_size=8, seed=1, train_sampler="crowded",
                            crowded_share=1.0, sampler_group_column=Q.CROWD_GROUP)
    expected = Q.sampler_batches(len(mined), 8, 11, seed=1, sampler="crowded", groups=groups, share=1.0)
    assert len(seen) == 11
    for got, want in zip(seen, expected):
        np.testing.assert_array_equal(got, want)
    # fully crowded batches of 8 over groups of 10-11 rows: at most 2 groups per batch
    assert max(len({groups[i] for i in batch}) for batch in expected) <= 2


def test_in_batch_false_negatives_counts_pairs_and_rows():
    category = np.array([0, 0, 0, 1, 1, 2])
    image = np.arange(6)
    text = np.array([0, 1, 2, 3, 4, 4])
    out = Q.in_batch_false_negatives([np.array([0, 1, 2]), np.array([3, 4, 5])], category, image, text)
    # batch 1: 6 ordered same-category pairs; batch 2: 2 (rows 3, 4); exact: rows 4, 5 share a text (2 pairs)
    assert out["category_pair_rate"] == pytest.approx(8 / 12)
    assert out["category_per_row"] == pytest.approx(8 / 6)
    assert out["exact_pair_rate"] == pytest.approx(2 / 12)
    assert Q.in_batch_false_negatives([np.arange(6)], None, image, text)["category_pair_rate"] is None


def test_crowded_batches_hold_more_same_group_pairs_than_random():
    groups = np.repeat(np.arange(20), 50)
    rng_order = Q.sampler_batches(1000, 100, 10, seed=0)
    crowded = Q.sampler_batches(1000, 100, 10, seed=0, sampler="crowded", groups=groups, share=1.0)
    keys = np.arange(1000)
    plain = Q.in_batch_false_negatives(rng_order, groups, keys, keys)["category_pair_rate"]
    full = Q.in_batch_false_negatives(crowded, groups, keys, keys)["category_pair_rate"]
    assert plain < 0.1 < 0.3 < full


def test_many_rows_keep_image_bytes_and_category(tiny, featured):
    from hf_clipneg.features import compute_features, image_keys

    train = Q.benchmark_columns(featured, "image", "caption", Q.codes(Q.category_keys(featured, ["colour", "shape"])))
    rows = Q.many_rows(train, ["{colour} {shape}"])
    assert len(rows) == 2 * len(train)
    assert rows[0]["caption"] == train[0]["caption"] and rows[1]["caption"] == "red circle"
    assert rows["product"][:4] == [0, 0, 1, 1]
    assert rows["category"][:4] == [train[0]["category"]] * 2 + [train[1]["category"]] * 2
    keys, train_keys = image_keys(rows, "image"), image_keys(train, "image")
    assert keys[::2] == train_keys and keys[1::2] == train_keys  # the very bytes: `known=` finds every image
    many = compute_features(rows, *tiny, known=train, device="cpu")
    np.testing.assert_allclose(np.asarray(many["image_features"][::2]), np.asarray(train["image_features"]), atol=1e-6)
    with pytest.raises(KeyError, match="missing"):
        Q.many_rows(train, ["{missing} thing"])


def test_descriptions_skip_missing_attributes():
    row = {"base_colour": "Navy  Blue", "article_type": "Shirts", "gender": "Men", "usage": None, "season": "nan"}
    assert Q.build_descriptions(row) == ["navy blue shirts for men"]


def test_category_codes_are_shared_across_splits():
    table = {}
    a = Q.codes([("red", "men"), ("blue", "men"), ("red", "men")], table)
    b = Q.codes([("blue", "men"), ("green", "women")], table)
    assert a.tolist() == [0, 1, 0] and b.tolist() == [1, 2]


def test_table_statistics():
    assert Q.mean_std([2.0]) == (2.0, 0.0)
    assert Q.paired_delta([3.0, 5.0, 4.0], [1.0, 3.0, 2.0]) == pytest.approx((2.0, 0.0))
    with pytest.raises(ValueError):
        Q.paired_delta([1.0], [1.0, 2.0])
    assert Q.oracle_share(1.0, (2.0, 0.5)) == 0.5
    assert Q.oracle_share(1.0, (0.4, 0.5)) is None  # oracle gain within its own std: no share printed
    assert Q.oracle_share(1.0, (-1.0, 0.1)) is None
