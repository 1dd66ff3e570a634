"""Self-labelling of clusters from their captions, so a person can see what each cluster holds.

Distinguishing words are ranked by the log-odds ratio with an informative Dirichlet prior
(Monroe, Colaresi & Quinn 2008, "Fightin' Words"): for each word, the smoothed log-odds of a caption
*in* the cluster containing it minus the same for captions *outside*, divided by its standard error,
so that a word must be both frequent in the cluster and rarer elsewhere to rank high. Counts are
per caption (document frequency): catalogue titles repeat words, and a repeated word should not count twice.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

ENGLISH_STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours ourselves out over own same she
    should so some such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves s t via per
    """.split()
)

_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)


@dataclass
class ClusterName:
    """A human-readable description of one cluster.

    Attributes:
        cluster: cluster id.
        name: short label, the top distinguishing words joined by spaces (``"cluster {id}"`` only when
            the cluster's captions have no usable word at all).
        top_words: words that best separate this cluster's captions from the others', best first.
        central_captions: distinct captions nearest the mean text feature of the cluster (or, without
            text features, the most frequent captions).
        nearest_caption: caption (over the whole data set) whose text feature is nearest the image
            centroid of the cluster, when aligned text features and image centroids are given.
        size: number of rows in the cluster.
    """

    cluster: int
    name: str
    top_words: list[str] = field(default_factory=list)
    central_captions: list[str] = field(default_factory=list)
    nearest_caption: str | None = None
    size: int = 0


def tokenize(caption: str, stopwords: Iterable[str] = ENGLISH_STOPWORDS) -> list[str]:
    """Lower-cased word tokens of a caption without stopwords and pure numbers.

    Example:
        >>> tokenize("The Men's Blue T-shirt, 2 pack")
        ["men's", 'blue', 'shirt', 'pack']
    """
    stop = stopwords if isinstance(stopwords, (set, frozenset)) else set(stopwords)
    words = []
    for match in _TOKEN.findall(caption.lower()):
        word = match.replace("’", "'")
        if len(word) < 2 or word.isdigit() or word in stop:
            continue
        words.append(word)
    return words


def _check_inputs(assignments: np.ndarray, captions: Sequence[str], text_features, image_centroids) -> None:
    if assignments.ndim != 1:
        raise ValueError(f"assignments must be 1-D (one cluster id per row), got shape {assignments.shape}.")
    if not np.issubdtype(assignments.dtype, np.integer):
        raise TypeError(f"assignments must be integer cluster ids, got dtype {assignments.dtype}.")
    if len(captions) != assignments.shape[0]:
        raise ValueError(f"captions has {len(captions)} rows but assignments has {assignments.shape[0]}; they must align.")
    if assignments.size and assignments.min() < 0:
        bad = np.flatnonzero(assignments < 0)
        raise ValueError(f"assignments has negative cluster ids at rows {bad[:10].tolist()}; ids must be >= 0.")
    for row, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption at row {row} is {type(caption).__name__}, not str; fill or drop it first.")
    if text_features is not None:
        if text_features.ndim != 2 or text_features.shape[0] != assignments.shape[0]:
            raise ValueError(
                f"text_features must be (rows={assignments.shape[0]}, dim), got shape {text_features.shape}."
            )
        bad = np.flatnonzero(~np.isfinite(text_features).all(axis=1))
        if bad.size:
            raise ValueError(f"text_features has NaN/inf at rows {bad[:10].tolist()}; recompute or drop those rows.")
    if image_centroids is not None:
        if text_features is None:
            raise ValueError("image_centroids needs text_features (aligned towers) to find each cluster's nearest caption.")
        if image_centroids.ndim != 2 or image_centroids.shape[1] != text_features.shape[1]:
            raise ValueError(
                f"image_centroids must be (k, {text_features.shape[1]}) to compare with the text features "
                f"(aligned towers / projections), got shape {image_centroids.shape}."
            )


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def _distinct_in_order(captions: Iterable[str], limit: int) -> list[str]:
    chosen: list[str] = []
    for caption in captions:
        if caption not in chosen:
            chosen.append(caption)
            if len(chosen) == limit:
                break
    return chosen


def distinguishing_words(
    in_counts: Counter, in_docs: int, total_counts: Counter, total_docs: int, top: int, prior: float = 10.0
) -> list[str]:
    """Words of a group ranked by the z-scored log-odds ratio of appearing in a caption in vs. out of it.

    Each word's rate of appearing in a caption gets a Beta prior centred on its overall rate, worth
    ``prior`` captions, which damps words seen only once or twice.

    ``in_counts`` / ``total_counts``: number of captions containing each word in the group / overall.

    Example:
        >>> distinguishing_words(Counter(red=3, shirt=3), 3, Counter(red=3, shirt=6, blue=3), 6, top=1)
        ['red']
    """
    out_docs = total_docs - in_docs
    scored = []
    for word, inside in in_counts.items():
        outside = total_counts[word] - inside
        rate = total_counts[word] / max(total_docs, 1)
        a, b = prior * rate, prior * (1.0 - rate) + 1e-3
        log_odds_in = np.log((inside + a) / (in_docs - inside + b))
        log_odds_out = np.log((outside + a) / (out_docs - outside + b))
        variance = 1 / (inside + a) + 1 / (in_docs - inside + b) + 1 / (outside + a) + 1 / (out_docs - outside + b)
        scored.append((-(log_odds_in - log_odds_out) / np.sqrt(variance), -inside, word))
    scored.sort()
    return [word for _, _, word in scored[:top]]


def name_clusters(
    assignments: np.ndarray,
    captions: Sequence[str],
    text_features: np.ndarray | None = None,
    image_centroids: np.ndarray | None = None,
    top_words: int = 3,
    top_captions: int = 3,
    stopwords: Iterable[str] | None = None,
) -> list[ClusterName]:
    """Describe every cluster by its distinguishing words and its most typical captions.

    Args:
        assignments: ``(N,)`` int cluster id of every row.
        captions: the ``N`` captions (str), aligned with ``assignments``.
        text_features: optional ``(N, d)`` caption embeddings; the central captions are then those
            nearest (cosine) the cluster's mean text feature, else the most frequent captions.
        image_centroids: optional ``(k, d)`` image-cluster centroids in the same space as
            ``text_features`` (aligned towers); each cluster then gets ``nearest_caption``. Also
            fixes the number of clusters at ``k`` (clusters without rows get the fallback name).
        top_words: distinguishing words per cluster (the name joins them).
        top_captions: central captions per cluster.
        stopwords: words to ignore (default: a built-in English list).

    Returns:
        One :class:`ClusterName` per cluster id ``0 .. k-1`` (``k = max id + 1``, or the number of
        centroids when larger), in order.

    Example:
        >>> captions = ["red cotton shirt", "red silk shirt", "blue denim jeans", "blue slim jeans"]
        >>> names = name_clusters(np.array([0, 0, 1, 1]), captions, top_words=1)
        >>> [n.name for n in names]
        ['red', 'blue']
    """
    labels = np.asarray(assignments)
    text = np.asarray(text_features, dtype=np.float64) if text_features is not None else None
    centroids = np.asarray(image_centroids, dtype=np.float64) if image_centroids is not None else None
    _check_inputs(labels, captions, text, centroids)
    if top_words < 1 or top_captions < 0:
        raise ValueError(f"top_words must be >= 1 and top_captions >= 0, got {top_words} and {top_captions}.")
    stop = ENGLISH_STOPWORDS if stopwords is None else frozenset(w.lower() for w in stopwords)
    n_clusters = int(labels.max()) + 1 if labels.size else 0
    if centroids is not None:
        n_clusters = max(n_clusters, centroids.shape[0])

    doc_words = [set(tokenize(c, stop)) for c in captions]
    total_counts: Counter = Counter()
    for words in doc_words:
        total_counts.update(words)
    unit_text = _unit(text) if text is not None else None
    nearest_rows = None
    if centroids is not None:
        nearest_rows = np.argmax(_unit(centroids) @ unit_text.T, axis=1)

    names = []
    no_words = 0
    for cluster in range(n_clusters):
        rows = np.flatnonzero(labels == cluster)
        in_counts: Counter = Counter()
        for row in rows:
            in_counts.update(doc_words[row])
        words = distinguishing_words(in_counts, rows.size, total_counts, len(captions), top_words)
        if rows.size and unit_text is not None:
            mean = _unit(unit_text[rows].mean(axis=0))
            order = rows[np.argsort(-(unit_text[rows] @ mean), kind="stable")]
            central = _distinct_in_order((captions[r] for r in order), top_captions)
        else:
            frequency = Counter(captions[r] for r in rows)
            first_seen = {}
            for r in rows:
                first_seen.setdefault(captions[r], r)
            ranked = sorted(frequency, key=lambda c: (-frequency[c], first_seen[c]))
            central = ranked[:top_captions]
        if not words:
            no_words += 1
        names.append(
            ClusterName(
                cluster=cluster,
                name=" ".join(words) if words else f"cluster {cluster}",
                top_words=words,
                central_captions=central,
                nearest_caption=captions[int(nearest_rows[cluster])] if nearest_rows is not None else None,
                size=int(rows.size),
            )
        )
    if no_words:
        logger.info("name_clusters: %d of %d clusters have no caption words and are named 'cluster <id>'.", no_words, n_clusters)
    return names
