"""Load image-caption pairs from any source into a `datasets.Dataset` with canonical column names.

Whatever the source (an in-memory dataset, a Hub id, parquet/csv/json files, a `save_to_disk`
folder, an imagefolder), the result has an `image` column (`datasets.Image()`, decoded lazily), a
`caption` column (strings) and, when asked, a `group` column (e.g. a product id); every other
column is kept as it is. Problems found cheaply at load time (unknown columns, missing image files,
empty or non-string captions) raise errors that name the rows; undecodable images are found by
`check_images`, which decodes everything once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Image, Value, concatenate_datasets
from datasets.utils.tqdm import tqdm

from .columns import CAPTION_COLUMN, GROUP_COLUMN, IMAGE_COLUMN, SCAN_BATCH, blank_captions, to_numpy
from .errors import ForeignImagePathError, MissingColumnError, RemoteImageError
from .image_paths import prepare_images
from .images import BadImageError, to_rgb
from .sources import DataSource, load_source

logger = logging.getLogger(__name__)

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

    parts = load_source(source, split, revision, token, data_dir, split_required)
    prepared, missing_images, foreign_images, url_images, offset = [], [], [], [], 0
    for part in parts:
        dataset = part.dataset
        if max_rows is not None:
            if offset >= max_rows:
                break
            dataset = dataset.select(range(min(len(dataset), max_rows - offset)))
        _check_columns(dataset, roles, part.hint)
        dataset = _rename(dataset, roles)
        dataset, missing, foreign, urls = prepare_images(dataset, part.base_dir, image_column, part.remote_repo)
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
    bad = np.flatnonzero(to_numpy(pc.is_valid(errors))).tolist()
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


def _check_choice(name: str, value: str) -> None:
    if value not in ("error", "skip"):
        raise ValueError(f"{name} must be 'error' or 'skip', got {value!r}.")


def _check_columns(dataset: Dataset, roles: dict[str, str], hint: str) -> None:
    for role, column in roles.items():
        if column not in dataset.column_names:
            raise MissingColumnError(
                f"The {role} column {column!r} is not in the dataset; available columns: "
                f"{dataset.column_names}. Pass {role}_column=... with one of them.{hint}",
                role, column, list(dataset.column_names),
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
    batches = dataset.select_columns(columns).with_format("arrow").iter(batch_size=SCAN_BATCH)
    total = -(-len(dataset) // SCAN_BATCH)
    for batch in tqdm(batches, total=total, desc="Checking captions", disable=total < 10):
        empty += (np.flatnonzero(blank_captions(batch.column(CAPTION_COLUMN))) + offset).tolist()
        if has_group:
            no_group += (np.flatnonzero(to_numpy(pc.is_null(batch.column(GROUP_COLUMN)))) + offset).tolist()
        offset += batch.num_rows
    return empty, no_group


def _rows_summary(rows: Sequence[int]) -> str:
    shown = ", ".join(str(row) for row in rows[:_SHOW_ROWS])
    more = ", ..." if len(rows) > _SHOW_ROWS else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more} ({len(rows)} in total)"


__all__ = ["load_pairs", "check_images"]
