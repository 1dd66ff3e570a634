"""Import faiss once, with a clear message when the CPU and GPU builds collide or neither is installed."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from importlib import metadata
from types import ModuleType

logger = logging.getLogger(__name__)

FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu")


def installed_faiss_distributions() -> list[str]:
    """Names of the faiss builds installed in this environment (they all share one `faiss/` folder)."""
    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


@functools.lru_cache(maxsize=1)
def import_faiss() -> ModuleType:
    """Return the `faiss` module, or raise an ImportError that says which single build to install.

    Example:
        >>> faiss = import_faiss()
        >>> faiss.IndexFlatIP(4).d
        4
    """
    builds = installed_faiss_distributions()
    if len(builds) > 1:
        raise ImportError(
            f"Several faiss builds are installed ({', '.join(builds)}); they overwrite one another's "
            f"`faiss/` folder. Keep exactly one: `pip uninstall -y {' '.join(builds)}` then "
            "`pip install 'hf_clipneg[cpu]'` (or `'hf_clipneg[gpu]'` for faiss-gpu-cu12)."
        )
    try:
        with _quiet_faiss_loader():
            import faiss
    except ImportError as err:
        raise ImportError(
            "faiss is not installed. Install exactly one build: `pip install 'hf_clipneg[cpu]'` "
            "(faiss-cpu) or `pip install 'hf_clipneg[gpu]'` (faiss-gpu-cu12, also runs on CPU)."
        ) from err
    return faiss


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def _quiet_faiss_loader() -> Iterator[None]:
    """faiss's loader logs at INFO which CPU build it tries, including an expected
    `ModuleNotFoundError("No module named 'faiss.swigfaiss_avx2'")` on machines or wheels without that build: it
    reads like an error under `logging.basicConfig(level=INFO)`. Keep its warnings and errors, drop the INFO lines."""
    loader = logging.getLogger("faiss.loader")
    quiet = _BelowWarning()
    loader.addFilter(quiet)
    try:
        yield
    finally:
        loader.removeFilter(quiet)


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for a CPU build or a machine without GPUs)."""
    faiss = import_faiss()
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if get_num_gpus is not None else 0
