"""Bad input through loading, mining, training and retrieval: handled, or a clear error (row, column, remedy).

The corpus is generated into tmp dirs by `tests/bad_inputs.py`. Convention: the bad value sits in row
`BAD_ROW` (2) of a 6-row dataset, so every error must say "row 2".
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from bad_inputs import (
    BAD_ROW,
    CONVERTIBLE,
    EMPTY_CAPTIONS,
    GOOD_ROWS,
    IMAGE_CASES,
    LONG_CAPTION,
    NON_UTF8_CAPTION,
    UNDECODABLE,
    features_with,
    pairs_with,
)
from hf_clipneg.training.collator import ClipNegCollator
from hf_clipneg.data import BadImageError, check_images, load_pairs, to_rgb
from hf_clipneg.features import compute_features
from hf_clipneg.mining import MiningConfig, mine_negatives
from hf_clipneg.retrieval import ClipNegRetriever
from hf_clipneg.training import ClipNegTrainer
from hf_clipneg.training import ClipNegTrainingArguments

SMALL = dict(evidence="image_cluster", n_image_clusters=2, n_text_clusters=2, negatives_per_row=2)
REMEDY_SKIP = "on_bad_image='skip'"


@pytest.fixture(scope="module")
def tiny():
    from hf_clipneg.testing import build_tiny_dual_encoder

    return build_tiny_dual_encoder()


def _pairs(tmp_path, case: str | None = None, n: int = GOOD_ROWS) -> Dataset:
    bad = IMAGE_CASES[case].write(tmp_path) if case else None
    return load_pairs(Dataset.from_dict(pairs_with(tmp_path, bad, n)))


def _says_row_and_column(message: str, row: int = BAD_ROW, column: str = "image") -> None:
    assert re.search(rf"\brows? {row}\b", message), message
    assert f"'{column}'" in message, message


def _args(tmp_path, **overrides) -> ClipNegTrainingArguments:
    values = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                  use_cpu=True, save_strategy="no", disable_tqdm=True)
    values.update(overrides)
    return ClipNegTrainingArguments(**values)


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("case", CONVERTIBLE)
def test_convertible_images_are_converted_everywhere(case, tiny, tmp_path):
    """CMYK, RGBA, palette, 16-bit, greyscale, 1x1 and 10000x10 images: RGB for mining, training, retrieval."""
    model, processor = tiny
    path = IMAGE_CASES[case].write(tmp_path)
    assert Image.open(path).mode == IMAGE_CASES[case].mode  # the corpus really holds that mode
    rgb = to_rgb(path, row=BAD_ROW)
    assert rgb.mode == "RGB" and rgb.size == Image.open(path).size
    assert np.asarray(rgb).std() > 0 or case == "one_by_one_png"  # not a blank placeholder

    pairs = _pairs(tmp_path, case)
    checked, skipped = check_images(pairs)
    assert skipped == [] and len(checked) == GOOD_ROWS
    with_features = compute_features(pairs, model, processor, device="cpu")  # mining input
    image_features = np.asarray(with_features["image_features"], dtype=np.float32)
    assert np.isfinite(image_features).all()
    np.testing.assert_allclose(np.linalg.norm(image_features, axis=1), 1.0, atol=1e-5)
    batch = ClipNegCollator(processor)([pairs[i] for i in range(GOOD_ROWS)])  # training input
    assert tuple(batch["pixel_values"].shape) == (GOOD_ROWS, 3, 32, 32)
    assert torch.isfinite(batch["pixel_values"]).all()
    retriever = ClipNegRetriever(model, processor, device="cpu")
    embeddings = retriever.embed_images([path], show_progress=False)
    assert embeddings.shape == (1, 16) and np.isfinite(embeddings).all()


@pytest.mark.parametrize("case", UNDECODABLE)
def test_undecodable_image_error_names_row_column_and_remedy(case, tiny, tmp_path):
    model, processor = tiny
    pairs = _pairs(tmp_path, case)
    with pytest.raises(BadImageError) as err:
        check_images(pairs)  # default on_bad_image="error"
    message = str(err.value)
    _says_row_and_column(message)
    assert REMEDY_SKIP in message and "1 of 6" in message and f"{case}" in message  # names the file too
    with pytest.raises(BadImageError) as err:
        compute_features(pairs, model, processor, device="cpu")
    _says_row_and_column(str(err.value))
    assert REMEDY_SKIP in str(err.value)
    with pytest.raises(BadImageError) as err:
        mine_negatives(pairs, MiningConfig(**SMALL), model, processor, device="cpu")
    _says_row_and_column(str(err.value))
    # retrieval of a list of files names the position in that list
    retriever = ClipNegRetriever(model, processor, device="cpu")
    with pytest.raises(BadImageError) as err:
        retriever.embed_images(pairs.cast_column("image", ImageFeature(decode=False))["image"], show_progress=False)
    _says_row_and_column(str(err.value))


@pytest.mark.parametrize("case", UNDECODABLE)
def test_undecodable_image_skip_is_counted_and_reported(case, tiny, tmp_path, caplog):
    model, processor = tiny
    pairs = _pairs(tmp_path, case)
    caplog.set_level(logging.WARNING)
    checked, skipped = check_images(pairs, on_bad_image="skip")
    assert skipped == [BAD_ROW] and len(checked) == GOOD_ROWS - 1
    assert re.search(r"Skipping 1 of 6 rows.*row 2", caplog.text)

    caplog.clear()
    mined, stats = mine_negatives(pairs, MiningConfig(**SMALL), model, processor, device="cpu", on_bad_image="skip")
    assert len(mined) == GOOD_ROWS  # nothing dropped silently: the row stays, marked
    assert stats.rows_skipped == 1 and stats.skipped_row_indices == [BAD_ROW]
    assert stats.n_valid_rows == GOOD_ROWS - 1
    assert mined["image_cluster"][BAD_ROW] == -1 and mined["negative_indices"][BAD_ROW] == [-1, -1]
    assert all(BAD_ROW not in row for row in mined["negative_indices"])  # never used as a negative
    assert "rows skipped | 1" in stats.to_markdown()
    assert "[2]" in caplog.text  # the log names the row


def test_check_images_rejects_unknown_policy(tmp_path):
    with pytest.raises(ValueError, match="on_bad_image must be 'error' or 'skip'"):
        check_images(_pairs(tmp_path), on_bad_image="ignore")


def test_training_converts_every_odd_image_mode(tiny, tmp_path):
    """One trainer step over a batch made only of the convertible corpus (CMYK, RGBA, 16-bit, 10000x10...)."""
    model, processor = tiny
    paths = [IMAGE_CASES[case].write(tmp_path) for case in CONVERTIBLE]
    captions = [f"a red circle {i}" for i in range(len(paths))]
    data = load_pairs(Dataset.from_dict({"image": paths, "caption": captions}))
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path, negative_strategy="vanilla",
                                                     per_device_train_batch_size=len(paths)),
                             train_dataset=data, processing_class=processor)
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_training_on_a_corrupt_image_names_row_and_column(tiny, tmp_path):
    model, processor = tiny
    pairs = _pairs(tmp_path, "corrupt_png")
    for cached in (True, False):  # cached tower features: at construction, before any step; else in the step
        with pytest.raises(BadImageError) as err:
            ClipNegTrainer(model=model, args=_args(tmp_path, negative_strategy="vanilla", cached_tower_features=cached,
                                                   per_device_train_batch_size=GOOD_ROWS),
                           train_dataset=pairs, processing_class=processor).train()
        _says_row_and_column(str(err.value))


def test_training_after_skip_mining_excludes_the_skipped_rows(tiny, tmp_path, caplog):
    model, processor = tiny
    pairs = _pairs(tmp_path, "corrupt_png")
    mined, stats = mine_negatives(pairs, MiningConfig(**SMALL), model, processor, device="cpu", on_bad_image="skip")
    assert stats.rows_skipped == 1
    caplog.set_level(logging.INFO)
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path, max_steps=2, per_device_train_batch_size=GOOD_ROWS),
                             train_dataset=mined, processing_class=processor)
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert re.search(r"\b1\b.*skip|skip.*\b1\b", caplog.text, re.IGNORECASE)  # the exclusion is reported


def test_retrieval_on_a_dataset_with_a_corrupt_image_names_the_row(tiny, tmp_path):
    retriever = ClipNegRetriever(*tiny, device="cpu")
    with pytest.raises(BadImageError) as err:
        retriever.embed_images(_pairs(tmp_path, "corrupt_png"), show_progress=False)
    _says_row_and_column(str(err.value))


def test_cli_parses_on_bad_image():
    from transformers import HfArgumentParser

    from hf_clipneg.pipeline import ColumnArguments, DataArguments, ModelArguments

    # The parser of `hf-clipneg train` and examples/train_clipneg.py.
    parser = HfArgumentParser([DataArguments, ColumnArguments, ModelArguments, ClipNegTrainingArguments])
    parsed = parser.parse_args_into_dataclasses(args=["--output_dir", "o", "--on_bad_image", "skip"],
                                                return_remaining_strings=True)
    assert parsed[-1] == [], f"unparsed: {parsed[-1]}"
    assert any(getattr(obj, "on_bad_image", None) == "skip" for obj in parsed[:-1])
    defaults = parser.parse_args_into_dataclasses(args=["--output_dir", "o"])
    assert any(getattr(obj, "on_bad_image", None) == "error" for obj in defaults)  # default: error


# ------------------------------------------------------------------------------------------------ captions


@pytest.mark.parametrize("kind", sorted(EMPTY_CAPTIONS))
def test_empty_caption_error_names_row_column_and_remedy(kind, tiny, tmp_path, caplog):
    model, processor = tiny
    columns = pairs_with(tmp_path)
    columns["caption"][BAD_ROW] = EMPTY_CAPTIONS[kind]
    raw = Dataset.from_dict(columns)
    with pytest.raises(ValueError) as err:
        load_pairs(raw)
    _says_row_and_column(str(err.value), column="caption")
    assert "on_empty_caption='skip'" in str(err.value)
    with pytest.raises(ValueError) as err:  # mining a dataset that bypassed load_pairs
        mine_negatives(raw, MiningConfig(**SMALL), model, processor, device="cpu")
    assert "[2]" in str(err.value) and "'caption'" in str(err.value) and "filter" in str(err.value)

    caplog.set_level(logging.WARNING)
    kept = load_pairs(raw, on_empty_caption="skip")
    assert len(kept) == GOOD_ROWS - 1
    assert re.search(r"Skipping 1 row.*caption.*row 2", caplog.text)


def test_ten_thousand_character_caption_is_truncated_by_the_tokenizer(tiny, tmp_path):
    model, processor = tiny
    assert len(LONG_CAPTION) == 10_000
    columns = pairs_with(tmp_path)
    columns["caption"][BAD_ROW] = LONG_CAPTION
    pairs = load_pairs(Dataset.from_dict(columns))
    mined, _ = mine_negatives(pairs, MiningConfig(**SMALL), model, processor, device="cpu")
    assert np.isfinite(np.asarray(mined["text_features"])).all()
    batch = ClipNegCollator(processor, max_length=64)([pairs[i] for i in range(GOOD_ROWS)])
    assert batch["input_ids"].shape == (GOOD_ROWS, 64)  # truncated, not an error
    retriever = ClipNegRetriever(model, processor, device="cpu")
    assert retriever.embed_texts([LONG_CAPTION], show_progress=False).shape == (1, 16)
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=GOOD_ROWS),
                             train_dataset=mined, processing_class=processor)
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_non_utf8_bytes_caption_column_is_refused_with_its_dtype(tmp_path):
    columns = pairs_with(tmp_path)
    columns["caption"] = [c.encode() for c in columns["caption"]]
    columns["caption"][BAD_ROW] = NON_UTF8_CAPTION
    with pytest.raises(ValueError) as err:
        load_pairs(Dataset.from_dict(columns))
    assert "'caption'" in str(err.value) and "binary" in str(err.value) and "cast_column" in str(err.value)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_data_file_error_names_file_line_and_remedy(suffix, tmp_path):
    paths = pairs_with(tmp_path)["image"]
    data_file = tmp_path / f"pairs{suffix}"
    with open(data_file, "wb") as handle:
        if suffix == ".csv":
            handle.write(b"image,caption\n")
        for i, path in enumerate(paths):
            caption = NON_UTF8_CAPTION if i == BAD_ROW else b"a red circle"
            if suffix == ".csv":
                handle.write(path.encode() + b"," + caption + b"\n")
            else:
                handle.write(b'{"image": "' + path.encode() + b'", "caption": "' + caption + b'"}\n')
    with pytest.raises(ValueError) as err:
        load_pairs(str(data_file))
    message = str(err.value)
    assert os.fspath(data_file) in message and "UTF-8" in message and re.search(r"(?i)encod", message)
    assert re.search(r"\b(line|row) (2|3|4)\b", message), message  # 0/1-based row or line incl. the csv header


# ------------------------------------------------------------------------------------------------ features


def test_nan_features_are_skipped_counted_and_never_mined():
    mined, stats = mine_negatives(Dataset.from_dict(features_with("nan")), MiningConfig(**SMALL))
    assert stats.rows_skipped == 1 and stats.skipped_row_indices == [BAD_ROW]
    assert mined[BAD_ROW]["image_cluster"] == -1
    assert all(BAD_ROW not in row for row in mined["negative_indices"])


@pytest.mark.parametrize("kind, column", [("inf", "image_features"), ("nan_text", "text_features")])
def test_inf_or_inconsistent_nan_features_error_names_row_column_remedy(kind, column):
    with pytest.raises(ValueError) as err:
        mine_negatives(Dataset.from_dict(features_with(kind)), MiningConfig(**SMALL))
    message = str(err.value)
    assert column in message and "[2]" in message and "ecompute" in message


def test_nan_in_pair_weights_features_is_refused_by_the_loss():
    """A NaN feature reaching the in-batch rule must not silently turn the loss into NaN."""
    from hf_clipneg.losses import WeightedContrastiveLoss
    from hf_clipneg.mining import pair_weights

    features = torch.randn(4, 8)
    features[1] = float("nan")
    weights, _ = pair_weights({"image_cluster": torch.tensor([0, 1, 2, 3]), "image_features": features},
                              MiningConfig(evidence="image_cluster", strategy="cluster_weighted"))
    with pytest.raises(ValueError, match="NaN or inf"):
        WeightedContrastiveLoss()(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(2.0), negative_weights=weights)


# ------------------------------------------------------------------------------------------------ sizes, columns


def test_duplicate_rows_are_mined_apart_and_train(tiny, tmp_path):
    model, processor = tiny
    columns = pairs_with(tmp_path, n=3)
    columns = {name: values * 2 for name, values in columns.items()}  # rows i and i+3 are identical
    pairs = load_pairs(Dataset.from_dict(columns))
    mined, stats = mine_negatives(pairs, MiningConfig(evidence="image_cluster", n_image_clusters=3, negatives_per_row=2), model, processor,
                                  device="cpu")
    clusters = mined["image_cluster"]
    for i in range(3):
        assert clusters[i] == clusters[i + 3]  # identical images share a cluster...
        assert i + 3 not in mined[i]["negative_indices"]  # ...so they are never each other's negative
    assert stats.caption_duplicate_pair_rate > 0 and stats.evidence_recall == 1.0
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=6),
                             train_dataset=mined, processing_class=processor)
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_zero_rows_stop_every_stage_with_a_clear_error(tiny):
    model, processor = tiny
    empty = Dataset.from_dict({"image": [], "caption": []},
                              features=Features({"image": ImageFeature(), "caption": Value("string")}))
    with pytest.raises(ValueError, match="No image-caption pairs"):
        load_pairs(empty)
    with pytest.raises(ValueError, match="at least 2 rows, got 0"):
        mine_negatives(empty, MiningConfig(evidence="image_cluster"), model, processor, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        compute_features(empty, model, processor, device="cpu")
    retriever = ClipNegRetriever(model, processor, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        retriever.embed_images([], show_progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        retriever.index_embeddings(np.zeros((0, 16), np.float32))


def test_one_row_cannot_be_mined_but_trains_and_retrieves(tiny, tmp_path):
    model, processor = tiny
    one = _pairs(tmp_path, n=1)
    with pytest.raises(ValueError, match="at least 2 rows, got 1"):
        mine_negatives(one, MiningConfig(evidence="image_cluster"), model, processor, device="cpu")
    trainer = ClipNegTrainer(model=model, args=_args(tmp_path, negative_strategy="vanilla"), train_dataset=one,
                             processing_class=processor)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(0.0, abs=1e-6)  # nothing to contrast
    retriever = ClipNegRetriever(model, processor, device="cpu")
    retriever.index_images(one, show_progress=False)
    assert [hit.id for hit in retriever.search(["a red circle"], k=5)[0]] == [0]


def test_two_rows_mine_with_fewer_negatives_reported(tiny, tmp_path):
    model, processor = tiny
    mined, stats = mine_negatives(_pairs(tmp_path, n=2), MiningConfig(evidence="image_cluster", negatives_per_row=2), model, processor,
                                  device="cpu")
    assert mined["negative_indices"] == [[1, -1], [0, -1]]  # padded, not invented
    assert stats.rows_with_fewer_negatives == 2 and sum(stats.fewer_negatives_reasons.values()) == 2


@pytest.mark.parametrize("field", ["n_image_clusters", "n_text_clusters"])
def test_k_larger_than_rows_error_names_k_and_remedy(field):
    config = MiningConfig(**{**SMALL, field: 50})
    with pytest.raises(ValueError) as err:
        mine_negatives(Dataset.from_dict(features_with("none")), config)
    assert f"{field}=50" in str(err.value) and "12 usable rows" in str(err.value)
    assert "fewer clusters" in str(err.value)


def test_a_single_image_cluster_gives_padded_negatives_with_a_reason():
    mined, stats = mine_negatives(Dataset.from_dict(features_with("none")),
                                  MiningConfig(evidence="image_cluster", n_image_clusters=1, n_text_clusters=1, negatives_per_row=2))
    assert all(row == [-1, -1] for row in mined["negative_indices"])
    assert stats.rows_with_fewer_negatives == 12
    assert stats.fewer_negatives_reasons == {"all other rows are in similar image clusters": 12}


@pytest.mark.parametrize("missing", ["image", "caption"])
def test_misnamed_columns_name_the_column_and_the_remedy(missing, tiny, tmp_path):
    model, processor = tiny
    columns = pairs_with(tmp_path)
    columns[f"my_{missing}"] = columns.pop(missing)
    raw = Dataset.from_dict(columns)
    with pytest.raises(ValueError) as err:
        load_pairs(raw)
    assert f"'{missing}'" in str(err.value) and f"my_{missing}" in str(err.value)
    assert f"{missing}_column=" in str(err.value)
    assert len(load_pairs(raw, **{f"{missing}_column": f"my_{missing}"})) == GOOD_ROWS  # the remedy works
    with pytest.raises(KeyError) as err:
        mine_negatives(raw, MiningConfig(**SMALL), model, processor, device="cpu")
    assert f"'{missing}'" in str(err.value) and f"{missing}_column=" in str(err.value)
    with pytest.raises(KeyError) as err:
        ClipNegCollator(processor)([raw[0]])
    assert f"'{missing}'" in str(err.value)


def test_feature_columns_of_the_wrong_length_name_the_rows():
    values = features_with("none")
    ragged = [list(row) for row in values["image_features"]]
    ragged[BAD_ROW] = ragged[BAD_ROW][:-1]
    values["image_features"] = ragged
    with pytest.raises(ValueError) as err:
        mine_negatives(Dataset.from_dict(values), MiningConfig(**SMALL))
    assert "'image_features'" in str(err.value) and "row 2" in str(err.value)
