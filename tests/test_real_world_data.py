"""Issue #15: data as it comes from real shops and phones. Each test turns one reported case into a check whose
expected value is the right answer (not what the code happened to return)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image, ImageOps

from hf_clipneg.training.collator import ClipNegCollator
from hf_clipneg.data import BadImageError, RemoteImageError, load_pairs, map_cache_file, to_rgb
from hf_clipneg.features import compute_features
from hf_clipneg.losses import weighted_contrastive_loss
from hf_clipneg.metrics import retrieval_metrics, trivial_recall_ks
from hf_clipneg.mining import MiningConfig, group_codes, mine_negatives
from hf_clipneg.retrieval import ClipNegRetriever
from hf_clipneg.testing import build_tiny_dual_encoder
from hf_clipneg.training import ClipNegTrainer
from hf_clipneg.training import ClipNegTrainingArguments

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]


@pytest.fixture
def tiny():
    return build_tiny_dual_encoder()


def _args(tmp_path, **overrides) -> ClipNegTrainingArguments:
    values = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                  use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    values.update(overrides)
    return ClipNegTrainingArguments(**values)


def _squares(n: int = 8) -> list[Image.Image]:
    images = []
    for i in range(n):
        image = Image.new("RGB", (16, 16), COLOURS[i % len(COLOURS)])
        image.paste((i * 30 % 256, 255 - i * 20, 40), (0, 0, 4 + i % 8, 8))
        images.append(image)
    return images


# ------------------------------------------------------------------------------------------- 1. images


def _phone_photo() -> tuple[bytes, Image.Image]:
    """A JPEG stored 80x40 (sideways) with EXIF Orientation=6, and the picture as it should be seen (40x80)."""
    stored = Image.new("RGB", (80, 40), "white")
    stored.paste((200, 0, 0), (0, 0, 20, 40))  # a red band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    data = buffer.getvalue()
    return data, ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def test_exif_orientation_is_applied_in_every_path_as_datasets_does(tiny, tmp_path):
    model, processor = tiny
    data, upright = _phone_photo()
    assert upright.size == (40, 80)
    (tmp_path / "photo.jpg").write_bytes(data)
    (tmp_path / "pairs.csv").write_text("image,caption\nphoto.jpg,a red dress\n")
    pairs = load_pairs(str(tmp_path / "pairs.csv"))
    from_datasets = pairs[0]["image"]  # what `datasets` itself decodes
    assert from_datasets.size == (40, 80)
    expected = np.asarray(from_datasets.convert("RGB"))
    for value in (str(tmp_path / "photo.jpg"), data, {"bytes": data, "path": None}, from_datasets,
                  Image.open(tmp_path / "photo.jpg")):
        decoded = to_rgb(value)
        assert decoded.size == (40, 80)
        np.testing.assert_array_equal(np.asarray(decoded), expected)

    # training (collator), mining (features) and retrieval all see the upright picture
    pixels = processor.image_processor(images=[from_datasets.convert("RGB")], return_tensors="pt")["pixel_values"]
    raw_row = pairs.cast_column("image", type(pairs.features["image"])(decode=False))[0]
    batch = ClipNegCollator(processor)([{**raw_row, "row_id": 0}])
    torch.testing.assert_close(batch["pixel_values"], pixels)
    upright_ds = Dataset.from_dict({"image": [from_datasets.convert("RGB")], "caption": ["a red dress"]})
    features = np.asarray(compute_features(pairs, model, processor, device="cpu")["image_features"])
    expected_features = np.asarray(compute_features(upright_ds, model, processor, device="cpu")["image_features"])
    np.testing.assert_allclose(features, expected_features, atol=1e-6)
    retriever = ClipNegRetriever(model, processor, device="cpu")
    np.testing.assert_allclose(
        retriever.embed_images([str(tmp_path / "photo.jpg")], show_progress=False),
        retriever.embed_images([from_datasets.convert("RGB")], show_progress=False), atol=1e-6,
    )


def test_damaged_exif_does_not_fail_decoding(monkeypatch, caplog):
    data, _ = _phone_photo()
    start = data.find(b"Exif\x00\x00")
    damaged = data[: start + 6] + b"XXXX" + data[start + 10 :]  # the TIFF header of the EXIF block is garbage
    from datasets import Image as ImageFeature

    expected = np.asarray(ImageFeature().decode_example({"bytes": damaged, "path": None}).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(to_rgb(damaged)), expected)
    assert to_rgb(damaged).size == (80, 40)  # the orientation cannot be read: the image as stored

    def broken(*args, **kwargs):
        raise SyntaxError("corrupt EXIF")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.data.images"):
        image = to_rgb(data, row=7)
    assert image.size == (80, 40) and "EXIF block of the image in column 'image', row 7 is damaged" in caplog.text


def test_light_grey_16_bit_png_stays_light_grey(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 50000, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    rgb = np.asarray(to_rgb(str(path)))
    assert (rgb == round(50000 / 65535 * 255)).all()  # 195: brightness relative to the 16-bit range
    ramp = Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 100))  # dark values 0..6300
    assert np.asarray(to_rgb(ramp)).max() == round(6300 / 65535 * 255)  # no stretch to 255


def test_decompression_bomb_error_names_the_limit(monkeypatch, tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64), "red").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadImageError) as err:
        to_rgb(str(path), row=3)
    message = str(err.value)
    assert "PIL.Image.MAX_IMAGE_PIXELS" in message and "now 100 pixels" in message and "row 3" in message
    assert "raise it" in message


# ------------------------------------------------------------------------------------------- 2. feature cache


def test_rewritten_image_file_gets_new_features(tiny, tmp_path):
    model, processor = tiny
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("image,caption\n0.png,a red square\n1.png,a blue square\n2.png,a green square\n")
    first = np.asarray(compute_features(load_pairs(str(tmp_path / "pairs.csv")), model, processor, device="cpu")["image_features"])
    new_picture = Image.new("RGB", (24, 12), "yellow")
    new_picture.paste((0, 0, 0), (0, 0, 6, 12))
    new_picture.save(tmp_path / "0.png")  # same path, another picture
    second = np.asarray(compute_features(load_pairs(str(tmp_path / "pairs.csv")), model, processor, device="cpu")["image_features"])
    expected = np.asarray(compute_features(
        Dataset.from_dict({"image": [new_picture], "caption": ["x"]}), model, processor, device="cpu")["image_features"])
    np.testing.assert_allclose(second[0], expected[0], atol=1e-6)
    assert not np.allclose(first[0], second[0], atol=1e-3)
    np.testing.assert_allclose(second[1:], first[1:], atol=1e-6)


def test_read_only_dataset_folder_caches_in_the_datasets_cache(tiny, tmp_path, monkeypatch):
    """Portable half: a folder reported read-only sends the map's cache file to the datasets cache folder."""
    model, processor = tiny
    Dataset.from_dict({"image": _squares(3), "caption": ["a", "b", "c"]}).save_to_disk(str(tmp_path / "saved"))
    pairs = load_pairs(str(tmp_path / "saved"))
    saved = os.path.realpath(tmp_path / "saved")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.path.realpath(path) == saved else real_access(path, mode, **kw))
    from datasets import config

    assert map_cache_file(pairs, "abc").startswith(str(config.HF_DATASETS_CACHE))
    out = compute_features(pairs, model, processor, device="cpu")
    assert all(not f["filename"].startswith(saved) for f in out.cache_files)
    assert not [name for name in os.listdir(saved) if name.startswith(("cache-", "tmp"))]


READ_ONLY_SCRIPT = textwrap.dedent("""
    import sys
    from hf_clipneg.data import load_pairs
    from hf_clipneg.features import compute_features
    from hf_clipneg.mining import MiningConfig, mine_negatives
    from hf_clipneg.testing import build_tiny_dual_encoder
    model, processor = build_tiny_dual_encoder()
    for source in sys.argv[1:]:
        out = compute_features(load_pairs(source), model, processor, device="cpu")
        mined, _ = mine_negatives(out, MiningConfig(n_image_clusters=2, n_text_clusters=2, negatives_per_row=1))
        print("OK", source, len(mined))
""")


def test_read_only_mount_really_works(tmp_path):
    """Faithful half: the data folder is a read-only bind mount (root ignores file permissions, not a read-only
    mount). Before the fix: `[Errno 30] Read-only file system` from a temporary file beside the saved dataset."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare/mount are not available")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot create a mount namespace here")
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    for i, image in enumerate(_squares(4)):
        image.save(data / "imgs" / f"{i}.png")
    (data / "pairs.csv").write_text("image,caption\n" + "".join(f"imgs/{i}.png,square {i}\n" for i in range(4)))
    (data / "rel.csv").write_text("image,caption\n" + "".join(f"imgs/{i}.png,square {i}\n" for i in range(4)))
    load_pairs(str(data / "pairs.csv")).save_to_disk(str(data / "saved"))
    Dataset.from_dict({"image": [f"../imgs/{i}.png" for i in range(4)], "caption": [f"s{i}" for i in range(4)]}).save_to_disk(
        str(data / "saved_relative"))
    (tmp_path / "run.py").write_text(READ_ONLY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    sources = " ".join(str(data / name) for name in ("pairs.csv", "saved", "saved_relative"))
    command = (f"mount --bind {data} {data} && mount -o remount,bind,ro {data} && touch {data}/x 2>/dev/null; "
               f"test ! -e {data}/x && cd {data} && {sys.executable} {tmp_path / 'run.py'} {sources}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", command], env=env, capture_output=True, text=True, timeout=300)
    if "Permission denied" in done.stderr and "mount" in done.stderr:
        pytest.skip("bind mounts are not permitted here")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("OK") == 3


# ------------------------------------------------------------------------------------------- 3. metadata


def _shop(n: int = 8, with_missing: bool = False) -> Dataset:
    products = [f"SKU-{i // 2:03d}" for i in range(n)]
    if with_missing:
        products[-1] = None
    return Dataset.from_dict({
        "image": _squares(n),
        "caption": [f"a {COLOURS[i % 8]} bag" for i in range(n)],
        "product_id": products,
        "category": ["Wallets|Grey|Women" if i % 2 else "Bags|Red|Men" for i in range(n)],
    })


def test_group_codes_accept_any_type():
    assert group_codes(["SKU-000", "SKU-001", "SKU-000", None, "Wallets|Grey|Women"]).tolist() == [0, 1, 0, -1, 2]
    assert group_codes([7, 7, 3, float("nan")]).tolist() == [0, 0, 1, -1]
    with pytest.raises(TypeError, match="group column 'tags'.*row 0"):
        group_codes([["a"]], column="tags")


def test_string_groups_in_loading_vanilla_training_and_evaluation(tiny, tmp_path):
    model, processor = tiny
    pairs = load_pairs(_shop(), group_column="product_id")
    assert pairs["group"][:3] == ["SKU-000", "SKU-000", "SKU-001"]
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path, negative_strategy="vanilla", retrieval_group_column="group"),
                             train_dataset=pairs, eval_dataset=pairs, processing_class=processor)
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_groups"] == 4.0  # 8 rows, 4 products
    with_missing = load_pairs(_shop(with_missing=True), group_column="product_id", on_missing_group="keep")
    assert with_missing["group"][-1] is None
    assert trainer.evaluate(with_missing)["eval_groups"] == 5.0  # the row without a product is a group of its own
    with pytest.raises(ValueError, match="group column 'product_id' has no value in row 7"):
        load_pairs(_shop(with_missing=True), group_column="product_id")


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("strategy", ["vanilla", "random", "cluster", "cluster_weighted"])
def test_string_groups_train_with_every_strategy_and_path(tiny, tmp_path, strategy, cached):
    model, processor = tiny
    shop = _shop(with_missing=True)
    config = MiningConfig(strategy="cluster", evidence="group", group_column="product_id", n_image_clusters=2,
                          n_text_clusters=2, negatives_per_row=1)
    mined, stats = mine_negatives(shop, config, model, processor)
    assert mined["group"] == [0, 0, 1, 1, 2, 2, 3, -1]  # codes of "SKU-000", ... and the missing value
    assert stats.group_pair_rate is not None
    args = _args(tmp_path, negative_strategy=strategy, cached_tower_features=cached, tower_training="frozen")
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=mined, processing_class=processor)
    assert trainer.cached_tower_features is cached
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    assert batch["group"].tolist() == [0, 0, 1, 1, 2, 2, 3, -1]  # one dataset-wide code table
    assert batch["row_index"].tolist() == list(range(8))
    if strategy in ("cluster", "cluster_weighted"):
        from hf_clipneg.mining import pair_weights

        weights, _ = pair_weights({k: v for k, v in batch.items() if k in ("group", "image_features", "row_id")},
                                  trainer.mining_config)
        assert weights[0, 1] == 0 and weights[6, 7] > 0 and weights[7, 6] > 0  # same product masked; None is alone
    result = trainer.train()
    assert np.isfinite(result.training_loss)


def test_user_columns_named_group_and_row_id_are_left_alone(tiny, tmp_path):
    model, processor = tiny
    shop = _shop().add_column("group", ["Wallets|Grey|Women"] * 8).add_column("row_id", [f"r{i}" for i in range(8)])
    config = MiningConfig(strategy="cluster", evidence="group", group_column="product_id", n_image_clusters=2,
                          n_text_clusters=2, negatives_per_row=1)
    mined, _ = mine_negatives(shop, config, model, processor)
    assert mined["group"] == ["Wallets|Grey|Women"] * 8  # the user's column, untouched
    assert mined["row_id_original"] == [f"r{i}" for i in range(8)] and mined["row_id"] == list(range(8))
    for strategy in ("vanilla", "cluster"):
        trainer = ClipNegTrainer(model=model, args=_args(tmp_path, negative_strategy=strategy, cached_tower_features=False),
                                 train_dataset=mined, eval_dataset=shop, processing_class=processor)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert batch["group"].tolist() == [0, 0, 1, 1]  # codes of product_id, not of the user's `group`
        trainer.train()
        assert trainer.evaluate()["eval_groups"] == 8.0
    # a plain (unmined) dataset with such columns trains too
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path, negative_strategy="vanilla"), train_dataset=shop,
                             processing_class=processor)
    assert trainer.data_collator([trainer.train_dataset[i] for i in range(2)])["row_id"].tolist() == [0, 1]
    trainer.train()


def test_collator_on_its_own_names_a_non_integer_group_column(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="Column 'group' holds 'SKU-000'.*work with ClipNegTrainer, which maps them"):
        ClipNegCollator(processor)([{"image": _squares(1)[0], "caption": "a bag", "group": "SKU-000"}])


# ------------------------------------------------------------------------------------------- 4. URLs


def test_image_urls_are_refused_at_load_time_naming_the_row(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "local.png")
    (tmp_path / "pairs.csv").write_text(
        "image,caption\nlocal.png,a local image\nhttps://example.com/shoe.jpg,a shoe\nhttp://example.com/bag.png,a bag\n")
    with pytest.raises(RemoteImageError) as err:
        load_pairs(str(tmp_path / "pairs.csv"))
    message = str(err.value)
    assert "row 1: 'https://example.com/shoe.jpg'" in message and "row 2" in message and "Download them first" in message
    kept = load_pairs(str(tmp_path / "pairs.csv"), on_missing_image="skip")
    assert kept["caption"] == ["a local image"]
    with pytest.raises(BadImageError, match="is a URL"):
        to_rgb("https://example.com/shoe.jpg", row=1)


# ------------------------------------------------------------------------------------------- 5. text length


def test_long_caption_gets_the_same_vector_in_retrieval_training_and_evaluation(tiny, tmp_path):
    model, processor = tiny
    words = "a red striped shirt with a blue dotted bag on the left".split()
    caption = " ".join(words[i % len(words)] for i in range(150))
    assert len(processor.tokenizer(caption)["input_ids"]) > 150
    rows = Dataset.from_dict({"image": _squares(2), "caption": [caption, "a green star"]})
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path, negative_strategy="vanilla", cached_tower_features=False),
                             train_dataset=rows, eval_dataset=rows, processing_class=processor)
    _, eval_texts, _ = trainer.embed_dataset(trainer.eval_dataset)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])  # what a training step feeds
    assert batch["input_ids"].shape[1] == model.config.text_max_length == 64
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values") if k in batch}
    trainer.model.eval()
    with torch.no_grad():
        train_texts = trainer.model(**inputs, return_dict=True).text_embeds
    retriever = ClipNegRetriever(trainer.model, processor, device="cpu")
    retrieved = retriever.embed_texts([caption], show_progress=False)[0]
    normalise = lambda x: np.asarray(torch.nn.functional.normalize(torch.as_tensor(x).float(), dim=-1))  # noqa: E731
    np.testing.assert_allclose(retrieved, normalise(eval_texts[0]), atol=1e-5)
    np.testing.assert_allclose(retrieved, normalise(train_texts[0]), atol=1e-5)


# ------------------------------------------------------------------------------------------- 6. unknown tokens


def test_emoji_only_captions_are_counted_and_warned_about(tiny, caplog):
    model, processor = tiny
    captions = ["👗🔴", "👕🔵", "a red dress", "a blue shirt", "👗🔴", "a green bag", "a white shoe", "a black watch"]
    assert processor.tokenizer.convert_ids_to_tokens(processor.tokenizer("👗🔴")["input_ids"]) == ["[CLS]", "[UNK]", "[SEP]"]
    ds = Dataset.from_dict({"image": _squares(8), "caption": captions})
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.mining"):
        _, stats = mine_negatives(ds, MiningConfig(n_image_clusters=2, n_text_clusters=2, negatives_per_row=1), model, processor)
    assert stats.unreadable_captions == 3  # rows 0, 1 and 4
    assert stats.unreadable_caption_examples == ["👗🔴", "👕🔵"]
    warnings = [r.getMessage() for r in caplog.records if "do not know" in r.getMessage() or "does not know" in r.getMessage()]
    assert len(warnings) == 1 and "multilingual" in warnings[0] and "'👗🔴'" in warnings[0]
    _, clean = mine_negatives(ds.select([2, 3, 5, 6, 7]), MiningConfig(n_image_clusters=2, n_text_clusters=2,
                                                                        negatives_per_row=1), model, processor)
    assert clean.unreadable_captions == 0


# ------------------------------------------------------------------------------------------- 7. degenerate batches


def test_identical_images_make_degenerate_batches_loud(tiny, tmp_path, caplog):
    model, processor = tiny
    placeholder = Image.new("RGB", (16, 16), "grey")
    ds = Dataset.from_dict({"image": [placeholder] * 8, "caption": [f"a {c} bag" for c in COLOURS]})
    with caplog.at_level(logging.WARNING):
        mined, stats = mine_negatives(ds, MiningConfig(n_image_clusters=2, n_text_clusters=2, negatives_per_row=1),
                                      model, processor)
    assert stats.strategy_masked_fraction == 1.0  # every pair has image cosine 1 > 0.97
    assert stats.median_pair_image_cosine == pytest.approx(1.0, abs=1e-5)
    assert "matter little" not in stats.hint and "masks 100%" in stats.hint
    assert "Degenerate batches: the rule masks 100% of the in-batch negatives (evidence=pair_cosine: image cosine > 0.97" in caplog.text
    caplog.clear()
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path, negative_strategy="cluster"), train_dataset=mined,
                             processing_class=processor)
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.training"):
        trainer.train()
    assert "Degenerate batches: the first training batch (4 rows) has 100% of its in-batch negatives" in caplog.text


def test_healthy_mining_has_no_degenerate_warning(caplog):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype("float32")
    ds = Dataset.from_dict({"image_features": x, "text_features": x, "caption": [f"c{i}" for i in range(40)]})
    with caplog.at_level(logging.WARNING):
        _, stats = mine_negatives(ds, MiningConfig(n_image_clusters=4, n_text_clusters=4, negatives_per_row=1))
    assert stats.strategy_masked_fraction < 0.5 and "Degenerate" not in caplog.text and "matter little" in stats.hint


# ------------------------------------------------------------------------------------------- 8. batch sizes


def test_batch_of_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="per_device_train_batch_size=1 .*at least 2 rows"):
        _args(tmp_path, per_device_train_batch_size=1)


def test_last_batch_of_one_row_is_not_a_step(tiny, tmp_path, caplog):
    model, processor = tiny
    rows = Dataset.from_dict({"image": _squares(9), "caption": [f"a {COLOURS[i % 8]} bag {i}" for i in range(9)]})
    args = _args(tmp_path, max_steps=-1, num_train_epochs=1, logging_steps=1, negative_strategy="vanilla")
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.training"):
        trainer.train()
    assert trainer.state.global_step == 2  # 9 rows in batches of 4: 4 + 4 (the 1-row batch is dropped)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert "would hold a single row (9 rows, batch size 4)" in caplog.text
    assert trainer.args.dataloader_drop_last is False


def test_eval_loss_does_not_depend_on_batch_boundaries(tiny, tmp_path):
    model, processor = tiny
    rows = Dataset.from_dict({"image": _squares(9), "caption": [f"a {COLOURS[i % 8]} bag {i}" for i in range(9)]})
    losses = []
    for eval_batch in (8, 9, 2):
        trainer = ClipNegTrainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=eval_batch,
                                                         negative_strategy="vanilla"),
                                 train_dataset=rows, eval_dataset=rows, processing_class=processor)
        losses.append(trainer.evaluate()["eval_loss"])
        images, texts, _ = trainer.embed_dataset(trainer.eval_dataset)
    normalise = torch.nn.functional.normalize
    logits = model.logit_scale.detach().exp() * normalise(images, dim=-1) @ normalise(texts, dim=-1).T
    whole = float(weighted_contrastive_loss(logits))  # one batch of all 9 rows
    assert losses == pytest.approx([whole] * 3, rel=1e-5)


# ------------------------------------------------------------------------------------------- 9. two processes

TWO_PROCESS_SCRIPT = Path(__file__).parent / "scripts" / "repeated_rows_two_processes.py"


def test_padded_rows_never_meet_their_own_copy_on_two_processes(tmp_path):
    """2 processes, 6 rows, per-device batch 4: accelerate pads process 1's batch with repeated rows. Under every
    strategy and both paths, pairs of equal row index in the gathered batch get negative weight 0."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("ACCELERATE_", "HF_", "HUGGINGFACE_", "TORCHELASTIC_"))
           and key not in {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore::FutureWarning")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               str(TWO_PROCESS_SCRIPT), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=500, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    results = json.loads((tmp_path / "repeated.json").read_text())
    assert len(results) == 8  # 4 strategies x 2 paths
    for name, steps in results.items():
        repeated = 0
        for step in steps:
            rows = np.asarray(step["row_index"])
            weights = np.asarray(step["weights"])
            same = (rows[:, None] == rows[None, :]) & ~np.eye(len(rows), dtype=bool)
            repeated += int(same.sum())
            assert (weights[same] == 0).all(), f"{name}: a row met its own copy as a negative"
        assert repeated > 0, f"{name}: the gathered batch should hold padded copies"
        assert len(steps[0]["row_index"]) == 8 and sorted(set(steps[0]["row_index"])) == list(range(6))


# ------------------------------------------------------------------------------------------- 10. eval groups


def test_identical_eval_captions_are_flagged_and_counted(tiny, tmp_path, caplog):
    model, processor = tiny
    rows = Dataset.from_dict({"image": _squares(6), "caption": ["a bag"] * 6})
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path, negative_strategy="vanilla", metric_for_best_model="t2i_R@1"),
                             train_dataset=rows, eval_dataset=rows, processing_class=processor)
    with caplog.at_level(logging.WARNING):
        metrics = trainer.evaluate()
    assert metrics["eval_t2i_R@1"] == 100.0 and metrics["eval_groups"] == 1.0
    assert "Recall@1/5 are meaningless here" in caplog.text and "1 relevance group(s)" in caplog.text
    assert "best checkpoint is picked arbitrarily" in caplog.text
    assert trivial_recall_ks([0, 1, 2, 3], [0, 1, 2, 3], (1, 5)) == [5]  # K beyond the gallery only
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.metrics"):
        retrieval_metrics(np.eye(12), np.eye(12), ks=(1, 5, 10))
    assert "meaningless" not in caplog.text


def test_cli_mines_and_trains_with_a_string_group_column(tmp_path):
    """`hf-clipneg train --group_column product_id` with "SKU-000"-style ids (before: `invalid literal for int()`)."""
    from hf_clipneg.cli import main

    for i, image in enumerate(_squares(8)):
        image.save(tmp_path / f"{i}.png")
    lines = [f"{i}.png,a {COLOURS[i]} wallet,SKU-{i // 2:03d}" for i in range(8)]
    (tmp_path / "shop.csv").write_text("image,caption,product_id\n" + "\n".join(lines) + "\n")
    common = ["--tiny_random_towers", "--max_steps", "1", "--per_device_train_batch_size", "4", "--report_to", "none",
              "--use_cpu", "--save_strategy", "no"]
    assert main(["train", "--train_data", str(tmp_path / "shop.csv"), "--group_column", "product_id",
                 "--output_dir", str(tmp_path / "vanilla"), "--negative_strategy", "vanilla", *common]) == 0
    assert main(["mine", "--tiny_random_towers", "--train_data", str(tmp_path / "shop.csv"), "--group_column", "product_id",
                 "--evidence", "group", "--n_image_clusters", "2", "--n_text_clusters", "2", "--negatives_per_row", "1",
                 "--output_dir", str(tmp_path / "mined")]) == 0
    assert main(["train", "--train_data", str(tmp_path / "mined"), "--output_dir", str(tmp_path / "cluster"),
                 "--negative_strategy", "cluster", *common]) == 0
