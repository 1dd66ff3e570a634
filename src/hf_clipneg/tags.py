"""Caption tags for text-tag self-distillation (TTD): content words and short phrases of a caption,
and the tokenised tag batch the collator hands to the trainer.

Tags are extracted with plain rules (no tagger model, works offline): lowercase, split into words
(hyphenated words such as ``t-shirt`` stay whole, a trailing ``'s`` is removed), drop English
stopwords, numbers and one-letter words, keep the order of first appearance and drop duplicates.
With ``phrases=True`` the bigrams of two adjacent content words (no stopword between them) follow
the single words. A dataset may instead carry its own tags in a list column (e.g. ``tags``), which
is used as is.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["ENGLISH_STOPWORDS", "extract_tags", "extract_tags_batch", "tag_token_batch"]

ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each either few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most my
    myself neither no nor not now of off on once only or other our ours ourselves out over own per same she
    should so some such than that the their theirs them themselves then there these they this those through
    to too under until up very via was we were what when where which while who whom why will with within
    without would you your yours yourself yourselves one two three four five six seven eight nine ten set
    pack pair pcs pc piece pieces image photo picture
    """.split()
)

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def _words(caption: str) -> list[str]:
    """Lowercased words of the caption in order, possessive 's removed."""
    out: list[str] = []
    for token in _WORD.findall(caption.lower()):
        if token.endswith("'s"):
            token = token[:-2]
        out.append(token)
    return out


def extract_tags(
    caption: str,
    stopwords: Iterable[str] | None = None,
    max_tags: int = 8,
    phrases: bool = True,
) -> list[str]:
    """Return the tags of one caption: its content words, then (optionally) bigrams of adjacent ones.

    Args:
        caption: the text.
        stopwords: words to drop; None uses `ENGLISH_STOPWORDS`.
        max_tags: keep at most this many tags (single words first, so phrases are cut before words).
        phrases: add bigrams of two adjacent content words ("blue jeans").

    Raises:
        TypeError: `caption` is not a string.
        ValueError: `max_tags` < 1.

    Example:
        >>> extract_tags("Peter England Men Party Blue Jeans", max_tags=8)
        ['peter', 'england', 'men', 'party', 'blue', 'jeans', 'peter england', 'england men']
        >>> extract_tags("A photo of 2 red T-Shirts", phrases=False)
        ['red', 't-shirts']
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}.")
    if max_tags < 1:
        raise ValueError(f"max_tags must be >= 1, got {max_tags}.")
    drop = ENGLISH_STOPWORDS if stopwords is None else frozenset(word.lower() for word in stopwords)
    content: list[str | None] = []
    for word in _words(caption):
        keep = len(word) > 1 and word not in drop and any(ch.isalpha() for ch in word)
        content.append(word if keep else None)
    tags = list(dict.fromkeys(word for word in content if word is not None))
    if phrases:
        bigrams = [f"{a} {b}" for a, b in zip(content, content[1:]) if a is not None and b is not None and a != b]
        tags += [phrase for phrase in dict.fromkeys(bigrams) if phrase not in tags]
    return tags[:max_tags]


def extract_tags_batch(
    captions: Sequence[str],
    stopwords: Iterable[str] | None = None,
    max_tags: int = 8,
    phrases: bool = True,
) -> list[list[str]]:
    """`extract_tags` for each caption; usable with `datasets.Dataset.map(batched=True)`.

    Raises:
        TypeError: a caption is not a string (the error names its position).

    Example:
        >>> extract_tags_batch(["red dress", "the blue bag"], phrases=False)
        [['red', 'dress'], ['blue', 'bag']]
    """
    if isinstance(captions, str):
        raise TypeError("extract_tags_batch takes a list of captions; use extract_tags for one caption.")
    stop = None if stopwords is None else frozenset(word.lower() for word in stopwords)
    out = []
    for row, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"Caption at row {row} is {type(caption).__name__}, not a string: {caption!r}.")
        out.append(extract_tags(caption, stop, max_tags=max_tags, phrases=phrases))
    return out


def _validate_tags(tags: Sequence[Any], batch: int) -> list[list[str]]:
    if len(tags) != batch:
        raise ValueError(f"Got {len(tags)} tag lists for {batch} captions: pass one list of tags per caption.")
    out = []
    for row, row_tags in enumerate(tags):
        if isinstance(row_tags, str) or not isinstance(row_tags, Sequence):
            raise TypeError(
                f"Tags of row {row} must be a list of strings, got {type(row_tags).__name__}: {row_tags!r}."
            )
        for tag in row_tags:
            if not isinstance(tag, str) or not tag.strip():
                raise ValueError(f"Tags of row {row} contain {tag!r}: every tag must be a non-empty string.")
        out.append(list(row_tags))
    return out


def tag_token_batch(
    tokenizer: Any,
    captions: Sequence[str],
    max_tags: int = 8,
    max_length: int = 16,
    tags: Sequence[Sequence[str]] | None = None,
    phrases: bool = True,
) -> dict[str, torch.Tensor]:
    """Tokenise the tags of a batch of captions for the TTD loss.

    Every caption gets ``T`` tag slots, ``T`` = the largest tag count in the batch (at most `max_tags`,
    at least 1). Empty slots hold an empty string and are False in ``tag_mask``.

    Args:
        tokenizer: the dual encoder's tokenizer (``processor.tokenizer``).
        captions: the B captions.
        max_tags: tag slots per caption at most; longer tag lists are cut (single words come first).
        max_length: token length limit of one tag.
        tags: per-caption tags from a dataset column, used instead of `extract_tags` (cut to `max_tags`).
        phrases: passed to `extract_tags`.

    Returns:
        ``tag_input_ids`` and ``tag_attention_mask`` of shape ``(B * T, L)`` (row ``i * T + t`` is tag t of
        caption i) and the boolean ``tag_mask`` ``(B, T)``.

    Example:
        >>> from hf_clipneg.testing import build_tiny_tokenizer
        >>> batch = tag_token_batch(build_tiny_tokenizer(), ["red shirt", "a blue bag"], phrases=False)
        >>> tuple(batch["tag_input_ids"].shape[:1]), batch["tag_mask"].tolist()
        ((4,), [[True, True], [True, True]])
    """
    if max_tags < 1:
        raise ValueError(f"max_tags must be >= 1, got {max_tags}.")
    if tags is None:
        tag_lists = extract_tags_batch(captions, max_tags=max_tags, phrases=phrases)
    else:
        tag_lists = [row[:max_tags] for row in _validate_tags(tags, len(captions))]
    empty = sum(1 for row in tag_lists if not row)
    if empty:
        logger.debug("%d of %d captions have no tags; they get no TTD term.", empty, len(tag_lists))
    slots = max(1, max(len(row) for row in tag_lists) if tag_lists else 1)
    flat = [row[t] if t < len(row) else "" for row in tag_lists for t in range(slots)]
    tokens = tokenizer(flat, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    mask = torch.tensor([[t < len(row) for t in range(slots)] for row in tag_lists], dtype=torch.bool)
    return {
        "tag_input_ids": tokens["input_ids"],
        "tag_attention_mask": tokens["attention_mask"],
        "tag_mask": mask.reshape(len(tag_lists), slots),
    }
