"""Text-only last-layer retraining (TLDR, Park, Jeong & Moon, WACV 2025) and modality-gap tools.

A dual encoder puts images and texts in one embedding space, but the two modalities sit in two
separate cones: every image embedding is shifted by roughly the same *modality gap* vector from
the text embedding of its caption. Once that shift is handled, text embeddings can stand in for
image embeddings when training a linear classifier, so a group-balanced set of templated
descriptions ("a photo of a women's watch", ...) gives group-balanced last-layer retraining
without a single group-annotated image.

The pieces, each usable on its own:

* :func:`modality_gap` measures the gap on paired image/text embeddings.
* :class:`ImageSpaceProjector` maps the joint space into a target classifier's feature space (for
  example the vision tower's own pooled features), fitted by ridge regression on images and
  constrained to send the gap direction to zero, so projected texts land where images would.
* :func:`build_descriptions` / :func:`read_descriptions` / :func:`filter_descriptions` make,
  load and validate the training texts.
* :class:`TextTrainedHead` is the linear classifier trained on (projected) text embeddings;
  :func:`fit_text_head` does embedding, filtering and training in one call.
* :func:`zero_shot_classify` is the prompt baseline; :func:`group_accuracy` the evaluation.
* :func:`tldr_main` is the ``hf-clipneg tldr`` command.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ._matrices import as_float_matrix, l2_normalise

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
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


# ----------------------------------------------------------------------------------------------
# array helpers


def _as_matrix(x: ArrayLike, name: str, dim: int | None = None) -> torch.Tensor:
    return as_float_matrix(x, name, dim=dim, allow_vector=True)


def _like_input(result: torch.Tensor, original: ArrayLike) -> ArrayLike:
    return result if isinstance(original, torch.Tensor) else result.detach().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# modality gap


@dataclass
class ModalityGap:
    """The image-text modality gap of a joint embedding space (see :func:`modality_gap`)."""

    vector: np.ndarray
    """mean of the L2-normalised image embeddings minus mean of the L2-normalised text embeddings."""
    norm: float
    """Euclidean length of ``vector``."""
    explained_variance: float
    """Share of the total variance of the pooled (image and text) embeddings along the gap direction."""

    @property
    def direction(self) -> np.ndarray:
        """The unit gap direction (zeros when the gap is zero)."""
        return self.vector / self.norm if self.norm > 0 else np.zeros_like(self.vector)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form.

        Example:
            >>> import numpy as np
            >>> gap = modality_gap(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
            >>> sorted(gap.to_dict())
            ['explained_variance', 'norm', 'vector']
        """
        return {"vector": self.vector.tolist(), "norm": self.norm, "explained_variance": self.explained_variance}


def modality_gap(image_embeds: ArrayLike, text_embeds: ArrayLike) -> ModalityGap:
    """Measure the modality gap between image and text embeddings (usually of matching pairs).

    Rows are L2-normalised first. The explained variance is the variance of the pooled
    ``image ∪ text`` rows along the unit gap direction divided by their total variance (the trace
    of their covariance): near 1 when the two modalities are two tight, separated clusters.

    Example:
        >>> import numpy as np
        >>> gap = modality_gap(np.array([[1.0, 0.0, 0.0]] * 2), np.array([[0.0, 1.0, 0.0]] * 2))
        >>> round(gap.norm, 4), round(gap.explained_variance, 4)
        (1.4142, 1.0)
    """
    images = l2_normalise(_as_matrix(image_embeds, "image_embeds").double(), "image_embeds")
    texts = l2_normalise(_as_matrix(text_embeds, "text_embeds", dim=images.shape[1]).double(), "text_embeds")
    if images.shape[0] != texts.shape[0]:
        logger.info("modality_gap on %d images and %d texts (not paired one-to-one)", images.shape[0], texts.shape[0])
    vector = images.mean(0) - texts.mean(0)
    norm = float(vector.norm())
    pooled = torch.cat([images, texts])
    centred = pooled - pooled.mean(0)
    total = float(centred.pow(2).sum(1).mean())
    if norm == 0 or total == 0:
        explained = 0.0
    else:
        explained = float((centred @ (vector / norm)).pow(2).mean()) / total
    return ModalityGap(vector=vector.float().numpy(), norm=norm, explained_variance=explained)


# ----------------------------------------------------------------------------------------------
# projector


class ImageSpaceProjector:
    """Linear map ``y = W x + b`` from the joint embedding space into a target feature space.

    Fitted in closed form on *images* (``X``: joint image embeddings, ``Y``: the target
    classifier's features of the same images) with the constraint ``W u = 0`` for the unit
    modality-gap direction ``u``. The constrained least squares problem is solved exactly by
    projecting the inputs onto the orthogonal complement of ``u`` (``P = I - u uᵀ``) and doing
    ridge regression on ``X P``; the result is multiplied by ``P`` once more so the constraint
    holds to machine precision. Because the map ignores the gap direction, a text embedding
    ``t`` and the same text shifted by the gap (``t + gap``, where its image would be) map to
    the same point: no modality-specific handling is needed at transform time.

    ``alpha`` is the ridge strength per sample (the objective is the mean squared error plus
    ``alpha * ||W||²``), so it does not depend on the number of images.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X, Y = rng.normal(size=(50, 8)), rng.normal(size=(50, 4))
        >>> gap = np.eye(8)[0]
        >>> proj = ImageSpaceProjector().fit(X, Y, gap)
        >>> proj.transform(X).shape
        (50, 4)
        >>> bool(np.abs(proj.weight.numpy() @ gap).max() < 1e-6)
        True
    """

    def __init__(self, normalize_inputs: bool = True) -> None:
        self.normalize_inputs = normalize_inputs
        self.weight: torch.Tensor | None = None  # (out_dim, in_dim)
        self.bias: torch.Tensor | None = None  # (out_dim,)
        self.gap_vector: torch.Tensor | None = None  # (in_dim,)
        self.alpha: float | None = None
        self.num_fit_samples: int | None = None

    @property
    def is_fitted(self) -> bool:
        return self.weight is not None

    @property
    def in_dim(self) -> int:
        self._check_fitted()
        return int(self.weight.shape[1])

    @property
    def out_dim(self) -> int:
        self._check_fitted()
        return int(self.weight.shape[0])

    def _check_fitted(self) -> None:
        if self.weight is None:
            raise RuntimeError("This ImageSpaceProjector is not fitted yet: call fit(X, Y, gap_vector) first.")

    def fit(
        self, X: ArrayLike, Y: ArrayLike, gap_vector: ArrayLike | None, alpha: float = 1e-2
    ) -> "ImageSpaceProjector":
        """Fit on image embeddings ``X`` (n, p) and target features ``Y`` (n, f); returns self."""
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        x = _as_matrix(X, "X").double()
        if self.normalize_inputs:
            x = l2_normalise(x, "X")
        y = _as_matrix(Y, "Y").double()
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"X has {x.shape[0]} rows but Y has {y.shape[0]}: they must describe the same images.")
        n, p = x.shape
        basis = torch.eye(p, dtype=torch.float64)  # columns span the inputs the map may use
        if gap_vector is None:
            logger.warning("ImageSpaceProjector.fit without a gap vector: the modality gap is not removed.")
            self.gap_vector = None
        else:
            gap = _as_matrix(gap_vector, "gap_vector", dim=p).double()[0]
            if float(gap.norm()) == 0:
                raise ValueError("gap_vector is all zeros; pass ModalityGap.vector from modality_gap().")
            u = gap / gap.norm()
            # Orthonormal basis of the complement of u: regressing on X @ basis is the constrained
            # least squares problem, and its Gram matrix stays invertible even with alpha=0.
            eigvals, eigvecs = torch.linalg.eigh(torch.eye(p, dtype=torch.float64) - torch.outer(u, u))
            basis = eigvecs[:, eigvals > 0.5]
            self.gap_vector = gap.float()
        x_mean, y_mean = x.mean(0), y.mean(0)
        z = (x - x_mean) @ basis
        yc = y - y_mean
        gram = z.T @ z + alpha * n * torch.eye(z.shape[1], dtype=torch.float64)
        coef = basis @ torch.linalg.solve(gram, z.T @ yc)  # (p, f)
        if gap_vector is not None:
            coef = coef - torch.outer(u, u @ coef)  # remove rounding residue along u
        self.weight = coef.T.contiguous().float()
        self.bias = (y_mean - x_mean @ coef).float()
        self.alpha = float(alpha)
        self.num_fit_samples = n
        logger.info("ImageSpaceProjector fitted on %d images: %d -> %d dims, R^2 = %.3f", n, p, y.shape[1], self.score(X, Y))
        return self

    def _transform_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize_inputs:
            x = l2_normalise(x, "X")
        weight = self.weight.to(device=x.device, dtype=x.dtype)
        return x @ weight.T + self.bias.to(device=x.device, dtype=x.dtype)

    def transform(self, X: ArrayLike) -> ArrayLike:
        """Map joint-space embeddings (images or texts) into the target space; numpy in, numpy out."""
        self._check_fitted()
        return _like_input(self._transform_tensor(_as_matrix(X, "X", dim=self.in_dim)), X)

    def score(self, X: ArrayLike, Y: ArrayLike) -> float:
        """Coefficient of determination R² of the prediction of ``Y`` from ``X`` (pooled over features)."""
        self._check_fitted()
        pred = self._transform_tensor(_as_matrix(X, "X", dim=self.in_dim).double())
        y = _as_matrix(Y, "Y", dim=self.out_dim).double()
        residual = float((y - pred).pow(2).sum())
        total = float((y - y.mean(0)).pow(2).sum())
        return 1.0 - residual / total if total > 0 else 0.0

    def config_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "normalize_inputs": self.normalize_inputs,
            "alpha": self.alpha,
            "num_fit_samples": self.num_fit_samples,
            "has_gap_vector": self.gap_vector is not None,
        }

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        self._check_fitted()
        state = {f"{prefix}weight": self.weight.contiguous(), f"{prefix}bias": self.bias.contiguous()}
        if self.gap_vector is not None:
            state[f"{prefix}gap_vector"] = self.gap_vector.contiguous()
        return state

    @classmethod
    def from_state(cls, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], prefix: str = "") -> "ImageSpaceProjector":
        projector = cls(normalize_inputs=bool(config.get("normalize_inputs", True)))
        projector.weight = state[f"{prefix}weight"].float()
        projector.bias = state[f"{prefix}bias"].float()
        projector.gap_vector = state.get(f"{prefix}gap_vector")
        projector.alpha = config.get("alpha")
        projector.num_fit_samples = config.get("num_fit_samples")
        return projector

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory``."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        config = {"model_type": "hf_clipneg_image_space_projector", **self.config_dict()}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_file(self.state_dict(), str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ImageSpaceProjector":
        """Load a projector written by :meth:`save_pretrained`."""
        config = _read_config(directory, "hf_clipneg_image_space_projector")
        return cls.from_state(config, load_file(str(Path(directory) / WEIGHTS_NAME)))


def _read_config(directory: str | os.PathLike, model_type: str) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: is this a directory written by save_pretrained?")
    config = json.loads(path.read_text())
    if config.get("model_type") != model_type:
        raise ValueError(f"{path} describes a {config.get('model_type')!r}, not a {model_type!r}.")
    return config


# ----------------------------------------------------------------------------------------------
# descriptions


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
    names = _check_class_names(class_names)
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


def _check_class_names(class_names: Sequence[str]) -> list[str]:
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
    names = _check_class_names(class_names) if class_names is not None else None
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
        names = _check_class_names(list(class_text_embeds))
        classes = _as_matrix(np.stack([np.asarray(class_text_embeds[n], dtype=np.float32).reshape(-1) for n in names]), "class_text_embeds")
    else:
        if class_names is None:
            raise ValueError("class_text_embeds is an array: pass class_names (one per row) as well.")
        names = _check_class_names(class_names)
        classes = _as_matrix(class_text_embeds, "class_text_embeds")
        if classes.shape[0] != len(names):
            raise ValueError(f"class_text_embeds has {classes.shape[0]} rows but there are {len(names)} class names.")
    texts = _as_matrix(text_embeds, "text_embeds", dim=classes.shape[1])
    if texts.shape[0] != len(descriptions):
        raise ValueError(f"text_embeds has {texts.shape[0]} rows but there are {len(descriptions)} descriptions.")
    index = {n: i for i, n in enumerate(names)}
    for row, description in enumerate(descriptions):
        if description.label not in index:
            raise ValueError(f"Description {row} ({description.text!r}) has label {description.label!r}, not one of {names}.")
    sims = l2_normalise(texts.double(), "text_embeds") @ l2_normalise(classes.double(), "class_text_embeds").T
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


# ----------------------------------------------------------------------------------------------
# classifier head


class Balance(str, Enum):
    """Sample weighting of the head's training loss."""

    NONE = "none"
    CLASS = "class"  # every class weighs the same in the loss
    GROUP = "group"  # every (class, group) cell weighs the same
    AUTO = "auto"  # GROUP when groups are given, else CLASS


def balanced_weights(labels: Sequence[int], groups: Sequence[Any] | None, balance: Balance | str) -> torch.Tensor:
    """Per-sample weights (mean 1) giving every class, or every (class, group) cell, equal weight.

    Example:
        >>> [round(w, 3) for w in balanced_weights([0, 0, 0, 1], None, "class").tolist()]
        [0.667, 0.667, 0.667, 2.0]
    """
    balance = Balance(balance)
    if balance is Balance.AUTO:
        balance = Balance.GROUP if groups is not None else Balance.CLASS
    n = len(labels)
    if balance is Balance.NONE:
        return torch.ones(n)
    if balance is Balance.GROUP:
        if groups is None:
            raise ValueError("balance='group' needs groups: pass groups=... or use balance='class'.")
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries but labels has {n}.")
        keys = list(zip(labels, groups))
    else:
        keys = list(labels)
    counts: dict[Any, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    weights = torch.tensor([1.0 / counts[key] for key in keys])
    return weights * (n / weights.sum())


class TextTrainedHead(torch.nn.Module):
    """Linear classifier trained on (projected) text embeddings, applied to image embeddings.

    Inputs in the *joint* space (the dual encoder's projected embeddings) are L2-normalised,
    then either mapped by ``projector`` into the target feature space, or, without a projector,
    stripped of their component along the modality-gap direction (when ``gap_vector`` is given),
    so texts and images share one representation. With a projector the head is also a drop-in
    last layer for the target feature space itself (``space="target"``).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(40, 8)); y = (x[:, 0] > 0).astype(int)
        >>> head = TextTrainedHead(["neg", "pos"], in_dim=8).fit(x, y)
        >>> bool((head.predict(x) == y).mean() > 0.9)
        True
    """

    def __init__(
        self,
        class_names: Sequence[str],
        in_dim: int,
        projector: ImageSpaceProjector | None = None,
        gap_vector: ArrayLike | None = None,
        normalize_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.class_names = _check_class_names(class_names)
        self.in_dim = int(in_dim)
        self.normalize_inputs = normalize_inputs
        if projector is not None:
            if projector.in_dim != self.in_dim:
                raise ValueError(f"The projector takes {projector.in_dim}-dim inputs, the head {self.in_dim}.")
            if gap_vector is None and projector.gap_vector is not None:
                gap_vector = projector.gap_vector
        self.projector = projector
        if gap_vector is not None:
            gap = _as_matrix(gap_vector, "gap_vector", dim=self.in_dim)[0].float()
            if float(gap.norm()) == 0:
                raise ValueError("gap_vector is all zeros.")
            self.register_buffer("gap_vector", gap.clone())
        else:
            self.gap_vector = None
        feature_dim = projector.out_dim if projector is not None else self.in_dim
        self.linear = torch.nn.Linear(feature_dim, len(self.class_names))
        self.training_summary: dict[str, Any] = {}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    def features(self, embeds: ArrayLike, space: str = "joint") -> torch.Tensor:
        """Map inputs to the representation the linear layer reads."""
        device = self.linear.weight.device
        if space == "target":
            if self.projector is None:
                raise ValueError("space='target' needs a head with a projector (the target space is the projector's output).")
            return _as_matrix(embeds, "embeds", dim=self.projector.out_dim).float().to(device)
        if space != "joint":
            raise ValueError(f"space must be 'joint' or 'target', got {space!r}.")
        x = _as_matrix(embeds, "embeds", dim=self.in_dim).float().to(device)
        if self.normalize_inputs:
            x = l2_normalise(x, "embeds")
        if self.projector is not None:
            return self.projector._transform_tensor(x)
        if self.gap_vector is not None:
            u = self.gap_vector / self.gap_vector.norm()
            x = x - (x @ u).unsqueeze(1) * u
        return x

    def forward(self, embeds: ArrayLike, space: str = "joint") -> torch.Tensor:
        """Logits (n, num_classes)."""
        return self.linear(self.features(embeds, space))

    @torch.no_grad()
    def predict_proba(self, embeds: ArrayLike, space: str = "joint") -> np.ndarray:
        return torch.softmax(self.forward(embeds, space), dim=1).cpu().numpy()

    @torch.no_grad()
    def predict(self, embeds: ArrayLike, space: str = "joint") -> np.ndarray:
        """Predicted class indices (use ``head.class_names[i]`` for names)."""
        return self.forward(embeds, space).argmax(dim=1).cpu().numpy()

    def _label_ids(self, labels: Sequence[int | str] | ArrayLike) -> torch.Tensor:
        ids = []
        for row, label in enumerate(np.asarray(labels).tolist()):
            if isinstance(label, str):
                if label not in self.label2id:
                    raise ValueError(f"Label {label!r} in row {row} is not one of the classes {self.class_names}.")
                ids.append(self.label2id[label])
            elif isinstance(label, int) and 0 <= label < len(self.class_names):
                ids.append(label)
            else:
                raise ValueError(f"Label {label!r} in row {row} is neither a class name nor an index below {len(self.class_names)}.")
        return torch.tensor(ids)

    def fit(
        self,
        embeds: ArrayLike,
        labels: Sequence[int | str] | ArrayLike,
        groups: Sequence[Any] | None = None,
        *,
        space: str = "joint",
        balance: Balance | str = Balance.AUTO,
        l2: float = 1e-4,
        max_iter: int = 500,
        seed: int = 0,
    ) -> "TextTrainedHead":
        """Train the linear layer (weighted multinomial logistic regression, full-batch L-BFGS).

        ``embeds`` are usually text embeddings in the joint space; image embeddings work the
        same way (which gives the image-trained baseline). ``l2`` penalises ``||W||²``.
        """
        features = self.features(embeds, space).detach()
        targets = self._label_ids(labels).to(features.device)
        if targets.shape[0] != features.shape[0]:
            raise ValueError(f"embeds has {features.shape[0]} rows but labels has {targets.shape[0]}.")
        missing = sorted(set(range(len(self.class_names))) - set(targets.tolist()))
        if missing:
            logger.warning("No training samples for class(es) %s: they will rarely be predicted.", [self.class_names[i] for i in missing])
        weights = balanced_weights(targets.tolist(), groups, balance).to(features.device)
        torch.manual_seed(seed)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        # Standardising the features makes one l2 setting work across spaces of different scales.
        mean, std = features.mean(0), features.std(0, unbiased=False).clamp_min(1e-6)
        z = (features - mean) / std
        weight = torch.zeros_like(self.linear.weight, requires_grad=True)
        bias = torch.zeros_like(self.linear.bias, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

        def objective() -> torch.Tensor:
            loss = (torch.nn.functional.cross_entropy(z @ weight.T + bias, targets, reduction="none") * weights).mean()
            return loss + l2 * weight.pow(2).sum()

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            loss = float(objective())  # LBFGS.step returns the loss before its first iteration
            self.linear.weight.copy_(weight / std)
            self.linear.bias.copy_(bias - (weight / std) @ mean)
            train_acc = float((self.linear(features).argmax(1) == targets).float().mean())
        self.training_summary.update(
            {"num_samples": int(features.shape[0]), "balance": Balance(balance).value, "l2": l2,
             "final_loss": float(loss), "train_accuracy": train_acc, "space": space}
        )
        logger.info("TextTrainedHead trained on %d samples: loss %.4f, train accuracy %.3f", features.shape[0], float(loss), train_acc)
        return self

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` (class names, id2label, projector config) and ``model.safetensors``."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "model_type": "hf_clipneg_text_head",
            "class_names": self.class_names,
            "id2label": {str(i): n for i, n in self.id2label.items()},
            "label2id": self.label2id,
            "num_labels": len(self.class_names),
            "in_dim": self.in_dim,
            "feature_dim": self.linear.in_features,
            "normalize_inputs": self.normalize_inputs,
            "has_gap_vector": self.gap_vector is not None,
            "projector": self.projector.config_dict() if self.projector is not None else None,
            "training_summary": self.training_summary,
        }
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        state = {"linear.weight": self.linear.weight.detach().cpu().contiguous(), "linear.bias": self.linear.bias.detach().cpu().contiguous()}
        if self.gap_vector is not None:
            state["gap_vector"] = self.gap_vector.detach().cpu().contiguous()
        if self.projector is not None:
            state.update(self.projector.state_dict(prefix="projector."))
        save_file(state, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "TextTrainedHead":
        """Load a head written by :meth:`save_pretrained`."""
        config = _read_config(directory, "hf_clipneg_text_head")
        state = load_file(str(Path(directory) / WEIGHTS_NAME))
        projector = ImageSpaceProjector.from_state(config["projector"], state, "projector.") if config.get("projector") else None
        head = cls(config["class_names"], config["in_dim"], projector=projector, gap_vector=state.get("gap_vector"),
                   normalize_inputs=config.get("normalize_inputs", True))
        head.linear.load_state_dict({"weight": state["linear.weight"], "bias": state["linear.bias"]})
        head.training_summary = dict(config.get("training_summary") or {})
        return head


# ----------------------------------------------------------------------------------------------
# zero-shot baseline and evaluation


def zero_shot_classify(image_embeds: ArrayLike, class_prompt_embeds: ArrayLike, return_scores: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Predict the class whose prompt embedding is most cosine-similar to each image.

    ``class_prompt_embeds`` is (C, p), or (C, k, p) for k prompts per class (their normalised
    mean is used, i.e. prompt ensembling).

    Example:
        >>> import numpy as np
        >>> zero_shot_classify(np.array([[0.9, 0.1], [0.2, 0.8]]), np.eye(2)).tolist()
        [0, 1]
    """
    prompts = class_prompt_embeds
    if isinstance(prompts, np.ndarray):
        prompts = torch.from_numpy(prompts)
    prompts = torch.as_tensor(prompts)
    if prompts.ndim == 3:
        prompts = torch.stack([l2_normalise(_as_matrix(p, f"class_prompt_embeds[{i}]"), "class_prompt_embeds").mean(0) for i, p in enumerate(prompts)])
    prompts = l2_normalise(_as_matrix(prompts, "class_prompt_embeds").double(), "class_prompt_embeds")
    images = l2_normalise(_as_matrix(image_embeds, "image_embeds", dim=prompts.shape[1]).double(), "image_embeds")
    scores = images @ prompts.T
    preds = scores.argmax(1).numpy()
    return (preds, scores.float().numpy()) if return_scores else preds


def group_accuracy(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """Average accuracy, and worst-group accuracy over the (label, group) cells present.

    Without ``groups`` the cells are the classes alone.

    Example:
        >>> group_accuracy([0, 1, 1, 1], [0, 1, 0, 1], ["a", "a", "b", "b"])["worst_group"]
        0.0
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"preds has shape {preds.shape} but labels {labels.shape}.")
    if len(labels) == 0:
        raise ValueError("No samples to evaluate.")
    groups_list = list(groups) if groups is not None else [None] * len(labels)
    if len(groups_list) != len(labels):
        raise ValueError(f"groups has {len(groups_list)} entries but labels {len(labels)}.")
    correct = preds == labels
    cells: dict[tuple[Any, Any], list[bool]] = {}
    for label, group, ok in zip(labels.tolist(), groups_list, correct.tolist()):
        cells.setdefault((label, group), []).append(ok)
    per_group = {f"{label}" + (f"/{group}" if group is not None else ""): float(np.mean(v)) for (label, group), v in cells.items()}
    return {"average": float(correct.mean()), "worst_group": min(per_group.values()), "per_group": per_group}


# ----------------------------------------------------------------------------------------------
# encoding with a VisionTextDualEncoderModel


def _model_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def encode_texts(model: Any, processor: Any, texts: Sequence[str], batch_size: int = 64,
                 device: str | torch.device | None = None, normalize: bool = True) -> torch.Tensor:
    """Joint-space text embeddings through `hf_clipneg.encoding.encode_texts` (pooled and cut as the model was
    trained), on the CPU. `device` is unused: the model's own device is used.

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> encode_texts(model, processor, ["a red shirt", "a blue shoe"]).shape
        torch.Size([2, 16])
    """
    from tqdm.auto import tqdm

    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Text {row} is empty or not a string ({text!r}); give every description some words.")
    from .encoding import encode_texts as encode_with_model

    batches = range(0, len(texts), batch_size)
    embeds = [
        encode_with_model(model, getattr(processor, "tokenizer", processor), list(texts[start:start + batch_size]), project=True,
                          normalize=normalize).cpu()
        for start in tqdm(batches, desc="Encoding texts", disable=len(texts) <= batch_size)
    ]
    return torch.cat(embeds)


@torch.no_grad()
def encode_images(model: Any, processor: Any, images: Sequence[Any], batch_size: int = 32,
                  device: str | torch.device | None = None, normalize: bool = True,
                  return_tower_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Joint-space image embeddings, optionally with the vision tower's own pooled features
    (the target space of an :class:`ImageSpaceProjector`). Images may be anything
    :func:`hf_clipneg.data.to_rgb` decodes.

    Example:
        >>> from PIL import Image
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> joint, tower = encode_images(model, processor, [Image.new("RGB", (32, 32))], return_tower_features=True)
        >>> tuple(joint.shape), tuple(tower.shape)
        ((1, 16), (1, 32))
    """
    from tqdm.auto import tqdm

    from .data import to_rgb

    device = _model_device(model, device)
    joint, tower = [], []
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(images), batch_size), desc="Encoding images", disable=len(images) <= batch_size):
        batch = [to_rgb(image, row=start + i) for i, image in enumerate(images[start:start + batch_size])]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        pooled = model.vision_model(pixel_values=pixel_values, return_dict=True).pooler_output
        tower.append(pooled.float().cpu())
        joint.append(model.visual_projection(pooled).float().cpu())
    model.train(was_training)
    embeds = torch.cat(joint)
    if normalize:
        embeds = torch.nn.functional.normalize(embeds, dim=1)
    return (embeds, torch.cat(tower)) if return_tower_features else embeds


def fit_text_head(
    model: Any,
    processor: Any,
    class_names: Sequence[str],
    descriptions: Sequence[Description] | None = None,
    projector: ImageSpaceProjector | None = None,
    gap_vector: ArrayLike | None = None,
    *,
    filter: bool = True,
    class_prompt: str = DEFAULT_CLASS_PROMPT,
    balance: Balance | str = Balance.AUTO,
    l2: float = 1e-4,
    max_iter: int = 500,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> TextTrainedHead:
    """Embed descriptions with a ``VisionTextDualEncoderModel``, filter them, train a head.

    ``descriptions`` default to :func:`build_descriptions` (class names only). Without a
    projector or a gap vector the modality gap is not handled (a warning says so). What was
    dropped is in ``head.training_summary["dropped"]``.

    Example:
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> model, processor = build_tiny_dual_encoder()
        >>> head = fit_text_head(model, processor, ["shirt", "shoe"], filter=False)
        >>> head.class_names
        ['shirt', 'shoe']
    """
    names = _check_class_names(class_names)
    descriptions = list(descriptions) if descriptions is not None else build_descriptions(names)
    if not descriptions:
        raise ValueError("No descriptions to train on.")
    if projector is None and gap_vector is None:
        logger.warning("fit_text_head without a projector or gap vector: the modality gap is not handled, "
                       "so a head trained on texts may transfer poorly to images.")
    text_embeds = encode_texts(model, processor, [d.text for d in descriptions], batch_size=batch_size, device=device)
    dropped: list[Description] = []
    if filter:
        prompts = [class_prompt.format(**{"class": n}) for n in names]
        class_embeds = encode_texts(model, processor, prompts, batch_size=batch_size, device=device)
        kept, dropped = filter_descriptions(descriptions, text_embeds, class_embeds, class_names=names)
        if not kept:
            raise ValueError("filter_descriptions dropped every description; check the class names or pass filter=False.")
        dropped_ids = {id(d) for d in dropped}
        keep_rows = [i for i, d in enumerate(descriptions) if id(d) not in dropped_ids]
        text_embeds, descriptions = text_embeds[keep_rows], [descriptions[i] for i in keep_rows]
    groups = [d.group for d in descriptions]
    has_groups = any(g is not None for g in groups)
    head = TextTrainedHead(names, text_embeds.shape[1], projector=projector, gap_vector=gap_vector)
    head.to(_model_device(model, device))
    head.fit(text_embeds, [d.label for d in descriptions], groups if has_groups else None,
             balance=balance, l2=l2, max_iter=max_iter)
    head.training_summary.update({"num_dropped": len(dropped), "dropped": [asdict(d) for d in dropped]})
    return head.cpu()


# ----------------------------------------------------------------------------------------------
# command line: hf-clipneg tldr


@dataclass
class TldrArguments:
    """Arguments of ``hf-clipneg tldr`` (train a text-only classifier head for a dual encoder)."""

    model_name_or_path: str = field(metadata={"help": "Directory of a VisionTextDualEncoderModel and its processor."})
    class_names: str = field(metadata={"help": "Comma-separated class names, or a file with one class name per line."})
    output_dir: str = field(metadata={"help": "Where the head (config.json + model.safetensors) is written."})
    attributes: str | None = field(default=None, metadata={
        "help": "Group attributes as 'name:value,value;name:value,...', e.g. \"gender:men's,women's\"."})
    templates: str | None = field(default=None, metadata={
        "help": "'|'-separated templates with {class}, {attr}, {<attribute>}, or a file with one per line."})
    per_class: int | None = field(default=None, metadata={"help": "Descriptions per class (multiple of the group count)."})
    descriptions_file: str | None = field(default=None, metadata={
        "help": "CSV (text,label[,group]) or TSV file of descriptions, used instead of templates."})
    class_prompt: str = field(default=DEFAULT_CLASS_PROMPT, metadata={"help": "Prompt for the class embeddings used in filtering."})
    filter_descriptions: bool = field(default=True, metadata={"help": "Drop descriptions closer to another class's prompt."})
    balance: Balance = field(default=Balance.AUTO, metadata={"help": "Loss weighting: none, class, group or auto."})
    paired_data: str | None = field(default=None, metadata={
        "help": "Image-text pairs (parquet/csv/json file or a save_to_disk directory) to measure the modality gap."})
    image_column: str = field(default="image", metadata={"help": "Image column of --paired_data."})
    text_column: str = field(default="caption", metadata={
        "help": "Caption column of --paired_data (the name every other hf-clipneg command uses).", "aliases": ["--caption_column"]})
    max_pairs: int = field(default=2000, metadata={"help": "At most this many pairs are encoded."})
    fit_projector: bool = field(default=False, metadata={
        "help": "Also fit an ImageSpaceProjector into the vision tower's pooled features (needs --paired_data)."})
    projector_alpha: float = field(default=1e-2, metadata={"help": "Ridge strength of the projector."})
    projector_path: str | None = field(default=None, metadata={"help": "A saved ImageSpaceProjector to use."})
    l2: float = field(default=1e-4, metadata={"help": "L2 penalty of the head."})
    max_iter: int = field(default=500, metadata={"help": "L-BFGS iterations."})
    batch_size: int = field(default=64, metadata={"help": "Encoding batch size."})
    seed: int = field(default=0, metadata={"help": "Random seed."})

    def __post_init__(self) -> None:
        self.balance = Balance(self.balance)
        if self.fit_projector and not self.paired_data:
            raise ValueError("--fit_projector needs --paired_data (images to fit it on).")
        if self.fit_projector and self.projector_path:
            raise ValueError("Give either --fit_projector or --projector_path, not both.")
        if self.max_pairs < 2:
            raise ValueError("--max_pairs must be at least 2.")


def _split_list(value: str, sep: str) -> list[str]:
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [part.strip() for part in value.split(sep) if part.strip()]


def parse_attributes(spec: str | None) -> dict[str, list[str]] | None:
    """Parse ``"gender:men,women;usage:casual,formal"``.

    Example:
        >>> parse_attributes("gender:men,women")
        {'gender': ['men', 'women']}
    """
    if not spec:
        return None
    attributes = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        name, sep, values = part.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"Attribute spec {part!r} must look like 'name:value,value'.")
        attributes[name.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return attributes


def _load_pairs(args: TldrArguments) -> Any:
    import datasets

    path = Path(args.paired_data)
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data[next(iter(data))]
    else:
        builder = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"--paired_data {path}: use a .parquet/.csv/.json(l) file or a save_to_disk directory.")
        data = datasets.load_dataset(builder, data_files=str(path), split="train")
    for column in (args.image_column, args.text_column):
        if column not in data.column_names:
            raise ValueError(f"--paired_data has no column {column!r}; columns are {data.column_names}.")
    if len(data) > args.max_pairs:
        data = data.shuffle(seed=args.seed).select(range(args.max_pairs))
    return data


def tldr_main(args: list[str] | None = None) -> int:
    """Entry point of ``hf-clipneg tldr``; returns the exit status.

    Example:
        >>> tldr_main(["--help"])  # doctest: +SKIP
    """
    from transformers import HfArgumentParser, VisionTextDualEncoderProcessor

    from .modeling import ClipNegDualEncoderModel

    parser = HfArgumentParser(TldrArguments)
    (cli,) = parser.parse_args_into_dataclasses(args=args)
    torch.manual_seed(cli.seed)
    class_names = _check_class_names(_split_list(cli.class_names, ","))
    model = ClipNegDualEncoderModel.from_pretrained(cli.model_name_or_path)
    processor = VisionTextDualEncoderProcessor.from_pretrained(cli.model_name_or_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()

    if cli.descriptions_file:
        descriptions = read_descriptions(cli.descriptions_file, class_names)
    else:
        templates = _split_list(cli.templates, "|") if cli.templates else None
        descriptions = build_descriptions(class_names, parse_attributes(cli.attributes), templates, cli.per_class, cli.seed)
    logger.info("%d descriptions for %d classes", len(descriptions), len(class_names))

    projector = ImageSpaceProjector.from_pretrained(cli.projector_path) if cli.projector_path else None
    gap_vector = None
    gap_report = None
    if cli.paired_data:
        pairs = _load_pairs(cli)
        images, tower = encode_images(model, processor, pairs[cli.image_column], batch_size=cli.batch_size, return_tower_features=True)
        texts = encode_texts(model, processor, pairs[cli.text_column], batch_size=cli.batch_size)
        gap = modality_gap(images, texts)
        gap_report = gap.to_dict()
        gap_vector = gap.vector
        logger.info("Modality gap on %d pairs: norm %.4f, explained variance %.3f", len(pairs), gap.norm, gap.explained_variance)
        if cli.fit_projector:
            projector = ImageSpaceProjector().fit(images, tower, gap.vector, alpha=cli.projector_alpha)

    head = fit_text_head(model, processor, class_names, descriptions, projector=projector, gap_vector=gap_vector,
                         filter=cli.filter_descriptions, class_prompt=cli.class_prompt, balance=cli.balance,
                         l2=cli.l2, max_iter=cli.max_iter, batch_size=cli.batch_size, device=device)
    output = Path(cli.output_dir)
    head.save_pretrained(output)
    dropped = {(d["text"], d["label"], d["group"]) for d in head.training_summary.get("dropped", [])}
    with (output / "descriptions.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "group", "kept"])
        for d in descriptions:
            writer.writerow([d.text, d.label, d.group or "", int((d.text, d.label, d.group) not in dropped)])
    if gap_report is not None:
        (output / "modality_gap.json").write_text(json.dumps(gap_report))
    logger.info("Wrote the head to %s (%d descriptions kept, %d dropped)", output,
                len(descriptions) - len(dropped), len(dropped))
    return 0
