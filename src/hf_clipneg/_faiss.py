"""Import faiss once, with a clear message when the CPU and GPU builds collide or neither is installed."""

from __future__ import annotations

import functools
import logging
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
        import faiss
    except ImportError as err:
        raise ImportError(
            "faiss is not installed. Install exactly one build: `pip install 'hf_clipneg[cpu]'` "
            "(faiss-cpu) or `pip install 'hf_clipneg[gpu]'` (faiss-gpu-cu12, also runs on CPU)."
        ) from err
    return faiss


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for a CPU build or a machine without GPUs)."""
    faiss = import_faiss()
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if get_num_gpus is not None else 0
