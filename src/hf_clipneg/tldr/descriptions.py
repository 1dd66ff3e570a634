"""Training texts for a text-trained head: templated, group-balanced descriptions, read from a file, and
filtered against the class prompts."""

from __future__ import annotations

import csv
import itertools
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .._matrices import as_float_matrix
from .._normalize import l2_normalize

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

DEFAULT_CLASS_PROMPT = "a photo of a {class}."
DEFAULT_TEMPLATES = (
    "a photo of a {class}.",
    "a picture of a {class}.",
    "an image of a {class}.",
    "a close-up photo of a {class}.",
    "a product photo of a {class}.",
    "a {class}.",
)
DEFAULT_GROUP_TEMPLATES = (
    "a photo of a {attr} {class}.",
    "a picture of a {attr} {class}.",
    "an image of a {attr} {class}.",
    "a close-up photo of a {attr} {class}.",
    "a product photo of a {attr} {class}.",
    "a {attr} {class}.",
)
GROUP_SEPARATOR = "/"


@dataclass(frozen=True)
class Description:
    """One training text: ``label`` is a class name, ``group`` the attribute value(s) or None."""

    text: str
    label: str
    group: str | None = None


def build_descriptions(
    class_names: Sequence[str],
    attributes: Mapping[str, Sequence[str]] | None = None,
    templates: Sequence[str] | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> list[Description]:
    """Templated, group-balanced descriptions: every class meets every group equally often.

    Templates use ``{class}``, ``{attr}`` (all attribute values of the group joined by spaces)
    and ``{<attribute name>}``. Groups are the Cartesian product of the attribute values, named by
    joining the values with ``"/"`` (just the value for a single attribute). With
    ``per_class=None`` every template is used once for every class and group; otherwise each
    class gets ``per_class`` descriptions (a multiple of the number of groups), templates drawn
    per group in a seeded order (cycling when more are asked for than there are templates).

    Example:
        >>> d = build_descriptions(["watch", "shoe"], {"gender": ["men's", "women's"]}, ["a {attr} {class}"])
        >>> [(x.text, x.label, x.group) for x in d][:2]
        [("a men's watch", 'watch', "men's"), ("a women's watch", 'watch', "women's")]
    """
    names = check_class_names(class_names)
    attributes = dict(attributes or {})
    for attribute, values in attributes.items():
        if not values:
            raise ValueError(f"Attribute {attribute!r} has no values; give at least one or leave it out.")
        if any(not str(v).strip() for v in values):
            raise ValueError(f"Attribute {attribute!r} has an empty value: {list(values)!r}.")
    if templates is None:
        templates = DEFAULT_GROUP_TEMPLATES if attributes else DEFAULT_TEMPLATES
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty; give at least one template containing '{class}'.")
    for i, template in enumerate(templates):
        if "{class}" not in template:
            raise ValueError(f"Template {i} ({template!r}) has no '{{class}}' placeholder.")
        if attributes and "{attr}" not in template and not any(f"{{{a}}}" in template for a in attributes):
            logger.warning("Template %r mentions no attribute: its texts are identical across groups.", template)
    attribute_names = list(attributes)
    groups = list(itertools.product(*(list(map(str, attributes[a])) for a in attribute_names)))
    n_groups = len(groups)
    if per_class is not None:
        if per_class < n_groups or per_class % n_groups:
            raise ValueError(
                f"per_class={per_class} must be a positive multiple of the number of groups ({n_groups}) "
                "so that every group is equally represented."
            )
        per_group = per_class // n_groups
        if per_group > len(templates):
            logger.warning(
                "per_class=%d asks for %d texts per group but there are only %d templates: texts repeat.",
                per_class, per_group, len(templates),
            )
    rng = random.Random(seed)
    descriptions = []
    for name in names:
        for values in groups:
            fields = {"class": name, "attr": " ".join(values), **dict(zip(attribute_names, values))}
            if per_class is None:
                chosen = templates
            else:
                order = templates[:]
                rng.shuffle(order)
                chosen = [order[i % len(order)] for i in range(per_group)]
            group = GROUP_SEPARATOR.join(values) if attributes else None
            for template in chosen:
                try:
                    text = template.format(**fields)
                except (KeyError, IndexError) as err:
                    raise ValueError(
                        f"Template {template!r} uses the unknown placeholder {err}; known ones: "
                        f"{sorted(fields)}."
                    ) from err
                descriptions.append(Description(" ".join(text.split()), name, group))
    return descriptions


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """The class names stripped of surrounding blanks; at least two, none empty, no duplicates.

    Raises:
        TypeError: `class_names` is one string (split a comma list first).
        ValueError: fewer than two names, an empty name, or duplicates.

    Example:
        >>> check_class_names([" shirt", "shoe "])
        ['shirt', 'shoe']
    """
    if isinstance(class_names, str):
        raise TypeError("class_names must be a list of names, not one string (split a comma list first).")
    names = [str(c).strip() for c in class_names]
    if len(names) < 2:
        raise ValueError(f"Need at least two class names, got {names!r}.")
    if any(not n for n in names):
        raise ValueError(f"class_names has an empty name at position {names.index('')}.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class_names has duplicates: {duplicates}.")
    return names


def read_descriptions(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> list[Description]:
    """Read descriptions from a CSV file (header with ``text,label[,group]``) or a tab-separated
    text file (``text<TAB>label[<TAB>group]`` per line; blank lines and ``#`` comments ignored).

    With ``class_names`` given, labels must be one of them (or an integer index into them).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.csv"
        >>> _ = p.write_text("text,label,group\\na red shoe,shoe,men\\n")
        >>> read_descriptions(p)
        [Description(text='a red shoe', label='shoe', group='men')]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Descriptions file {path} does not exist.")
    rows: list[tuple[int, str, str, str | None]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"text", "label"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path} lacks the column(s) {sorted(missing)}; the header must be text,label[,group].")
            for line, record in enumerate(reader, start=2):
                rows.append((line, record["text"] or "", record["label"] or "", record.get("group") or None))
    else:
        for line, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            parts = raw.split("\t")
            if len(parts) not in (2, 3):
                raise ValueError(f"{path} line {line}: expected 'text<TAB>label[<TAB>group]', got {raw!r}.")
            rows.append((line, parts[0], parts[1], parts[2] if len(parts) == 3 and parts[2].strip() else None))
    names = check_class_names(class_names) if class_names is not None else None
    descriptions = []
    for line, text, label, group in rows:
        text, label = text.strip(), label.strip()
        if not text:
            raise ValueError(f"{path} line {line}: the text is empty; write a description or delete the line.")
        if not label:
            raise ValueError(f"{path} line {line}: the label is empty.")
        if names is not None and label not in names:
            if label.isdigit() and int(label) < len(names):
                label = names[int(label)]
            else:
                raise ValueError(f"{path} line {line}: label {label!r} is not one of the classes {names}.")
        descriptions.append(Description(text, label, group.strip() if group else None))
    if not descriptions:
        raise ValueError(f"{path} holds no descriptions.")
    return descriptions


def filter_descriptions(
    descriptions: Sequence[Description],
    text_embeds: ArrayLike,
    class_text_embeds: ArrayLike | Mapping[str, ArrayLike],
    class_names: Sequence[str] | None = None,
    margin: float = 0.0,
) -> tuple[list[Description], list[Description]]:
    """Keep descriptions whose embedding is closer (cosine) to their own class's embedding than
    to every other class's by more than ``margin``; return ``(kept, dropped)``.

    ``class_text_embeds`` is either a mapping class name -> embedding (e.g. of "a photo of a
    {class}.") or a (C, p) array whose rows follow ``class_names``.

    Example:
        >>> import numpy as np
        >>> d = [Description("a shirt", "shirt"), Description("a shoe", "shirt")]
        >>> kept, dropped = filter_descriptions(d, np.array([[1.0, 0.1], [0.1, 1.0]]),
        ...                                     {"shirt": np.array([1.0, 0.0]), "shoe": np.array([0.0, 1.0])})
        >>> [x.text for x in kept], [x.text for x in dropped]
        (['a shirt'], ['a shoe'])
    """
    if isinstance(class_text_embeds, Mapping):
        names = check_class_names(list(class_text_embeds))
        rows = np.stack([np.asarray(class_text_embeds[n], dtype=np.float32).reshape(-1) for n in names])
        classes = as_float_matrix(rows, "class_text_embeds")
    else:
        if class_names is None:
            raise ValueError("class_text_embeds is an array: pass class_names (one per row) as well.")
        names = check_class_names(class_names)
        classes = as_float_matrix(class_text_embeds, "class_text_embeds", allow_vector=True)
        if classes.shape[0] != len(names):
            raise ValueError(f"class_text_embeds has {classes.shape[0]} rows but there are {len(names)} class names.")
    texts = as_float_matrix(text_embeds, "text_embeds", dim=classes.shape[1], allow_vector=True)
    if texts.shape[0] != len(descriptions):
        raise ValueError(f"text_embeds has {texts.shape[0]} rows but there are {len(descriptions)} descriptions.")
    index = {n: i for i, n in enumerate(names)}
    for row, description in enumerate(descriptions):
        if description.label not in index:
            raise ValueError(f"Description {row} ({description.text!r}) has label {description.label!r}, not one of {names}.")
    sims = l2_normalize(texts.double(), "text_embeds") @ l2_normalize(classes.double(), "class_text_embeds").T
    labels = torch.tensor([index[d.label] for d in descriptions])
    own = sims[torch.arange(len(descriptions)), labels]
    others = sims.clone()
    others[torch.arange(len(descriptions)), labels] = -float("inf")
    keep = (own - others.max(dim=1).values > margin).tolist()
    kept = [d for d, k in zip(descriptions, keep) if k]
    dropped = [d for d, k in zip(descriptions, keep) if not k]
    if dropped:
        logger.info("filter_descriptions dropped %d of %d descriptions, e.g. %r", len(dropped), len(descriptions), dropped[0])
    return kept, dropped
