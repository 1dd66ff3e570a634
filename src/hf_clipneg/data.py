"""Load image-caption pairs from any source into a `datasets.Dataset` with canonical column names.

Whatever the source (an in-memory dataset, a Hub id, parquet/csv/json files, a `save_to_disk`
folder, an imagefolder), the result has an `image` column (`datasets.Image()`, decoded lazily), a
`caption` column (strings) and, when asked, a `group` column (e.g. a product id); every other
column is kept as it is. Problems found cheaply at load time (unknown columns, missing image files,
empty or non-string captions) raise errors that name the rows; undecodable images are found by
`check_images`, which decodes everything once.
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import (
    Dataset,
    DatasetDict,
    Image,
    IterableDataset,
    IterableDatasetDict,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from datasets.utils.tqdm import tqdm

from .images import BadImageError, to_rgb

class SplitNotFoundError(ValueError):
    """The requested split does not exist in the source (the message names the splits that do)."""


class ForeignImagePathError(ValueError):
    """A dataset from the Hub points its images at files outside its own repository; they are never read."""


class RemoteImageError(ValueError):
    """The image column holds URLs (http://, https://, s3://, ...): images are never fetched at run time."""


logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
CAPTION_COLUMN = "caption"
GROUP_COLUMN = "group"

DataSource = Union[Dataset, DatasetDict, str, os.PathLike, Sequence[Union[str, os.PathLike]]]

_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_SAVED_MARKERS = ("state.json", "dataset_dict.json")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")
_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
_SCAN_BATCH = 10_000
_SHOW_ROWS = 5


def load_pairs(
    source: DataSource,
    split: str | None = "train",
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
    group_column: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    data_dir: str | None = None,
    max_rows: int | None = None,
    *,
    on_empty_caption: str = "error",
    on_missing_image: str = "error",
    split_required: bool = False,
    on_missing_group: str = "error",
) -> Dataset:
    """Load image-caption pairs and rename their columns to `image`, `caption` (and `group`).

    `source` may be a `Dataset`, a `DatasetDict` (`split` picks one), a Hub dataset id, a local
    `.parquet`/`.csv`/`.json`/`.jsonl` file, a glob or list of such files, a folder written by
    `save_to_disk`, or an imagefolder (images plus a `metadata.csv`/`metadata.jsonl` with a
    `file_name` column and the caption column). Images may be `datasets.Image` values, bytes or
    file paths; relative paths are resolved against the data file's folder (the current folder
    for in-memory datasets). Local files always load as one split, so `split` only applies to Hub
    ids, `DatasetDict`s and split folders.

    Rows whose caption is empty/whitespace/None raise a `ValueError` naming them, or are dropped
    (counted and logged) with `on_empty_caption="skip"`; image files that do not exist likewise
    with `on_missing_image`. Undecodable images are only found when decoded: see `check_images`.
    `max_rows` keeps the first rows (before any skipping).

    A string is read as a local source when it exists or is clearly written as a path (it starts with
    `/`, `./`, `../` or `~`, has a `..` part or a data-file suffix); anything else must be a valid Hub
    dataset id (`name` or `namespace/name`). Images of a Hub dataset must be embedded bytes or files of
    that same repository: a path to any other file (e.g. `/etc/passwd` or a relative path, which would be
    read from this machine's disk) is never opened, and its rows raise a `ForeignImagePathError` (or are
    dropped with `on_missing_image="skip"`).

    Group values may be strings (`"SKU-000"`), integers or any other scalar; rows without one raise a
    `ValueError` naming them, unless `on_missing_group="keep"`: such rows then keep None and count as a group
    of their own everywhere (never the same group as another row in mining, training or evaluation).

    With `split_required=True` a source without the split `split` (including sources that have no splits
    at all: files, in-memory and single saved datasets) raises `SplitNotFoundError` instead of loading
    its only rows.

    Example:
        >>> from datasets import Dataset
        >>> from PIL import Image as PILImage
        >>> raw = Dataset.from_dict({"picture": [PILImage.new("RGB", (4, 4))], "text": ["a red circle"]})
        >>> pairs = load_pairs(raw, image_column="picture", caption_column="text")
        >>> pairs.column_names, pairs[0]["caption"]
        (['image', 'caption'], 'a red circle')
    """
    _check_choice("on_empty_caption", on_empty_caption)
    _check_choice("on_missing_image", on_missing_image)
    if on_missing_group not in ("error", "keep"):
        raise ValueError(f"on_missing_group must be 'error' or 'keep', got {on_missing_group!r}.")
    if max_rows is not None and (not isinstance(max_rows, (int, np.integer)) or max_rows < 1):
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}.")
    roles = {IMAGE_COLUMN: image_column, CAPTION_COLUMN: caption_column}
    if group_column is not None:
        roles[GROUP_COLUMN] = group_column
    if len(set(roles.values())) < len(roles):
        raise ValueError(f"One column cannot play two roles: {roles}.")

    parts = _load_source(source, split, revision, token, data_dir, split_required)
    prepared, missing_images, foreign_images, url_images, offset = [], [], [], [], 0
    for part in parts:
        dataset = part.dataset
        if max_rows is not None:
            if offset >= max_rows:
                break
            dataset = dataset.select(range(min(len(dataset), max_rows - offset)))
        _check_columns(dataset, roles, part.hint)
        dataset = _rename(dataset, roles)
        dataset, missing, foreign, urls = _prepare_images(dataset, part.base_dir, image_column, part.remote_repo)
        missing_images += [(row + offset, path) for row, path in missing]
        url_images += [(row + offset, path) for row, path in urls]
        foreign_images += [(row + offset, path) for row, path in foreign]
        prepared.append(dataset)
        offset += len(dataset)
    dataset = prepared[0] if len(prepared) == 1 else concatenate_datasets(prepared)
    dataset = _check_caption_dtype(dataset, caption_column)

    column = repr(image_column)
    hub_source = repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "given"
    problems = (
        (foreign_images, ForeignImagePathError,
         f"in column {column} of the Hub dataset {hub_source} are not embedded and point outside that "
         "repository ({examples}). Paths in a remote dataset are never read from this machine's disk: only embedded "
         "image bytes, or image files of the same dataset repository, are used.",
         "Ask the dataset's author to embed the images (datasets' push_to_hub does), or pass "
         "on_missing_image='skip' to drop those rows."),
        (url_images, RemoteImageError,
         f"in column {column} are URLs ({{examples}}). Images are never downloaded at run time (feature extraction, "
         "training and retrieval read local files or embedded bytes only).",
         "Download them first, on a machine that can reach them: e.g. `ds = load_dataset('csv', data_files=...)"
         f"['train'].cast_column({column}, datasets.Image()); ds.save_to_disk('local_copy')` embeds every image's "
         "bytes (or write the files to disk and put their paths in the column); then load the local copy. Or pass "
         "on_missing_image='skip' to drop those rows."),
        (missing_images, FileNotFoundError,
         f"in column {column} point to files that do not exist ({{examples}}). Relative paths are resolved against "
         "the data file's folder (the current folder for in-memory datasets).",
         "Fix the paths, or pass on_missing_image='skip' to drop those rows."),
    )
    bad_rows: set[int] = set()
    for found, error, problem, remedy in problems:
        if not found:
            continue
        examples = "; ".join(f"row {row}: {path!r}" for row, path in found[:_SHOW_ROWS])
        examples += "; ..." if len(found) > _SHOW_ROWS else ""
        message = f"{len(found)} image(s) " + problem.replace("{examples}", examples)
        if on_missing_image == "error":
            raise error(f"{message} {remedy}")
        logger.warning("Skipping those rows: %s", message)
        bad_rows.update(row for row, _ in found)

    empty_rows, null_groups = _scan_values(dataset, group_column is not None)
    if null_groups and on_missing_group == "keep":
        logger.warning(
            "The group column %r has no value in %s: each of those rows counts as a group of its own.",
            group_column, _rows_summary(null_groups),
        )
    elif null_groups:
        raise ValueError(
            f"The group column {group_column!r} has no value in {_rows_summary(null_groups)}. Fill those "
            "values (e.g. with a unique id per row) or drop the rows before loading, or pass on_missing_group='keep' "
            "to let each of those rows be a group of its own."
        )
    if empty_rows:
        if on_empty_caption == "error":
            raise ValueError(
                f"The caption column {caption_column!r} is empty (None or only whitespace) in "
                f"{_rows_summary(empty_rows)}. Fix those captions, or pass on_empty_caption='skip' to drop "
                "those rows (they are counted and logged)."
            )
        logger.warning(
            "Skipping %d row(s) with an empty caption in column %r: %s.",
            len(empty_rows),
            caption_column,
            _rows_summary(empty_rows),
        )
        bad_rows.update(empty_rows)
    if bad_rows:
        keep = np.setdiff1d(np.arange(len(dataset)), np.fromiter(bad_rows, dtype=np.int64))
        dataset = dataset.select(keep)
        logger.warning("Skipped %d of %d rows in total; %d remain.", len(bad_rows), offset, len(dataset))
    if len(dataset) == 0:
        raise ValueError("No image-caption pairs are left after loading; check the source and the skip options.")
    logger.info("Loaded %d image-caption pairs (columns: %s).", len(dataset), dataset.column_names)
    return dataset


def check_images(
    dataset: Dataset,
    num_proc: int | None = None,
    on_bad_image: str = "error",
    *,
    column: str = IMAGE_COLUMN,
    batch_size: int = 64,
) -> tuple[Dataset, list[int]]:
    """Decode every image once; raise on the first undecodable ones, or drop them.

    Returns the dataset (without the bad rows when `on_bad_image="skip"`) and the sorted indices of
    the rows that were skipped (empty when none were). With `on_bad_image="error"` a
    `BadImageError` names how many images are bad and the row, column and path of the first ones.

    Example:
        >>> from datasets import Dataset
        >>> from PIL import Image as PILImage
        >>> pairs = load_pairs(Dataset.from_dict({"image": [PILImage.new("RGB", (4, 4))], "caption": ["a cross"]}))
        >>> checked, skipped = check_images(pairs, on_bad_image="skip")
        >>> len(checked), skipped
        (1, [])
    """
    _check_choice("on_bad_image", on_bad_image)
    if column not in dataset.column_names:
        raise ValueError(f"Column {column!r} not found; available columns: {dataset.column_names}.")
    raw = dataset.select_columns([column])
    if isinstance(raw.features[column], Image):
        raw = raw.cast_column(column, Image(decode=False))
    results = raw.map(
        _decode_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        input_columns=[column],
        remove_columns=[column],
        fn_kwargs={"column": column},
        num_proc=num_proc,
        load_from_cache_file=False,  # files can change on disk without changing the fingerprint
        desc="Checking images",
    )
    errors = results.with_format("arrow")[:]["error"] if len(results) else pa.chunked_array([], pa.string())
    bad = np.flatnonzero(_to_numpy(pc.is_valid(errors))).tolist()
    if not bad:
        return dataset, []
    first = " | ".join(errors[row].as_py() for row in bad[:3])
    if on_bad_image == "error":
        raise BadImageError(
            f"{len(bad)} of {len(dataset)} images cannot be decoded ({_rows_summary(bad)}). First: {first}"
        )
    logger.warning(
        "Skipping %d of %d rows whose image cannot be decoded (%s). First: %s",
        len(bad),
        len(dataset),
        _rows_summary(bad),
        first,
    )
    keep = np.setdiff1d(np.arange(len(dataset)), np.asarray(bad, dtype=np.int64))
    return dataset.select(keep), bad


def _decode_batch(values: list[Any], indices: list[int], column: str) -> dict[str, list[str | None]]:
    errors: list[str | None] = []
    for value, row in zip(values, indices):
        try:
            to_rgb(value, row=row, column=column)
        except Exception as err:  # any decoder failure (truncated data, decompression bombs...) is a bad image
            message = str(err) if isinstance(err, BadImageError) else f"column {column!r}, row {row}: {err!r}"
            path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
            if path and path not in message:
                message += f" (path: {path!r})"
            errors.append(message)
        else:
            errors.append(None)
    return {"error": errors}


@dataclass
class _Part:
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


def _load_source(
    source: DataSource,
    split: str | None,
    revision: str | None,
    token: str | bool | None,
    data_dir: str | None,
    split_required: bool = False,
) -> list[_Part]:
    if isinstance(source, (IterableDataset, IterableDatasetDict)):
        raise TypeError("Streaming datasets are not supported: load the data without streaming=True.")
    if isinstance(source, Dataset):
        if split_required:
            raise _no_splits(split, "the in-memory Dataset")
        return [_Part(source, None)]
    if isinstance(source, DatasetDict):
        return [_Part(_pick_split(source, split, "the DatasetDict"), None)]
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
    return [_Part(loaded, None, remote_repo=path)]


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


def _load_folder(path: str, split: str | None, split_required: bool = False) -> _Part:
    if any(os.path.isfile(os.path.join(path, marker)) for marker in _SAVED_MARKERS):
        loaded = load_from_disk(path)
        if isinstance(loaded, DatasetDict):
            loaded = _pick_split(loaded, split, f"the saved dataset {path!r}")
        elif split_required:
            raise _no_splits(split, f"the saved dataset {path!r}")
        return _Part(loaded, path)
    if _has_images(path):
        _check_folder_utf8(path, only=_METADATA_FILES)
        loaded = load_dataset("imagefolder", data_dir=path)
        hint = (
            f" {path!r} was read as an imagefolder: put a metadata.csv or metadata.jsonl next to the images "
            "with a `file_name` column and a caption column, or pass the csv/json file that lists the images."
        )
        return _Part(_pick_split(loaded, split, f"the imagefolder {path!r}"), None, hint)
    _check_folder_utf8(path)
    loaded = load_dataset(path)  # a folder of parquet/csv/json files
    return _Part(_pick_split(loaded, split, f"the folder {path!r}"), path)


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


def _load_files(files: list[str]) -> list[_Part]:
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
        _Part(load_dataset(builder, data_files=group, split="train"), folder) for folder, group in by_folder.items()
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


def _check_choice(name: str, value: str) -> None:
    if value not in ("error", "skip"):
        raise ValueError(f"{name} must be 'error' or 'skip', got {value!r}.")


def _check_columns(dataset: Dataset, roles: dict[str, str], hint: str) -> None:
    for role, column in roles.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"The {role} column {column!r} is not in the dataset; available columns: "
                f"{dataset.column_names}. Pass {role}_column=... with one of them.{hint}"
            )


def _rename(dataset: Dataset, roles: dict[str, str]) -> Dataset:
    mapping = {column: role for role, column in roles.items() if column != role}
    for column, role in mapping.items():
        if role in dataset.column_names and role not in mapping:
            raise ValueError(
                f"Cannot rename column {column!r} to {role!r}: the dataset already has another column named "
                f"{role!r}. Rename or remove that column first (dataset.rename_column / remove_columns)."
            )
    return dataset.rename_columns(mapping) if mapping else dataset


def map_cache_file(dataset: Dataset, fingerprint: str) -> str | None:
    """Where a `dataset.map` with `new_fingerprint=fingerprint` may write its result.

    None (datasets' own choice: beside the dataset's cache files) when that folder is writable or the dataset
    has no cache files; otherwise (a `save_to_disk` folder on a read-only disk or mount) a file in the datasets
    cache folder (`datasets.config.HF_DATASETS_CACHE`), so that the step still runs and its result is cached.
    """
    files = getattr(dataset, "cache_files", None) or []
    if not files:
        return None
    folder = os.path.dirname(os.path.abspath(files[0]["filename"]))
    if os.access(folder, os.W_OK):
        return None
    from datasets import config

    target = os.path.join(str(config.HF_DATASETS_CACHE), "hf_clipneg", "from_read_only_folders")
    os.makedirs(target, exist_ok=True)
    logger.info("The folder %s is read-only: caching this step's result in %s instead.", folder, target)
    return os.path.join(target, f"cache-{fingerprint}.arrow")


def _cached_map(dataset: Dataset, function: Any, name: str, fn_kwargs: dict[str, Any], **kwargs: Any) -> Dataset:
    """`dataset.map(function, ...)` with a fingerprint of its own and a cache file that is writable."""
    from datasets.fingerprint import Hasher

    fingerprint = Hasher.hash([dataset._fingerprint, "hf_clipneg", name, fn_kwargs])
    return dataset.map(
        function, fn_kwargs=fn_kwargs, new_fingerprint=fingerprint,
        cache_file_name=map_cache_file(dataset, fingerprint), **kwargs,
    )


def _is_url(path: str) -> bool:
    return "://" in path


def _prepare_images(
    dataset: Dataset, base_dir: str | None, user_column: str, remote_repo: str | None = None
) -> tuple[Dataset, list[tuple[int, str]], list[tuple[int, str]], list[tuple[int, str]]]:
    """Cast the image column to `Image()`, resolve relative paths and list rows whose file is missing.

    The fourth list holds rows of a local source whose image is a URL without embedded bytes: they cannot be
    read offline (nothing is downloaded at run time).

    For a Hub dataset (`remote_repo`) nothing is resolved on the local filesystem: a value without bytes
    must be a file of that repository (its folder in the Hub cache, or an `hf://datasets/<repo>` URL);
    any other path is listed as foreign (third list) and never opened.
    """
    feature = dataset.features[IMAGE_COLUMN]
    supported = isinstance(feature, Image) or (
        isinstance(feature, Value) and feature.dtype in ("string", "large_string", "binary", "large_binary")
    )
    if not supported and isinstance(feature, dict):
        supported = set(feature) <= {"bytes", "path"}
    if not supported:
        raise ValueError(
            f"The image column {user_column!r} has type {feature}, which holds no images: expected images, "
            "image bytes or file paths."
        )
    base = os.path.abspath(base_dir) if base_dir else os.getcwd()
    mode = feature.mode if isinstance(feature, Image) else None
    dataset = dataset.cast_column(IMAGE_COLUMN, Image(decode=False))

    missing: list[tuple[int, str]] = []
    foreign: list[tuple[int, str]] = []
    urls: list[tuple[int, str]] = []
    allowed = _repo_locations(remote_repo) if remote_repo else None
    relative = False
    offset = 0
    for batch in dataset.select_columns([IMAGE_COLUMN]).with_format("arrow").iter(batch_size=_SCAN_BATCH):
        storage = batch.column(IMAGE_COLUMN).combine_chunks()
        without_bytes = pc.invert(pc.is_valid(storage.field("bytes"))).to_numpy(zero_copy_only=False)
        null = storage.is_null().to_numpy(zero_copy_only=False)
        for position in np.flatnonzero(without_bytes | null):
            path = None if null[position] else storage.field("path")[int(position)].as_py()
            if path is None:
                missing.append((offset + int(position), "None (no image)"))
                continue
            if allowed is not None:
                if not _in_repo(path, allowed):
                    foreign.append((offset + int(position), path))
                elif not _is_url(path) and not os.path.isfile(path):
                    missing.append((offset + int(position), path))
                continue
            if _is_url(path):
                urls.append((offset + int(position), path))
                continue
            if not os.path.isabs(path):
                relative = True
                path = os.path.join(base, path)
            if not os.path.isfile(path):
                missing.append((offset + int(position), path))
        offset += batch.num_rows

    if foreign:
        # Never leave a foreign path in the rows: a later save/push (which embeds files) would read it.
        dataset = _cached_map(
            dataset,
            _drop_foreign_paths,
            "drop_foreign_paths",
            {"allowed": allowed},
            batched=True,
            input_columns=[IMAGE_COLUMN],
            features=dataset.features,
            desc="Dropping foreign image paths",
        )
    if relative:
        dataset = _cached_map(
            dataset,
            _absolute_paths,
            "absolute_paths",
            {"base": base},
            batched=True,
            input_columns=[IMAGE_COLUMN],
            features=dataset.features,
            desc="Resolving image paths",
        )
    return dataset.cast_column(IMAGE_COLUMN, Image(mode=mode)), missing, foreign, urls


def _repo_locations(repo_id: str) -> tuple[str, tuple[str, ...]]:
    """The local cache folder of a Hub dataset repo and the URL prefixes of its files."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = os.path.realpath(os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="dataset")))
    return folder, (f"hf://datasets/{repo_id}/", f"hf://datasets/{repo_id}@")


def _in_repo(path: str, allowed: tuple[str, tuple[str, ...]]) -> bool:
    folder, prefixes = allowed
    if _is_url(path):
        return path.startswith(prefixes) and "/../" not in path and not path.endswith("/..")
    if not os.path.isabs(path):
        return False  # would be read relative to this machine's current folder
    real = os.path.realpath(path)
    return os.path.commonpath([real, folder]) == folder and real != folder


def _drop_foreign_paths(values: list[dict | None], allowed: tuple[str, tuple[str, ...]]) -> dict[str, list[dict | None]]:
    kept = []
    for value in values:
        if value and value.get("bytes") is None and value.get("path") and not _in_repo(value["path"], allowed):
            value = None
        kept.append(value)
    return {IMAGE_COLUMN: kept}


def _absolute_paths(values: list[dict | None], base: str) -> dict[str, list[dict | None]]:
    resolved = []
    for value in values:
        if value and value.get("bytes") is None and value.get("path") and not _is_url(value["path"]):
            value = {"bytes": None, "path": os.path.join(base, value["path"])}
        resolved.append(value)
    return {IMAGE_COLUMN: resolved}


def _check_caption_dtype(dataset: Dataset, user_column: str) -> Dataset:
    feature = dataset.features[CAPTION_COLUMN]
    if isinstance(feature, Value) and feature.dtype == "null":  # every caption is None
        return dataset.cast_column(CAPTION_COLUMN, Value("string"))
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        dtype = feature.dtype if isinstance(feature, Value) else type(feature).__name__
        raise ValueError(
            f"The caption column {user_column!r} has dtype {dtype!r}, not strings. Pick the column that "
            f"holds the text, or convert it first (e.g. dataset.cast_column({user_column!r}, Value('string')))."
        )
    return dataset


def _scan_values(dataset: Dataset, has_group: bool) -> tuple[list[int], list[int]]:
    """Rows with an empty caption, and rows with no group value, without touching the images."""
    columns = [CAPTION_COLUMN] + ([GROUP_COLUMN] if has_group else [])
    empty: list[int] = []
    no_group: list[int] = []
    offset = 0
    batches = dataset.select_columns(columns).with_format("arrow").iter(batch_size=_SCAN_BATCH)
    total = -(-len(dataset) // _SCAN_BATCH)
    for batch in tqdm(batches, total=total, desc="Checking captions", disable=total < 10):
        empty += (np.flatnonzero(blank_captions(batch.column(CAPTION_COLUMN))) + offset).tolist()
        if has_group:
            no_group += (np.flatnonzero(_to_numpy(pc.is_null(batch.column(GROUP_COLUMN)))) + offset).tolist()
        offset += batch.num_rows
    return empty, no_group


def blank_captions(captions: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Boolean numpy array: True where a caption is missing (null), empty or only whitespace."""
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(captions)), 0)
    return _to_numpy(pc.fill_null(pc.or_kleene(pc.is_null(captions), blank), True)).astype(bool)


def _to_numpy(array: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.to_numpy(zero_copy_only=False)


def _rows_summary(rows: Sequence[int]) -> str:
    shown = ", ".join(str(row) for row in rows[:_SHOW_ROWS])
    more = ", ..." if len(rows) > _SHOW_ROWS else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more} ({len(rows)} in total)"


__all__ = [
    "IMAGE_COLUMN",
    "CAPTION_COLUMN",
    "GROUP_COLUMN",
    "load_pairs",
    "check_images",
    "BadImageError",
    "SplitNotFoundError",
    "ForeignImagePathError",
    "RemoteImageError",
]
