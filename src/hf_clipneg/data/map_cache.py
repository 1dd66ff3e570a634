"""Where a `datasets.map` step caches its result, so that steps over read-only folders still run and cache."""

from __future__ import annotations

import logging
import os
from typing import Any

from datasets import Dataset

logger = logging.getLogger(__name__)


def map_cache_file(dataset: Dataset, fingerprint: str) -> str | None:
    """Where a `dataset.map` with `new_fingerprint=fingerprint` may write its result.

    None (datasets' own choice: beside the dataset's cache files) when that folder is writable or the dataset
    has no cache files; otherwise (a `save_to_disk` folder on a read-only disk or mount) a file in the datasets
    cache folder (`datasets.config.HF_DATASETS_CACHE`), so that the step still runs and its result is cached.

    Example:
        >>> from datasets import Dataset
        >>> map_cache_file(Dataset.from_dict({"a": [1]}), "f00") is None  # in memory: no cache files
        True
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


def cached_map(dataset: Dataset, function: Any, name: str, fn_kwargs: dict[str, Any], **kwargs: Any) -> Dataset:
    """`dataset.map(function, ...)` with a fingerprint of its own and a cache file that is writable.

    The fingerprint hashes the input's fingerprint, the step's `name` and `fn_kwargs`, so one step over one
    input is computed once and then read from the cache.
    """
    from datasets.fingerprint import Hasher

    fingerprint = Hasher.hash([dataset._fingerprint, "hf_clipneg", name, fn_kwargs])
    return dataset.map(
        function, fn_kwargs=fn_kwargs, new_fingerprint=fingerprint,
        cache_file_name=map_cache_file(dataset, fingerprint), **kwargs,
    )
