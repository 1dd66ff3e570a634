"""The procedural demo data: determinism, the near-duplicate structure, captions and images."""

import io
from collections import Counter, defaultdict

import numpy as np
import pytest
from datasets import Image
from PIL import Image as PILImage

from hf_clipneg.data import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    make_synthetic_pairs,
    make_synthetic_splits,
)
from hf_clipneg.testing import build_tiny_tokenizer

ATTRIBUTES = ("shape", "colour", "size", "position", "texture")


@pytest.fixture(scope="module")
def pairs():
    return make_synthetic_pairs(num_rows=96, seed=0, image_size=32)


def _raw_bytes(dataset):
    return [value["bytes"] for value in dataset.cast_column("image", Image(decode=False))["image"]]


def _pixels(dataset):
    return np.stack([np.asarray(image, dtype=np.float32) for image in dataset["image"]])


def test_same_seed_same_bytes_and_captions_other_seed_differs():
    first = make_synthetic_pairs(num_rows=24, seed=7, image_size=32)
    second = make_synthetic_pairs(num_rows=24, seed=7, image_size=32)
    other = make_synthetic_pairs(num_rows=24, seed=8, image_size=32)
    assert _raw_bytes(first) == _raw_bytes(second)
    assert first["caption"] == second["caption"] and first["object_id"] == second["object_id"]
    assert all(a != b for a, b in zip(_raw_bytes(first), _raw_bytes(other)))
    assert first["caption"] != other["caption"]


def test_columns_images_size_and_mode(pairs):
    assert pairs.column_names == ["image", "caption", "object_id", *ATTRIBUTES]
    assert isinstance(pairs.features["image"], Image)
    for row in pairs.select(range(5)):
        image = row["image"]
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
    assert make_synthetic_pairs(num_rows=2, image_size=48)[0]["image"].size == (48, 48)


def test_pngs_decode_independently_of_datasets(pairs):
    decoded = PILImage.open(io.BytesIO(_raw_bytes(pairs)[0]))
    decoded.load()
    assert np.array_equal(np.asarray(decoded), np.asarray(pairs[0]["image"]))


def test_many_rows_per_object_with_balanced_groups(pairs):
    counts = Counter(pairs["object_id"])
    assert len(counts) == 96 // 8
    assert set(counts.values()) == {8}
    uneven = Counter(make_synthetic_pairs(num_rows=50, num_objects=7, image_size=16)["object_id"])
    assert len(uneven) == 7 and set(uneven.values()) <= {7, 8} and sum(uneven.values()) == 50
    assert len(set(make_synthetic_pairs(num_rows=30, variants_per_object=10, image_size=16)["object_id"])) == 3


def test_captions_of_one_object_share_all_attribute_words(pairs):
    by_object = defaultdict(list)
    for row in pairs:
        by_object[row["object_id"]].append(row)
    wordings = set()
    for rows in by_object.values():
        first = rows[0]
        for row in rows:
            assert all(row[name] == first[name] for name in ATTRIBUTES)
            padded = f" {row['caption']} "
            for name in ATTRIBUTES:
                assert f" {row[name]} " in padded, (name, row["caption"])
            wordings.add(row["caption"].replace(row["position"], "POSITION").split()[0])
    assert len(wordings) >= 3  # captions are paraphrased, not one fixed template


def test_attribute_values_come_from_the_vocabulary(pairs):
    assert set(pairs["shape"]) <= set(SHAPES) and set(pairs["colour"]) <= set(COLOURS)
    assert set(pairs["size"]) <= set(SIZES) and set(pairs["texture"]) <= set(TEXTURES)
    assert set(pairs["position"]) <= set(POSITIONS)
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer(list(pairs["caption"]))["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)


def test_variants_of_one_object_are_near_identical(pairs):
    pixels = _pixels(pairs).reshape(len(pairs), -1)
    ids = np.asarray(pairs["object_id"])
    distance = np.stack([np.abs(pixels - row).mean(axis=1) for row in pixels])
    same = ids[:, None] == ids[None]
    off_diagonal = ~np.eye(len(ids), dtype=bool)
    assert distance[same & off_diagonal].mean() * 2 < distance[~same].mean()
    assert distance[same & off_diagonal].min() > 0  # jittered, never byte-identical copies


def test_splits_share_prototypes_but_not_rows():
    splits = make_synthetic_splits(num_train=48, num_eval=12, seed=3, image_size=24)
    assert {name: len(split) for name, split in splits.items()} == {"train": 48, "validation": 12, "test": 12}
    train = splits["train"]
    attributes = {row["object_id"]: tuple(row[name] for name in ATTRIBUTES) for row in train}
    assert len(attributes) == 6
    for name in ("validation", "test"):
        for row in splits[name]:
            assert attributes[row["object_id"]] == tuple(row[a] for a in ATTRIBUTES)
        assert not set(_raw_bytes(splits[name])) & set(_raw_bytes(train))
    assert _raw_bytes(splits["validation"]) != _raw_bytes(splits["test"])
    again = make_synthetic_splits(num_train=48, num_eval=12, seed=3, image_size=24)
    assert _raw_bytes(again["test"]) == _raw_bytes(splits["test"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_rows": 0}, "num_rows"),
        ({"num_rows": 4, "num_objects": 5}, "num_objects"),
        ({"num_rows": 4, "num_objects": 2, "variants_per_object": 2}, "not both"),
        ({"num_rows": 4, "image_size": 8}, "image_size"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_pairs(**kwargs)

