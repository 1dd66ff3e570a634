"""Loading image-caption pairs from every supported source form, and the errors on bad input."""

import csv
import io
import json
import logging
import os

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from hf_clipneg.data import (
    CAPTION_COLUMN, GROUP_COLUMN, IMAGE_COLUMN, BadImageError, MissingColumnError, check_images, load_pairs,
)
from hf_clipneg.data import sources

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square"]


@pytest.fixture
def image_dir(tmp_path):
    """tmp/data/img/{0..3}.png, a fake .jpg, and the data folder where data files go."""
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        PILImage.new("RGB", (6, 5), colour).save(folder / "img" / f"{i}.png")
    (folder / "img" / "fake.jpg").write_text("this is not a picture")
    return folder


def _pixel(image):
    return image.convert("RGB").getpixel((0, 0))


def _assert_pairs(pairs, expected_columns=(IMAGE_COLUMN, CAPTION_COLUMN)):
    assert list(pairs.column_names)[: len(expected_columns)] == list(expected_columns)
    assert isinstance(pairs.features[IMAGE_COLUMN], Image)
    assert pairs[CAPTION_COLUMN] == CAPTIONS
    assert [_pixel(row[IMAGE_COLUMN]) for row in pairs] == COLOURS


def _write_csv(path, rows, header=("file", "text")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_in_memory_dataset_is_renamed_and_other_columns_kept():
    raw = Dataset.from_dict(
        {
            "picture": [PILImage.new("RGB", (4, 4), colour) for colour in COLOURS],
            "text": CAPTIONS,
            "sku": ["a", "a", "b", "c"],
            "price": [1.0, 2.0, 3.0, 4.0],
        }
    )
    pairs = load_pairs(raw, image_column="picture", caption_column="text", group_column="sku")
    assert pairs.column_names == [IMAGE_COLUMN, CAPTION_COLUMN, GROUP_COLUMN, "price"]
    assert pairs[GROUP_COLUMN] == ["a", "a", "b", "c"]
    assert pairs["price"] == [1.0, 2.0, 3.0, 4.0]
    _assert_pairs(pairs)


def test_dataset_dict_split_is_picked_and_unknown_split_named():
    def make(captions):
        return Dataset.from_dict({"image": [PILImage.new("RGB", (4, 4), c) for c in COLOURS], "caption": captions})

    splits = DatasetDict({"train": make(CAPTIONS), "test": make([c.upper() for c in CAPTIONS])})
    assert load_pairs(splits, split="test")[CAPTION_COLUMN][0] == "A RED SQUARE"
    with pytest.raises(ValueError, match=r"'validation'.*\['train', 'test'\]"):
        load_pairs(splits, split="validation")


def test_parquet_with_embedded_image_bytes(image_dir, tmp_path):
    images = [(image_dir / "img" / f"{i}.png").read_bytes() for i in range(4)]
    source = Dataset.from_dict(
        {"img": [{"bytes": b, "path": None} for b in images], "txt": CAPTIONS},
        features=Features({"img": Image(), "txt": Value("string")}),
    )
    path = tmp_path / "pairs.parquet"
    source.to_parquet(str(path))
    _assert_pairs(load_pairs(str(path), image_column="img", caption_column="txt"))


def test_raw_bytes_column_is_cast_to_image():
    buffers = []
    for colour in COLOURS:
        buffer = io.BytesIO()
        PILImage.new("RGB", (3, 3), colour).save(buffer, format="PNG")
        buffers.append(buffer.getvalue())
    pairs = load_pairs(Dataset.from_dict({"image": buffers, "caption": CAPTIONS}))
    _assert_pairs(pairs)


def test_csv_relative_paths_resolve_against_the_file_folder(image_dir, tmp_path, monkeypatch):
    _write_csv(image_dir / "pairs.csv", [(f"img/{i}.png", CAPTIONS[i]) for i in range(4)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the paths must not be resolved against the current folder
    pairs = load_pairs(str(image_dir / "pairs.csv"), image_column="file", caption_column="text")
    _assert_pairs(pairs)
    stored = pairs.cast_column(IMAGE_COLUMN, Image(decode=False))[0][IMAGE_COLUMN]["path"]
    assert stored == str(image_dir / "img" / "0.png")


def test_jsonl_and_json_with_paths(image_dir):
    with open(image_dir / "pairs.jsonl", "w") as handle:
        for i in range(4):
            handle.write(json.dumps({"image": f"img/{i}.png", "caption": CAPTIONS[i]}) + "\n")
    _assert_pairs(load_pairs(str(image_dir / "pairs.jsonl")))
    absolute = [{"image": str(image_dir / "img" / f"{i}.png"), "caption": CAPTIONS[i]} for i in range(4)]
    (image_dir / "pairs.json").write_text(json.dumps(absolute))
    _assert_pairs(load_pairs(str(image_dir / "pairs.json")))


def test_files_in_several_folders_each_resolve_their_own_paths(image_dir, tmp_path):
    other = tmp_path / "other"
    (other / "img").mkdir(parents=True)
    for i in (2, 3):
        PILImage.new("RGB", (6, 5), COLOURS[i]).save(other / "img" / f"{i}.png")
    _write_csv(image_dir / "a.csv", [(f"img/{i}.png", CAPTIONS[i]) for i in (0, 1)])
    _write_csv(other / "b.csv", [(f"img/{i}.png", CAPTIONS[i]) for i in (2, 3)])
    (image_dir / "img" / "2.png").unlink()  # would be found only if b.csv's paths used the wrong folder
    pairs = load_pairs([image_dir / "a.csv", other / "b.csv"], image_column="file", caption_column="text")
    _assert_pairs(pairs)


def test_glob_of_files(image_dir):
    for part, rows in (("p1", (0, 1)), ("p2", (2, 3))):
        _write_csv(image_dir / f"{part}.csv", [(f"img/{i}.png", CAPTIONS[i]) for i in rows])
    pairs = load_pairs(str(image_dir / "p*.csv"), image_column="file", caption_column="text")
    _assert_pairs(pairs)
    with pytest.raises(FileNotFoundError, match="No file matches"):
        load_pairs(str(image_dir / "nothing*.csv"))


def test_save_to_disk_folder(tmp_path):
    raw = Dataset.from_dict({"image": [PILImage.new("RGB", (4, 4), c) for c in COLOURS], "caption": CAPTIONS})
    raw.save_to_disk(str(tmp_path / "saved"))
    _assert_pairs(load_pairs(str(tmp_path / "saved")))
    DatasetDict({"train": raw, "test": raw.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    assert len(load_pairs(str(tmp_path / "saved_dict"), split="test")) == 1


def test_imagefolder_with_metadata_jsonl(image_dir):
    (image_dir / "img" / "fake.jpg").unlink()
    with open(image_dir / "img" / "metadata.jsonl", "w") as handle:
        for i in range(4):
            handle.write(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i], "sku": i // 2}) + "\n")
    pairs = load_pairs(str(image_dir / "img"), caption_column="text", group_column="sku")
    assert sorted(pairs[CAPTION_COLUMN]) == sorted(CAPTIONS)
    assert {row[CAPTION_COLUMN]: _pixel(row[IMAGE_COLUMN]) for row in pairs} == dict(zip(CAPTIONS, COLOURS))
    assert sorted(pairs[GROUP_COLUMN]) == [0, 0, 1, 1]


def test_imagefolder_without_captions_says_how_to_add_them(image_dir):
    (image_dir / "img" / "fake.jpg").unlink()
    with pytest.raises(MissingColumnError, match=r"caption column 'caption' is not in the dataset.*metadata\.csv") as err:
        load_pairs(str(image_dir / "img"))
    assert (err.value.role, err.value.column, err.value.available) == ("caption", "caption", ["image"])


def test_hub_id_is_passed_to_load_dataset(monkeypatch):
    calls = []
    raw = Dataset.from_dict({"image": [PILImage.new("RGB", (4, 4), c) for c in COLOURS], "caption": CAPTIONS})

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return raw

    monkeypatch.setattr(sources, "load_dataset", fake_load_dataset)
    pairs = load_pairs("someone/pairs", split="validation", revision="abc123", token="hf_x", data_dir="sub")
    expected = {"split": "validation", "revision": "abc123", "token": "hf_x", "data_dir": "sub"}
    assert calls == [("someone/pairs", expected)]
    _assert_pairs(pairs)


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(str(tmp_path / "nope.csv"))


def test_unknown_column_names_missing_and_available_columns():
    raw = Dataset.from_dict({"picture": [PILImage.new("RGB", (2, 2))], "text": ["a star"]})
    with pytest.raises(ValueError) as info:
        load_pairs(raw, image_column="picture", caption_column="title")
    message = str(info.value)
    assert "'title'" in message and "['picture', 'text']" in message
    with pytest.raises(ValueError, match="'sku'"):
        load_pairs(raw, image_column="picture", caption_column="text", group_column="sku")


def test_renaming_onto_an_existing_column_is_refused():
    raw = Dataset.from_dict(
        {"picture": [PILImage.new("RGB", (2, 2))], "image": ["other"], "caption": ["a ring"]}
    )
    with pytest.raises(ValueError, match="already has another column named 'image'"):
        load_pairs(raw, image_column="picture")
    with pytest.raises(ValueError, match="two roles"):
        load_pairs(raw, image_column="caption", caption_column="caption")


def test_swapping_roles_between_columns_is_allowed():
    raw = Dataset.from_dict({"caption": [PILImage.new("RGB", (2, 2), "red")], "text": ["a ring"]})
    pairs = load_pairs(raw, image_column="caption", caption_column="text")
    assert pairs[0][CAPTION_COLUMN] == "a ring" and _pixel(pairs[0][IMAGE_COLUMN]) == (255, 0, 0)


def test_missing_image_file_names_row_and_path(image_dir, caplog):
    rows = [("img/0.png", "a"), ("img/1.png", "b"), ("img/gone.png", "c"), ("img/3.png", "d")]
    _write_csv(image_dir / "pairs.csv", rows)
    with pytest.raises(FileNotFoundError) as info:
        load_pairs(str(image_dir / "pairs.csv"), image_column="file", caption_column="text")
    assert "row 2" in str(info.value) and str(image_dir / "img" / "gone.png") in str(info.value)
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.data"):
        pairs = load_pairs(
            str(image_dir / "pairs.csv"), image_column="file", caption_column="text", on_missing_image="skip"
        )
    assert pairs[CAPTION_COLUMN] == ["a", "b", "d"]
    assert "row 2" in caplog.text and "gone.png" in caplog.text


def test_non_image_file_is_found_by_check_images(image_dir):
    rows = [(f"img/{i}.png", CAPTIONS[i]) for i in range(2)] + [("img/fake.jpg", "fake"), ("img/3.png", "last")]
    _write_csv(image_dir / "pairs.csv", rows)
    pairs = load_pairs(str(image_dir / "pairs.csv"), image_column="file", caption_column="text")
    assert len(pairs) == 4  # existence is checked at load time, decoding is not
    with pytest.raises(BadImageError) as info:
        check_images(pairs)
    message = str(info.value)
    assert "row 2" in message and "'image'" in message and "fake.jpg" in message and "1 of 4" in message


def test_check_images_skip_returns_the_skipped_rows(caplog):
    good = io.BytesIO()
    PILImage.new("RGB", (3, 3), "blue").save(good, format="PNG")
    truncated = good.getvalue()[:20]
    values = [good.getvalue(), b"garbage", good.getvalue(), truncated, good.getvalue()]
    pairs = load_pairs(Dataset.from_dict({"image": values, "caption": list("abcde")}))
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.data"):
        checked, skipped = check_images(pairs, on_bad_image="skip")
    assert skipped == [1, 3]
    assert checked[CAPTION_COLUMN] == ["a", "c", "e"]
    assert "2 of 5" in caplog.text
    clean, none_skipped = check_images(checked)
    assert none_skipped == [] and len(clean) == 3


def test_check_images_row_numbers_are_global_with_several_processes():
    good = io.BytesIO()
    PILImage.new("RGB", (2, 2)).save(good, format="PNG")
    values = [good.getvalue()] * 12
    values[9] = b"not an image"
    pairs = load_pairs(Dataset.from_dict({"image": values, "caption": ["x"] * 12}))
    _, skipped = check_images(pairs, num_proc=2, on_bad_image="skip", batch_size=4)
    assert skipped == [9]


def test_empty_captions_error_names_rows_and_skip_drops_them(caplog):
    captions = ["a red star", "", "   ", None, "a blue star", "\t"]
    raw = Dataset.from_dict({"image": [PILImage.new("RGB", (2, 2))] * 6, "caption": captions})
    with pytest.raises(ValueError) as info:
        load_pairs(raw)
    message = str(info.value)
    assert "rows 1, 2, 3, 5 (4 in total)" in message and "on_empty_caption='skip'" in message
    with caplog.at_level(logging.WARNING, logger="hf_clipneg.data"):
        pairs = load_pairs(raw, on_empty_caption="skip")
    assert pairs[CAPTION_COLUMN] == ["a red star", "a blue star"]
    assert "4 row(s)" in caplog.text and "rows 1, 2, 3, 5" in caplog.text


def test_non_string_captions_name_the_dtype():
    raw = Dataset.from_dict({"image": [PILImage.new("RGB", (2, 2))] * 2, "label": [3, 4]})
    with pytest.raises(ValueError, match="'label' has dtype 'int64'"):
        load_pairs(raw, caption_column="label")


def test_image_column_without_images_names_its_type():
    raw = Dataset.from_dict({"image": [1, 2], "caption": ["a", "b"]})
    with pytest.raises(ValueError, match="image column 'image' has type .*int64"):
        load_pairs(raw)


def test_missing_group_values_are_reported():
    raw = Dataset.from_dict({"image": [PILImage.new("RGB", (2, 2))] * 3, "caption": list("abc"), "sku": [1, None, 2]})
    with pytest.raises(ValueError, match=r"group column 'sku' has no value in row 1 "):
        load_pairs(raw, group_column="sku")


def test_max_rows_keeps_the_first_rows():
    raw = Dataset.from_dict({"image": [PILImage.new("RGB", (2, 2), c) for c in COLOURS], "caption": CAPTIONS})
    assert load_pairs(raw, max_rows=2)[CAPTION_COLUMN] == CAPTIONS[:2]
    assert len(load_pairs(raw, max_rows=100)) == 4
    with pytest.raises(ValueError, match="max_rows"):
        load_pairs(raw, max_rows=0)


def test_loading_stays_lazy(image_dir):
    """Path images stay paths in Arrow storage: nothing is decoded or embedded at load time."""
    _write_csv(image_dir / "pairs.csv", [(f"img/{i}.png", CAPTIONS[i]) for i in range(4)])
    pairs = load_pairs(str(image_dir / "pairs.csv"), image_column="file", caption_column="text")
    storage = pairs.with_format("arrow")[:][IMAGE_COLUMN].combine_chunks()
    assert storage.field("bytes").null_count == 4
    assert np.all([os.path.isabs(path) for path in storage.field("path").to_pylist()])


def test_in_memory_relative_paths_resolve_against_the_current_folder(image_dir, monkeypatch):
    monkeypatch.chdir(image_dir)
    raw = Dataset.from_dict({"image": [f"img/{i}.png" for i in range(4)], "caption": CAPTIONS})
    pairs = load_pairs(raw)
    monkeypatch.chdir(image_dir.parent)  # the stored paths are absolute: moving on does not break them
    _assert_pairs(pairs)


def test_rows_are_named_in_the_order_the_dataset_shows_them():
    captions = ["a", "b", "", "d", "e", "f"]
    raw = Dataset.from_dict({"image": [PILImage.new("RGB", (2, 2))] * 6, "caption": captions})
    reordered = raw.select([5, 4, 3, 2, 1, 0])  # an indices mapping over the same Arrow table
    with pytest.raises(ValueError, match=r"in row 3 \(1 in total\)"):
        load_pairs(reordered)


LATIN1_CAPTION = "caf\xe9 cr\xe8me".encode("latin-1")


def test_non_utf8_csv_names_file_line_column_and_remedy(image_dir):
    data_file = image_dir / "pairs.csv"
    data_file.write_bytes(b"image,caption\nimg/0.png,fine\nimg/1.png," + LATIN1_CAPTION + b"\n")
    with pytest.raises(ValueError) as err:
        load_pairs(str(data_file))
    message = str(err.value)
    assert str(data_file) in message and "line 3" in message and "'caption'" in message
    assert "Re-encode the file as UTF-8" in message


def test_non_utf8_imagefolder_metadata_is_named(image_dir):
    (image_dir / "img" / "fake.jpg").unlink()
    metadata = image_dir / "img" / "metadata.jsonl"
    metadata.write_bytes(b'{"file_name": "0.png", "text": "' + LATIN1_CAPTION + b'"}\n')
    with pytest.raises(ValueError) as err:
        load_pairs(str(image_dir / "img"), caption_column="text")
    assert str(metadata) in str(err.value) and "line 1" in str(err.value) and "'text'" in str(err.value)


def test_utf8_check_accepts_characters_split_across_chunks_and_rejects_a_truncated_file(tmp_path):
    good = tmp_path / "good.csv"
    good.write_bytes("caption\n".encode() + "é€😀\n".encode() * 50)
    sources._check_utf8(str(good), chunk_size=3)  # every multi-byte character crosses a chunk edge
    truncated = tmp_path / "truncated.csv"
    truncated.write_bytes("caption\nok é".encode()[:-1])
    with pytest.raises(ValueError, match=r"line 2, column 'caption'.*Re-encode"):
        sources._check_utf8(str(truncated), chunk_size=3)
