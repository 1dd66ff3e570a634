"""compute_features: tower outputs, caching, bad images, empty captions."""

import io

import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk
from PIL import Image

from hf_clipneg.features import compute_features, model_digest
from hf_clipneg.data import BadImageError
from hf_clipneg.mining import MiningConfig, mine_negatives


def _synthetic(rows=12):
    try:
        from hf_clipneg.data import make_synthetic_pairs
    except ImportError:  # pragma: no cover - the generator ships with the package
        colours = ["red", "green", "blue"]
        images = [Image.new("RGB", (32, 32), (255 * (i % 3 == 0), 255 * (i % 3 == 1), 255 * (i % 3 == 2))) for i in range(rows)]
        return Dataset.from_dict({"image": images, "caption": [f"a {colours[i % 3]} square" for i in range(rows)]})
    return make_synthetic_pairs(rows, seed=0, image_size=32)


def _png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _count_forwards(model):
    calls = {"vision": 0, "text": 0}
    model.vision_model.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
    model.text_model.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    return calls


def test_features_are_normalised_tower_outputs(tiny_dual_encoder):
    model, processor = tiny_dual_encoder
    ds = _synthetic()
    out = compute_features(ds, model, processor, device="cpu", batch_size=5)
    image = np.array(out["image_features"])
    text = np.array(out["text_features"])
    assert out.features["image_features"].feature.dtype == "float32"
    assert image.shape == (len(ds), 32) and text.shape == (len(ds), 32)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)
    # Row 3 by hand: the vision pooler output and the masked mean of the text states, not the projections.
    with torch.no_grad():
        pixels = processor.image_processor(images=[ds[3]["image"].convert("RGB")], return_tensors="pt")["pixel_values"]
        pooled = model.vision_model(pixel_values=pixels).pooler_output[0]
        tokens = processor.tokenizer([ds[3]["caption"]], return_tensors="pt")
        states = model.text_model(**tokens).last_hidden_state[0]
    np.testing.assert_allclose(image[3], (pooled / pooled.norm()).numpy(), atol=1e-5)
    mean = states.mean(0)
    np.testing.assert_allclose(text[3], (mean / mean.norm()).numpy(), atol=1e-5)
    assert out[0]["image"].mode == "RGB"  # the image column is decoded again afterwards
    assert compute_features(out, model, processor) is out  # precomputed columns are used as they are


def test_second_identical_call_is_served_from_cache(tiny_dual_encoder, tmp_path):
    model, processor = tiny_dual_encoder
    _synthetic().save_to_disk(str(tmp_path / "raw"))
    ds = load_from_disk(str(tmp_path / "raw"))
    calls = _count_forwards(model)
    first = compute_features(ds, model, processor, device="cpu", batch_size=4)
    assert calls["vision"] == 3 and calls["text"] == 3
    second = compute_features(ds, model, processor, device="cpu", batch_size=4)
    assert calls["vision"] == 3 and calls["text"] == 3  # nothing re-embedded
    assert second.cache_files == first.cache_files
    assert second["image_features"] == first["image_features"]
    digest = model_digest(model)
    with torch.no_grad():
        model.vision_model.embeddings.patch_embeddings.projection.weight.add_(0.1)
    assert model_digest(model) != digest
    compute_features(ds, model, processor, device="cpu", batch_size=4)
    assert calls["vision"] == 6  # new weights -> recomputed


def test_bad_images_error_or_skip_and_mining_counts_them(tiny_dual_encoder):
    model, processor = tiny_dual_encoder
    images = [{"bytes": _png((i * 40 % 256, 80, 200 - i * 10)), "path": None} for i in range(10)]
    images[4] = {"bytes": b"not an image", "path": None}
    captions = [f"a red circle {i}" for i in range(10)]
    from datasets import Features, Image as ImageFeature, Value

    ds = Dataset.from_dict(
        {"image": images, "caption": captions}, features=Features({"image": ImageFeature(), "caption": Value("string")})
    )
    with pytest.raises(BadImageError, match="row 4"):
        compute_features(ds, model, processor, device="cpu")
    out = compute_features(ds, model, processor, device="cpu", on_bad_image="skip")
    features = np.array(out.select_columns(["image_features"])["image_features"])
    assert np.isnan(features[4]).all() and not np.isnan(np.delete(features, 4, axis=0)).any()
    mined, stats = mine_negatives(out, MiningConfig(evidence="image_cluster", n_image_clusters=3, n_text_clusters=3, negatives_per_row=2))
    assert stats.rows_skipped == 1 and stats.skipped_row_indices == [4]
    assert 4 not in np.array(mined["negative_indices"])


def test_empty_captions_and_missing_columns_are_named(tiny_dual_encoder):
    model, processor = tiny_dual_encoder
    ds = Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 3, "caption": ["a cat", " ", None]})
    with pytest.raises(ValueError, match=r"empty or missing caption.*\[1, 2\]"):
        compute_features(ds, model, processor, device="cpu")
    with pytest.raises(KeyError, match="'picture'"):
        compute_features(ds, model, processor, image_column="picture")
    with pytest.raises(ValueError, match="on_bad_image"):
        compute_features(ds, model, processor, on_bad_image="ignore")


def test_mine_negatives_end_to_end_from_images(tiny_dual_encoder):
    model, processor = tiny_dual_encoder
    ds = _synthetic(16)
    mined, stats = mine_negatives(
        ds, MiningConfig(evidence="image_cluster", n_image_clusters=4, n_text_clusters=4, negatives_per_row=3), model, processor, device="cpu"
    )
    cluster = np.array(mined["image_cluster"])
    negatives = np.array(mined["negative_indices"])
    assert stats.n_rows == 16
    for row in range(16):
        chosen = negatives[row][negatives[row] >= 0]
        assert (cluster[chosen] != cluster[row]).all()
