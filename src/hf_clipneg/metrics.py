"""Image-text retrieval metrics (Recall@K, median and mean rank) -- the one implementation used by the
trainer's evaluation, the benchmarks, the `evaluate` module and the CLI.

Conventions (documented once, here):

* Metric names: ``t2i_R@K`` / ``i2t_R@K`` (Recall@K in percent, 0-100, as in the literature),
  ``t2i_median_rank`` / ``t2i_mean_rank`` (and ``i2t_...``), ``mean_R@K`` (mean of both directions).
  ``@`` is safe as a `transformers.Trainer` metric key: the Trainer prefixes ``eval_`` and looks the
  name up verbatim, so ``TrainingArguments(metric_for_best_model="t2i_R@1")`` works (MLflow's callback
  rewrites ``@`` to ``_`` when logging; the other loggers keep it). Ranks are lower-is-better, so
  pair a ``*_rank`` metric with ``greater_is_better=False``.
* "t2i" means text queries searching the images; "i2t" means image queries searching the texts.
* Rank = 1-based position of the FIRST relevant item. An item is relevant when its group equals the
  query's group (multi-positive: e.g. every image whose caption is identical). Without groups the
  pairing is the ground truth: item i matches only item i.
* Ties are pessimistic: an irrelevant item scoring the same as the best relevant one (within
  ``TIE_TOLERANCE``, to be robust to float round-off) is counted as ranked before it. A collapsed model
  that gives every item the same embedding therefore scores R@1 = 0 instead of 100.
* Median rank is the plain median of the ranks (it can end in .5 for an even number of queries).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._captions import normalise_caption
from ._matrices import as_float_matrix
from ._normalize import l2_normalize

logger = logging.getLogger(__name__)

#: Scores within this distance of the best relevant score count as ties (cosines lie in [-1, 1]).
TIE_TOLERANCE = 1e-6

#: Folder of the local `evaluate` module (loadable offline with `evaluate.load(RETRIEVAL_METRIC_PATH)`).
RETRIEVAL_METRIC_PATH = str(Path(__file__).resolve().parent / "retrieval_metric")

__all__ = [
    "RETRIEVAL_METRIC_PATH",
    "TIE_TOLERANCE",
    "groups_from_captions",
    "load_retrieval_metric",
    "retrieval_metrics",
    "trivial_recall_ks",
]


def groups_from_captions(captions: Iterable[str], normalise: bool = True) -> np.ndarray:
    """Map identical captions to one integer group id (in order of first appearance).

    With ``normalise=True`` captions are compared case-insensitively with whitespace collapsed,
    so ``"A red  circle "`` and ``"a red circle"`` share a group.

    Example:
        >>> groups_from_captions(["A red circle", "a blue square", "a red  circle "]).tolist()
        [0, 1, 0]
    """
    ids: dict[str, int] = {}
    groups = []
    for row, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"Caption row {row} is a {type(caption).__name__}, not a string; fix or drop that row.")
        key = normalise_caption(caption) if normalise else caption
        if not key.strip():
            raise ValueError(f"Caption row {row} is empty; fix or drop that row before computing retrieval metrics.")
        groups.append(ids.setdefault(key, len(ids)))
    return np.asarray(groups, dtype=np.int64)


def retrieval_metrics(
    image_embeds: np.ndarray | torch.Tensor,
    text_embeds: np.ndarray | torch.Tensor,
    image_groups: Sequence[Hashable] | np.ndarray | torch.Tensor | None = None,
    text_groups: Sequence[Hashable] | np.ndarray | torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    prefix: str = "",
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Text->image and image->text Recall@K (percent), median and mean rank of the first relevant item.

    Args:
        image_embeds: ``(M, D)`` image embeddings (numpy or torch; torch is computed on its device).
        text_embeds: ``(N, D)`` text embeddings. Both are L2-normalised here; similarity is cosine.
        image_groups / text_groups: group label of every image / text (any hashable: caption strings,
            ids from :func:`groups_from_captions`, a dataset's group column). A hit is any retrieved
            item in the query's group. Both ``None``: paired data (``M == N``, item i matches only i).
            Only one given with ``M == N``: the other side shares it (image i has text i's group).
        ks: the K values of Recall@K. A K larger than the gallery is allowed (the recall is then
            trivially 100) but logged as a warning.
        prefix: prepended to every key (e.g. ``"test_"``).
        chunk_size: number of queries scored at once; at most ``chunk_size x gallery`` scores exist at a time.

    Returns:
        ``{"t2i_R@1": ..., "t2i_median_rank": ..., "t2i_mean_rank": ..., "i2t_R@1": ..., ...,
        "mean_R@1": ...}`` as Python floats. Ties are pessimistic (see the module docstring).

    Example:
        >>> import numpy as np
        >>> emb = np.eye(3, dtype=np.float32)
        >>> m = retrieval_metrics(emb, emb, ks=(1,))
        >>> m["t2i_R@1"], m["i2t_median_rank"], m["mean_R@1"]
        (100.0, 1.0, 100.0)
        >>> retrieval_metrics(emb, emb[[1, 0, 2]], ks=(1,))["t2i_R@1"]  # texts 0 and 1 swapped
        33.33333333333333
    """
    ks = _check_ks(ks)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    images, texts = _as_embedding_pair(image_embeds, text_embeds)
    image_ids, text_ids = _group_ids(image_groups, text_groups, len(images), len(texts))

    for k in ks:
        if k > len(images) or k > len(texts):
            logger.warning(
                "Recall@%d is computed over a gallery of only %d images / %d texts; it is trivially 100 when "
                "K >= gallery size. Use smaller `ks` or a larger evaluation set for a meaningful number.",
                k,
                len(images),
                len(texts),
            )

    _warn_if_trivial(text_ids, image_ids, ks)

    t2i = _first_relevant_ranks(texts, images, text_ids, image_ids, chunk_size)
    i2t = _first_relevant_ranks(images, texts, image_ids, text_ids, chunk_size)

    metrics: dict[str, float] = {}
    for direction, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in ks:
            metrics[f"{prefix}{direction}_R@{k}"] = float(100.0 * np.mean(ranks <= k))
        metrics[f"{prefix}{direction}_median_rank"] = float(np.median(ranks))
        metrics[f"{prefix}{direction}_mean_rank"] = float(np.mean(ranks))
    for k in ks:
        metrics[f"{prefix}mean_R@{k}"] = (metrics[f"{prefix}t2i_R@{k}"] + metrics[f"{prefix}i2t_R@{k}"]) / 2.0
    return metrics


def load_retrieval_metric(**kwargs: Any):
    """Load the packaged `evaluate` module (offline; no Hub access). ``kwargs`` go to `evaluate.load`.

    The module is for paired data (N images, N texts); group labels and ``ks`` are compute arguments.

    Example:
        >>> import numpy as np
        >>> metric = load_retrieval_metric()
        >>> metric.compute(image_embeds=np.eye(2), text_embeds=np.eye(2), ks=[1])["t2i_R@1"]
        100.0
    """
    import evaluate

    return evaluate.load(RETRIEVAL_METRIC_PATH, **kwargs)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, int):
        ks = (ks,)
    checked = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"Every K in `ks` must be a positive integer, got {k!r} in {tuple(ks)!r}.")
        checked.append(int(k))
    if not checked:
        raise ValueError("`ks` is empty; pass at least one K, e.g. ks=(1, 5, 10).")
    return tuple(sorted(set(checked)))


def _as_embedding_pair(image_embeds: Any, text_embeds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate both matrices and return them L2-normalised, on one device, in one float dtype."""
    device = next((x.device for x in (image_embeds, text_embeds) if isinstance(x, torch.Tensor)), torch.device("cpu"))
    images = as_float_matrix(image_embeds, "image_embeds", device=device)
    texts = as_float_matrix(text_embeds, "text_embeds", device=device)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image_embeds have dimension {images.shape[1]} but text_embeds have {texts.shape[1]}; both must come "
            "from the same dual encoder's projections."
        )
    dtype = torch.float64 if images.dtype == texts.dtype == torch.float64 else torch.float32
    return l2_normalize(images.to(dtype), "image_embeds"), l2_normalize(texts.to(dtype), "text_embeds")


def _group_ids(image_groups: Any, text_groups: Any, n_images: int, n_texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn both group label lists into one shared integer id space."""
    if image_groups is None and text_groups is None:
        if n_images != n_texts:
            raise ValueError(
                f"Got {n_images} images and {n_texts} texts but no groups: without `image_groups` and `text_groups` "
                "the data must be paired (item i matches item i). Pass both group lists for unpaired data."
            )
        ids = torch.arange(n_images)
        return ids, ids
    if image_groups is None or text_groups is None:
        if n_images != n_texts:
            raise ValueError(
                f"Got {n_images} images and {n_texts} texts: with unpaired data pass both `image_groups` and `text_groups`."
            )
        image_groups = text_groups if image_groups is None else image_groups
        text_groups = image_groups if text_groups is None else text_groups
    image_labels = _labels(image_groups, "image_groups", n_images)
    text_labels = _labels(text_groups, "text_groups", n_texts)
    table: dict[Hashable, int] = {}
    image_ids = torch.tensor([table.setdefault(g, len(table)) for g in image_labels], dtype=torch.long)
    text_ids = torch.tensor([table.setdefault(g, len(table)) for g in text_labels], dtype=torch.long)
    _check_every_query_has_a_match(text_ids, image_ids, text_labels, "text", "image")
    _check_every_query_has_a_match(image_ids, text_ids, image_labels, "image", "text")
    return image_ids, text_ids


def _labels(groups: Any, name: str, expected: int) -> list[Hashable]:
    labels = groups.tolist() if isinstance(groups, (np.ndarray, torch.Tensor)) else list(groups)
    if len(labels) != expected:
        raise ValueError(f"{name} has {len(labels)} labels but there are {expected} embeddings; give one label per row.")
    for row, label in enumerate(labels):
        if label is None or (isinstance(label, float) and math.isnan(label)):
            raise ValueError(f"{name} row {row} is missing ({label!r}); every item needs a group label.")
        if not isinstance(label, Hashable):
            raise TypeError(f"{name} row {row} is a {type(label).__name__}, which cannot be used as a group label.")
    return labels


def trivial_recall_ks(query_ids: Any, gallery_ids: Any, ks: Sequence[int]) -> list[int]:
    """The Ks at which Recall@K is 100 by construction: every query's group covers all but fewer than K of the
    gallery, so even a model that ranks at random finds a relevant item in the top K.

    Example:
        >>> trivial_recall_ks([0, 0, 0], [0, 0, 0], (1, 5))  # one group: every metric is meaningless
        [1, 5]
        >>> trivial_recall_ks([0, 1, 2], [0, 1, 2], (1, 5))  # 3 items, each its own group: R@5 >= gallery
        [5]
    """
    query = torch.as_tensor(query_ids).long().flatten()
    gallery = torch.as_tensor(gallery_ids).long().flatten()
    if query.numel() == 0 or gallery.numel() == 0:
        return []
    labels, counts = torch.unique(gallery, return_counts=True)
    position = torch.searchsorted(labels, query).clamp(max=labels.numel() - 1)
    relevant = torch.where(labels[position] == query, counts[position], torch.zeros_like(position))
    worst_rank = int((gallery.numel() - relevant).max()) + 1  # all irrelevant items ranked first
    return [int(k) for k in ks if worst_rank <= k]


def _warn_if_trivial(text_ids: torch.Tensor, image_ids: torch.Tensor, ks: Sequence[int]) -> None:
    """Warn when the relevance groups (not the gallery size, warned about separately) make a Recall@K 100 for
    any model: e.g. an eval split whose captions are all identical forms a single group."""
    n_groups = int(torch.unique(torch.cat([text_ids.flatten(), image_ids.flatten()])).numel())
    small = [k for k in ks if k <= len(image_ids) and k <= len(text_ids)]
    trivial = sorted(set(trivial_recall_ks(text_ids, image_ids, small)) | set(trivial_recall_ks(image_ids, text_ids, small)))
    if trivial:
        logger.warning(
            "Recall@%s %s meaningless here: the %d images / %d texts form only %d relevance group(s), so every "
            "query finds an item of its own group in the top K whatever the model does (an untrained model scores "
            "100). Evaluate on rows with more distinct groups (captions or retrieval_group_column values); do not "
            "select checkpoints by %s.",
            "/".join(map(str, trivial)), "is" if len(trivial) == 1 else "are", len(image_ids), len(text_ids),
            n_groups, "this metric" if len(trivial) == 1 else "these metrics",
        )


def _check_every_query_has_a_match(
    query_ids: torch.Tensor, gallery_ids: torch.Tensor, labels: list[Hashable], query: str, gallery: str
) -> None:
    missing = (~torch.isin(query_ids, gallery_ids)).nonzero().flatten()
    if len(missing):
        row = int(missing[0])
        raise ValueError(
            f"{query} row {row} (group {labels[row]!r}) has no {gallery} in its group, so it cannot be retrieved "
            f"correctly ({len(missing)} such {query}s in all). Every group must occur on both sides; drop those rows "
            "or fix the group labels."
        )


def _first_relevant_ranks(
    queries: torch.Tensor, gallery: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor, chunk_size: int
) -> np.ndarray:
    """1-based rank of the best-scored relevant gallery item for every query (pessimistic ties)."""
    query_ids = query_ids.to(queries.device)
    gallery_ids = gallery_ids.to(queries.device)
    ranks = torch.empty(len(queries), dtype=torch.long, device=queries.device)
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        scores = queries[start:stop] @ gallery.T
        relevant = query_ids[start:stop, None] == gallery_ids[None, :]
        best_relevant = scores.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)
        ranked_before = (scores >= best_relevant - TIE_TOLERANCE) & ~relevant
        ranks[start:stop] = 1 + ranked_before.sum(dim=1)
        del scores, relevant, ranked_before
    return ranks.cpu().numpy()
