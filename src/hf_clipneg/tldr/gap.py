"""The image-text modality gap of a dual encoder and the projector that steps over it.

A dual encoder puts images and texts in one embedding space, but the two modalities sit in two separate cones:
every image embedding is shifted by roughly the same *modality gap* vector from the text embedding of its
caption. :func:`modality_gap` measures it; :class:`ImageSpaceProjector` maps the joint space into a target
feature space (e.g. the vision tower's own pooled features) while ignoring the gap direction, so projected
texts land where images would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .._matrices import as_float_matrix
from .._normalize import l2_normalize
from ._hub import HubFolderMixin

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor


def _like_input(result: torch.Tensor, original: ArrayLike) -> ArrayLike:
    """`result` as a tensor for a tensor input, else as a numpy array (numpy in, numpy out)."""
    return result if isinstance(original, torch.Tensor) else result.detach().cpu().numpy()


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
    images = as_float_matrix(image_embeds, "image_embeds", allow_vector=True)
    texts = as_float_matrix(text_embeds, "text_embeds", dim=images.shape[1], allow_vector=True)
    images, texts = l2_normalize(images.double(), "image_embeds"), l2_normalize(texts.double(), "text_embeds")
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


class ImageSpaceProjector(HubFolderMixin, tags=["tldr", "modality-gap"]):
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

    ``save_pretrained(folder)``, ``from_pretrained(folder or Hub repo id)`` and ``push_to_hub(repo_id)`` come
    from huggingface_hub's `ModelHubMixin` (``config.json`` + ``model.safetensors``).
    """

    hub_model_type = "hf_clipneg_image_space_projector"

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
        x = as_float_matrix(X, "X", allow_vector=True).double()
        if self.normalize_inputs:
            x = l2_normalize(x, "X")
        y = as_float_matrix(Y, "Y", allow_vector=True).double()
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"X has {x.shape[0]} rows but Y has {y.shape[0]}: they must describe the same images.")
        n, p = x.shape
        basis = torch.eye(p, dtype=torch.float64)  # columns span the inputs the map may use
        if gap_vector is None:
            logger.warning("ImageSpaceProjector.fit without a gap vector: the modality gap is not removed.")
            self.gap_vector = None
        else:
            gap = as_float_matrix(gap_vector, "gap_vector", dim=p, allow_vector=True).double()[0]
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
            x = l2_normalize(x, "X")
        weight = self.weight.to(device=x.device, dtype=x.dtype)
        return x @ weight.T + self.bias.to(device=x.device, dtype=x.dtype)

    def transform(self, X: ArrayLike) -> ArrayLike:
        """Map joint-space embeddings (images or texts) into the target space; numpy in, numpy out."""
        self._check_fitted()
        return _like_input(self._transform_tensor(as_float_matrix(X, "X", dim=self.in_dim, allow_vector=True)), X)

    def score(self, X: ArrayLike, Y: ArrayLike) -> float:
        """Coefficient of determination R² of the prediction of ``Y`` from ``X`` (pooled over features)."""
        self._check_fitted()
        pred = self._transform_tensor(as_float_matrix(X, "X", dim=self.in_dim, allow_vector=True).double())
        y = as_float_matrix(Y, "Y", dim=self.out_dim, allow_vector=True).double()
        residual = float((y - pred).pow(2).sum())
        total = float((y - y.mean(0)).pow(2).sum())
        return 1.0 - residual / total if total > 0 else 0.0

    def config_dict(self) -> dict[str, Any]:
        """The JSON-able description written to ``config.json`` (dimensions, ridge strength, sample count)."""
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
        """``weight`` (out_dim, in_dim), ``bias`` (out_dim,) and, when fitted with one, ``gap_vector`` (in_dim,),
        float32, each name prefixed by `prefix`."""
        self._check_fitted()
        state = {f"{prefix}weight": self.weight.contiguous(), f"{prefix}bias": self.bias.contiguous()}
        if self.gap_vector is not None:
            state[f"{prefix}gap_vector"] = self.gap_vector.contiguous()
        return state

    @classmethod
    def from_state(cls, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], prefix: str = "") -> "ImageSpaceProjector":
        """The projector described by `config_dict()` and `state_dict(prefix)`."""
        projector = cls(normalize_inputs=bool(config.get("normalize_inputs", True)))
        projector.weight = state[f"{prefix}weight"].float()
        projector.bias = state[f"{prefix}bias"].float()
        projector.gap_vector = state.get(f"{prefix}gap_vector")
        projector.alpha = config.get("alpha")
        projector.num_fit_samples = config.get("num_fit_samples")
        return projector

    def _hub_config(self) -> dict[str, Any]:
        return self.config_dict()

    def _hub_state(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    @classmethod
    def _from_hub(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> "ImageSpaceProjector":
        return cls.from_state(config, state)
