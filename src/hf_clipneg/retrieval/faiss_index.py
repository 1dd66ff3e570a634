"""The faiss indexes behind `ClipNegRetriever`: building one over unit vectors, searching it, GPU placement.

Every index is an inner-product index over L2-normalised vectors, so its scores are cosine similarities.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_clipneg._faiss import faiss_gpu_count, import_faiss

logger = logging.getLogger(__name__)

# faiss GPU indexes cannot return more than this many neighbours per query.
_FAISS_GPU_MAX_K = 2048


class IndexType(str, enum.Enum):
    """faiss index kinds: exact search (``flat``) or inverted lists (``ivf``, approximate, faster on large sets)."""

    FLAT = "flat"
    IVF = "ivf"


@dataclass(frozen=True)
class SearchHit:
    """One search result: the indexed item's id, its cosine similarity to the query, and its 1-based rank."""

    id: Hashable
    score: float
    rank: int

    def to_dict(self) -> dict[str, Any]:
        """`{"rank", "id", "score"}`, JSON-ready (numpy scalars become Python numbers).

        Example:
            >>> SearchHit(id=3, score=0.5, rank=1).to_dict()
            {'rank': 1, 'id': 3, 'score': 0.5}
        """
        item = self.id.item() if hasattr(self.id, "item") else self.id
        return {"rank": int(self.rank), "id": item, "score": float(self.score)}


class Collection:
    """A faiss index plus the ids of its rows."""

    def __init__(self, index: Any, ids: list[Hashable], index_type: IndexType, nlist: int | None, nprobe: int | None):
        self.index = index
        self.ids = ids
        self.index_type = index_type
        self.nlist = nlist
        self.nprobe = nprobe

    @property
    def size(self) -> int:
        """Number of indexed items."""
        return len(self.ids)


def build_collection(
    matrix: np.ndarray, ids: list[Hashable], index_type: IndexType, nlist: int | None, nprobe: int, target: str
) -> Collection:
    """Index the ``(N, D)`` float32 unit rows of `matrix` in a new faiss index (on the GPUs when faiss sees any).

    ``IndexType.FLAT`` is exact; ``IndexType.IVF`` trains an `IndexIVFFlat` with `nlist` lists (default about
    ``4 * sqrt(N)``) and searches `nprobe` of them (at most `nlist`). Raises a ValueError for an `nlist` outside
    ``1..N`` or an `nprobe` below 1. `target` ("images" or "texts") only names the collection in the log.

    Example:
        >>> import numpy as np
        >>> collection = build_collection(np.eye(3, dtype=np.float32), ["a", "b", "c"], IndexType.FLAT, None, 8, "texts")
        >>> collection.size, collection.nprobe
        (3, None)
    """
    n, dim = matrix.shape
    faiss = import_faiss()
    if index_type is IndexType.FLAT:
        index = faiss.IndexFlatIP(dim)
        nlist = nprobe = None
    else:
        if nlist is None:
            nlist = max(1, min(n, int(round(4 * math.sqrt(n)))))
        if not isinstance(nlist, int) or not 1 <= nlist <= n:
            raise ValueError(
                f"nlist must be an integer between 1 and the number of vectors ({n}) for an IVF index, got {nlist!r}."
            )
        if not isinstance(nprobe, int) or nprobe < 1:
            raise ValueError(f"nprobe must be a positive integer, got {nprobe!r}.")
        if n < 39 * nlist:
            logger.info(
                "Training IVF with %d lists on only %d vectors (faiss suggests at least %d); recall may suffer.",
                nlist, n, 39 * nlist,
            )
        nprobe = min(nprobe, nlist)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # we log the small-training-set note ourselves (faiss prints to stderr)
        index.train(matrix)
        index.nprobe = nprobe
    index.add(matrix)
    index = maybe_to_gpu(index)
    logger.info("Indexed %d %s in a %s faiss index (dim %d).", n, target, index_type.value, dim)
    return Collection(index, ids, index_type, nlist, nprobe)


def check_k(k: int, collection: Collection, target: str) -> int:
    """`k` as an int, clamped (with a logged warning) to the collection's size; k < 1 or a non-integer raises.

    Example:
        >>> import numpy as np
        >>> check_k(1, build_collection(np.eye(2, dtype=np.float32), [0, 1], IndexType.FLAT, None, 8, "images"), "images")
        1
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    k = int(k)
    if k > collection.size:
        logger.warning(
            "k=%d is larger than the %d indexed %s; returning at most %d hits per query.",
            k, collection.size, target, collection.size,
        )
        k = collection.size
    if k > _FAISS_GPU_MAX_K and is_gpu_index(collection.index):
        raise ValueError(f"faiss GPU indexes return at most {_FAISS_GPU_MAX_K} neighbours per query; got k={k}.")
    return k


def search_collection(collection: Collection, queries: np.ndarray, k: int) -> list[list[SearchHit]]:
    """The `k` best hits of every row of the ``(Q, D)`` float32 unit `queries`, best first (see `check_k`).

    An IVF index may return fewer than `k` hits for a query when its probed lists hold too few items; that is
    logged as a warning suggesting a larger ``nprobe``.

    Example:
        >>> import numpy as np
        >>> collection = build_collection(np.eye(2, dtype=np.float32), ["x", "y"], IndexType.FLAT, None, 8, "images")
        >>> [hit.id for hit in search_collection(collection, np.array([[0.0, 1.0]], dtype=np.float32), 2)[0]]
        ['y', 'x']
    """
    scores, labels = collection.index.search(queries, k)
    results: list[list[SearchHit]] = []
    short = 0
    for row_scores, row_labels in zip(scores, labels):
        hits = [
            SearchHit(id=collection.ids[int(label)], score=float(score), rank=rank)
            for rank, (score, label) in enumerate(
                ((s, l) for s, l in zip(row_scores, row_labels) if l >= 0), start=1
            )
        ]
        short += len(hits) < k
        results.append(hits)
    if short:
        logger.warning(
            "%d of %d queries got fewer than k=%d hits: the %d probed IVF lists held too few items. "
            "Raise nprobe (index_*(..., nprobe=...)) for fuller results.",
            short, len(results), k, collection.nprobe or 0,
        )
    return results


def maybe_to_gpu(index: Any) -> Any:
    """`index` copied onto all GPUs faiss can see, or `index` itself when it sees none (faiss-cpu, no CUDA)."""
    if faiss_gpu_count() > 0:
        return import_faiss().index_cpu_to_all_gpus(index)
    return index


def is_gpu_index(index: Any) -> bool:
    """Whether `index` lives on GPUs (a faiss GPU index, or the replicas/shards `index_cpu_to_all_gpus` makes)."""
    name = type(index).__name__
    return name.startswith("Gpu") or name in ("IndexReplicas", "IndexShards")
