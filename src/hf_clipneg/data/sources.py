"""Which loader reads a source: in-memory datasets, data files, saved folders, imagefolders and Hub ids.

`load_source` turns any source `load_pairs` accepts into `Part`s: loaded rows plus the folder their relative
image paths are relative to. Text data files (csv, json, jsonl, imagefolder metadata) are checked to be
UTF-8 first, so that a bad byte is reported with its file, line and column.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from datasets import (
    Dataset,
    DatasetDict,
    IterableDataset,
    IterableDatasetDict,
    load_dataset,
    load_from_disk,
)

from .errors import SplitNotFoundError

logger = logging.getLogger(__name__)

DataSource = Union[Dataset, DatasetDict, str, os.PathLike, Sequence[Union[str, os.PathLike]]]

_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_SAVED_MARKERS = ("state.json", "dataset_dict.json")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")
_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


@dataclass
class Part:
    """One loaded piece of the source, with the folder its relative image paths are relative to."""

    dataset: Dataset
    base_dir: str | None
    hint: str = ""  # appended to "column not found" errors
    remote_repo: str | None = None  # the Hub dataset id when the rows came from the Hub


def _no_splits(split: str | None, where: str) -> SplitNotFoundError:
    return SplitNotFoundError(
        f"Split {split!r} not found: {where} has no named splits (its rows are one set). Pass the evaluation "
        "data separately (e.g. --eval_data), or a dataset that has that split."
    )


def _looks_local(path: str) -> bool:
    parts = path.replace("\\", "/").split("/")
    return (
        os.path.isabs(path)
        or path.startswith(("./", "../", "~", ".\\", "..\\"))
        or "\\" in path
        or any(part in (".", "..") for part in parts)
        or os.path.splitext(path)[1].lower() in _FILE_BUILDERS
    )


def load_source(
    source: DataSource,
    split: str | None,
    revision: str | None,
    token: str | bool | None,
    data_dir: str | None,
    split_required: bool = False,
) -> list[Part]:
    """Load `source` (see `load_pairs` for every accepted form) as one `Part` per folder of files.

    Raises `TypeError` for streaming datasets and unsupported types, `FileNotFoundError` for a local path
    (or glob) that matches nothing, `ValueError` for a string that is neither a path nor a valid Hub id or
    for text files that are not UTF-8, and `SplitNotFoundError` for a missing split (with `split_required`,
    also for sources without named splits).

    Example:
        >>> from datasets import Dataset
        >>> [part.dataset.num_rows for part in load_source(Dataset.from_dict({"caption": ["a"]}), "train", None, None, None)]
        [1]
    """
    if isinstance(source, (IterableDataset, IterableDatasetDict)):
        raise TypeError("Streaming datasets are not supported: load the data without streaming=True.")
    if isinstance(source, Dataset):
        if split_required:
            raise _no_splits(split, "the in-memory Dataset")
        return [Part(source, None)]
    if isinstance(source, DatasetDict):
        return [Part(_pick_split(source, split, "the DatasetDict"), None)]
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("The list of data files is empty.")
        if split_required:
            raise _no_splits(split, "a list of data files")
        return _load_files([os.fspath(path) for path in source])
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"Cannot load pairs from a {type(source).__name__}: pass a Dataset, DatasetDict, Hub id, file, "
            "glob, list of files or folder."
        )
    path = os.path.expanduser(os.fspath(source))
    if os.path.isdir(path):
        return [_load_folder(os.path.join(path, data_dir) if data_dir else path, split, split_required)]
    if os.path.isfile(path):
        if split_required:
            raise _no_splits(split, f"the data file {path!r}")
        return _load_files([path])
    if glob.has_magic(path):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise FileNotFoundError(f"No file matches the pattern {path!r}.")
        if split_required:
            raise _no_splits(split, f"the data files {path!r}")
        return _load_files(files)
    if _looks_local(os.fspath(source)):
        raise FileNotFoundError(
            f"{path!r} does not exist. Pass an existing file or folder, or a Hub dataset id such as 'user/name'."
        )
    _check_hub_id(path)
    logger.info("Loading %r (split %r) from the Hugging Face Hub.", path, split)
    try:
        loaded = load_dataset(path, split=split, revision=revision, token=token, data_dir=data_dir)
    except ValueError as err:
        if str(err).startswith("Unknown split"):
            raise SplitNotFoundError(f"Split {split!r} not found in the Hub dataset {path!r}: {err}") from err
        raise
    if isinstance(loaded, DatasetDict):
        loaded = _pick_split(loaded, split, f"the Hub dataset {path!r}")
    return [Part(loaded, None, remote_repo=path)]


def _check_hub_id(path: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError as err:
        raise ValueError(
            f"{path!r} is neither an existing local file or folder nor a valid Hub dataset id ({err}). Pass an "
            "existing path (write local paths as './name' or '/abs/name') or a Hub id such as 'user/name'."
        ) from None


def _load_folder(path: str, split: str | None, split_required: bool = False) -> Part:
    if any(os.path.isfile(os.path.join(path, marker)) for marker in _SAVED_MARKERS):
        loaded = load_from_disk(path)
        if isinstance(loaded, DatasetDict):
            loaded = _pick_split(loaded, split, f"the saved dataset {path!r}")
        elif split_required:
            raise _no_splits(split, f"the saved dataset {path!r}")
        return Part(loaded, path)
    if _has_images(path):
        _check_folder_utf8(path, only=_METADATA_FILES)
        loaded = load_dataset("imagefolder", data_dir=path)
        hint = (
            f" {path!r} was read as an imagefolder: put a metadata.csv or metadata.jsonl next to the images "
            "with a `file_name` column and a caption column, or pass the csv/json file that lists the images."
        )
        return Part(_pick_split(loaded, split, f"the imagefolder {path!r}"), None, hint)
    _check_folder_utf8(path)
    loaded = load_dataset(path)  # a folder of parquet/csv/json files
    return Part(_pick_split(loaded, split, f"the folder {path!r}"), path)


def _check_folder_utf8(path: str, only: Sequence[str] | None = None) -> None:
    for folder, _, files in os.walk(path):
        for name in sorted(files):
            text_file = os.path.splitext(name)[1].lower() in (".csv", ".json", ".jsonl")
            if text_file and (only is None or name in only):
                _check_utf8(os.path.join(folder, name))


def _has_images(path: str) -> bool:
    for _, _, files in os.walk(path):
        if any(name.lower().endswith(_IMAGE_SUFFIXES) or name in _METADATA_FILES for name in files):
            return True
    return False


def _load_files(files: list[str]) -> list[Part]:
    builders = set()
    for file in files:
        suffix = os.path.splitext(file)[1].lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"Cannot load {file!r}: supported data files are {sorted(_FILE_BUILDERS)}.")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"The data file {file!r} does not exist.")
        builders.add(_FILE_BUILDERS[suffix])
    if len(builders) > 1:
        raise ValueError(f"All data files must have one format, got {sorted(builders)}: {files}.")
    builder = builders.pop()
    if builder in ("csv", "json"):
        # Checked up front: a bad byte fails deep inside `datasets` with no file or line, or (json) even
        # loads and fails later when the string is read.
        for file in files:
            _check_utf8(file)
    # Files in different folders are loaded separately: their relative image paths differ in base.
    by_folder: dict[str, list[str]] = {}
    for file in files:
        by_folder.setdefault(os.path.dirname(os.path.abspath(file)), []).append(os.path.abspath(file))
    return [
        Part(load_dataset(builder, data_files=group, split="train"), folder) for folder, group in by_folder.items()
    ]


def _check_utf8(file: str, chunk_size: int = 1 << 24) -> None:
    """Raise a ValueError naming the file, line and column when a text data file is not valid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(chunk_size), b""):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
        return
    except UnicodeDecodeError:
        pass
    header = None
    with open(file, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                column = _column_of_bad_bytes(file, line, header)
                where = f", column {column!r}" if column else ""
                raise ValueError(
                    f"The data file {file!r} is not valid UTF-8: line {number}{where} has bytes that cannot be "
                    f"decoded ({line[max(err.start - 10, 0) : err.end + 10]!r}, byte {err.start} of the line). "
                    "Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 old.csv > new.csv` when it is "
                    "Latin-1) and load it again."
                ) from None
            if number == 1:
                header = text
    raise ValueError(  # not reached: a bad byte always lies on some line
        f"The data file {file!r} is not valid UTF-8. Re-encode the file as UTF-8 and load it again."
    )


def _column_of_bad_bytes(file: str, line: bytes, header: str | None) -> str | None:
    """Best effort: the csv / jsonl column whose value holds the undecodable bytes of `line`."""
    text = line.decode("utf-8", errors="surrogateescape")

    def bad(value: Any) -> bool:
        return isinstance(value, str) and any("\udc80" <= char <= "\udcff" for char in value)

    try:
        if file.lower().endswith(".csv"):
            if header is None:
                return None
            names = next(csv.reader([header]))
            values = next(csv.reader([text]))
            return next((name for name, value in zip(names, values) if bad(value)), None)
        record = json.loads(text)
        if isinstance(record, dict):
            return next((str(name) for name, value in record.items() if bad(value)), None)
    except (ValueError, StopIteration, csv.Error):
        pass
    return None


def _pick_split(splits: DatasetDict, split: str | None, where: str) -> Dataset:
    if split is None:
        if len(splits) == 1:
            return next(iter(splits.values()))
        raise ValueError(f"{where} has several splits {list(splits)}: pass split=... to pick one.")
    if split not in splits:
        raise SplitNotFoundError(f"Split {split!r} not found in {where}; available splits: {list(splits)}.")
    return splits[split]
