"""The image column of loaded pairs: cast to `datasets.Image`, relative paths resolved, unreadable paths listed.

Nothing here decodes an image: paths are checked for existence only (decoding is `images.to_rgb`, run by
`check_images` and by every later step). Paths of a Hub dataset are never resolved on this machine's disk.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Image, Value

from .columns import IMAGE_COLUMN, SCAN_BATCH
from .map_cache import cached_map

#: (row, path) pairs: the rows whose image cannot be read, with the path each one names.
RowPaths = list[tuple[int, str]]


def _is_url(path: str) -> bool:
    return "://" in path


def prepare_images(
    dataset: Dataset, base_dir: str | None, user_column: str, remote_repo: str | None = None
) -> tuple[Dataset, RowPaths, RowPaths, RowPaths]:
    """Cast the image column to `Image()`, resolve relative paths and list rows whose file is missing.

    Returns `(dataset, missing, foreign, urls)`: the dataset with its `image` column cast (its `mode` kept) and
    relative paths made absolute against `base_dir` (the current folder when None), then three lists of
    `(row, path)`. `missing`: no image or no such file. `foreign` (Hub datasets only): a path outside that
    repository, removed from the returned rows and never opened. `urls`: rows of a local source whose image is
    a URL without embedded bytes: they cannot be read offline (nothing is downloaded at run time).

    For a Hub dataset (`remote_repo`) nothing is resolved on the local filesystem: a value without bytes
    must be a file of that repository (its folder in the Hub cache, or an `hf://datasets/<repo>` URL).
    Raises a ValueError naming `user_column` when the column's type can hold no images (e.g. integers).

    Example:
        >>> from datasets import Dataset
        >>> _, missing, foreign, urls = prepare_images(Dataset.from_dict({"image": ["/no/such.png"]}), None, "image")
        >>> missing, foreign, urls
        ([(0, '/no/such.png')], [], [])
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

    missing: RowPaths = []
    foreign: RowPaths = []
    urls: RowPaths = []
    allowed = _repo_locations(remote_repo) if remote_repo else None
    relative = False
    offset = 0
    for batch in dataset.select_columns([IMAGE_COLUMN]).with_format("arrow").iter(batch_size=SCAN_BATCH):
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
        dataset = _map_paths(dataset, _drop_foreign_paths, {"allowed": allowed}, "Dropping foreign image paths")
    if relative:
        dataset = _map_paths(dataset, _absolute_paths, {"base": base}, "Resolving image paths")
    return dataset.cast_column(IMAGE_COLUMN, Image(mode=mode)), missing, foreign, urls


def _map_paths(dataset: Dataset, function: Any, fn_kwargs: dict[str, Any], desc: str) -> Dataset:
    """`function` over batches of the undecoded image column, cached under the function's name."""
    return cached_map(
        dataset,
        function,
        function.__name__.lstrip("_"),
        fn_kwargs,
        batched=True,
        input_columns=[IMAGE_COLUMN],
        features=dataset.features,
        desc=desc,
    )


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
