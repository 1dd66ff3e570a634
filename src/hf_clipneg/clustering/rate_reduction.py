"""Rate-reduction clustering of frozen features (CPP: Chu et al., 2023, "Image Clustering via the
Principle of Rate Reduction in the Age of Pretrained Models").

Two small heads sit on the frozen (L2-normalised) input features ``x``:

* a feature head ``x -> Z`` (two-layer MLP, unit-norm output of size ``feature_dim``), and
* a cluster head ``x -> logits`` (cosine similarity to ``k`` learned directions, initialised from
  spherical k-means centroids).

A doubly-stochastic membership ``Pi`` is obtained from the logits by a few Sinkhorn iterations
(entropy-regularised optimal transport to uniform cluster sizes, which keeps clusters balanced and
avoids the collapse onto a few clusters), and both heads minimise the rate-reduction loss

    loss = -R(Z) + gamma * R_c(Z, Pi)
    R(Z)      = 1/2 logdet(I + d / (n eps^2) Z^T Z)
    R_c(Z,Pi) = sum_j tr(Pi_j) / (2n) logdet(I + d / (tr(Pi_j) eps^2) Z^T Pi_j Z)

i.e. the features of the whole batch should span a large volume while each cluster's features
should be compressible. Final assignments are the argmax of the learned membership logits over the
full data set (no Sinkhorn there, so clusters may end up of unequal size, as real classes are).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .kmeans import check_features, l2_normalize, spherical_kmeans

logger = logging.getLogger(__name__)


@dataclass
class CPPDetails:
    """What :func:`cpp_cluster` learned, returned with ``return_details=True``.

    Attributes:
        loss_history: mean training loss (``-R + gamma * R_c``) of each epoch, starting with the
            loss of the initialised heads before any update (entry 0).
        rate_history: mean ``R(Z)`` per epoch (same indexing).
        cluster_rate_history: mean ``R_c(Z, Pi)`` per epoch (same indexing).
        embeddings: the learned unit-norm features ``Z``, float32 ``(N, feature_dim)``.
        membership: soft membership (softmax of the logits at the Sinkhorn temperature), float32 ``(N, k)``.
        init_assignments: the k-means assignments the cluster head was initialised from.
        seconds: wall-clock time of the whole call.
        device: the torch device used.
    """

    loss_history: list[float] = field(default_factory=list)
    rate_history: list[float] = field(default_factory=list)
    cluster_rate_history: list[float] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    membership: np.ndarray | None = None
    init_assignments: np.ndarray | None = None
    seconds: float = 0.0
    device: str = "cpu"


def validate_features(features: Any, n_clusters: int | None = None, name: str = "features") -> np.ndarray:
    """Check a feature matrix (and a cluster count for it); return unit-norm C-contiguous float32 rows.

    Raises a ``ValueError``/``TypeError`` naming the offending rows (NaN/inf, all-zero), the wrong
    shape or dtype, or a cluster count that does not fit the number of rows.

    Example:
        >>> validate_features(np.ones((4, 3)), n_clusters=2).dtype
        dtype('float32')
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    array = check_features(features, name)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); nothing to cluster.")
    if n_clusters is not None:
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
            raise TypeError(f"n_clusters must be an int, got {type(n_clusters).__name__}.")
        if n_clusters < 2:
            raise ValueError(f"n_clusters must be at least 2, got {n_clusters}.")
        if n_clusters > array.shape[0]:
            raise ValueError(
                f"n_clusters={n_clusters} is larger than the number of rows ({array.shape[0]}); "
                "use fewer clusters or more data."
            )
    return l2_normalize(array, name)


def cluster_centroids(features: np.ndarray, assignments: np.ndarray, n_clusters: int,
                      fallback: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised mean of the (L2-normalised) input features of each cluster, float32 ``(k, d)``.

    An empty cluster takes its row of ``fallback`` (normalised) or, without one, a zero row.

    Example:
        >>> cluster_centroids(np.eye(2, dtype=np.float32), np.array([0, 1]), 2).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    unit = l2_normalize(np.asarray(features, dtype=np.float32))
    sums = np.zeros((n_clusters, unit.shape[1]), dtype=np.float64)
    np.add.at(sums, assignments, unit)
    counts = np.bincount(assignments, minlength=n_clusters)
    empty = counts == 0
    if empty.any() and fallback is not None:
        sums[empty] = fallback[empty]
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


@contextlib.contextmanager
def _serial_linalg(tensor: torch.Tensor) -> Iterator[None]:
    """Run batched small-matrix LAPACK calls on one CPU thread.

    torch parallelises batched Cholesky/inverse over the batch while LAPACK threads each matrix too;
    the nested pools oversubscribe the cores (measured on 2 cores: cholesky_inverse of 64 128x128
    matrices 13 ms on one thread, 1.7 s on two). GEMMs outside this context keep all threads.
    """
    if tensor.device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cholesky(matrices: torch.Tensor) -> torch.Tensor:
    with _serial_linalg(matrices):
        return torch.linalg.cholesky(matrices)


def _logdet_spd(matrices: torch.Tensor) -> torch.Tensor:
    # I + PSD is symmetric positive definite: Cholesky is exact here and its backward is several
    # times cheaper than slogdet's LU on CPU.
    factor = _cholesky(matrices)
    return 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def coding_rate(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``R(Z) = 1/2 logdet(I + d / (n eps^2) Z^T Z)`` for ``Z`` of shape ``(n, d)``."""
    n, d = z.shape
    gram = z.T @ z
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    return 0.5 * _logdet_spd(eye + (d / (n * eps**2)) * gram)


class _ClusterCodingRate(torch.autograd.Function):
    """``R_c`` with a hand-written backward.

    Autograd through the ``(k, n, d)`` weighted copies of ``Z`` keeps several such tensors alive and
    is memory-bound on CPU; the closed-form gradients below need one ``(n, k*d)`` GEMM:

        dR_c/dz_i  = d / (n eps^2) * sum_j p_ij S_j z_i                    (S_j = M_j^-1)
        dR_c/dp_ij = logdet(M_j) / 2n + d / (2n eps^2) * (z_i^T S_j z_i - tr(S_j G_j) / t_j)
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, membership: torch.Tensor, eps: float) -> torch.Tensor:
        n, d = z.shape
        traces = membership.sum(dim=0).clamp_min(1e-8)  # t_j
        grams = (membership.T.unsqueeze(-1) * z.unsqueeze(0)).transpose(1, 2) @ z  # G_j, (k, d, d)
        eye = torch.eye(d, dtype=z.dtype, device=z.device)
        factor = _cholesky(eye + (d / (traces * eps**2)).view(-1, 1, 1) * grams)
        logdets = 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        ctx.save_for_backward(z, membership, traces, grams, factor, logdets)
        ctx.eps = eps
        return (traces / (2 * n) * logdets).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        z, membership, traces, grams, factor, logdets = ctx.saved_tensors
        n, d = z.shape
        k = membership.shape[1]
        kappa = d / (n * ctx.eps**2)
        with _serial_linalg(factor):
            inverses = torch.cholesky_inverse(factor)  # S_j, (k, d, d)
        projected = (z @ inverses.transpose(0, 1).reshape(d, k * d)).view(n, k, d)  # S_j z_i
        grad_z = grad_z_membership = None
        if ctx.needs_input_grad[0]:
            grad_z = kappa * torch.bmm(membership.unsqueeze(1), projected).squeeze(1)
            grad_z = grad_z * grad_output
        if ctx.needs_input_grad[1]:
            quadratic = torch.bmm(projected, z.unsqueeze(-1)).squeeze(-1)  # z_i^T S_j z_i, (n, k)
            trace_terms = (inverses * grams).sum(dim=(1, 2)) / traces  # tr(S_j G_j) / t_j
            grad_z_membership = logdets / (2 * n) + 0.5 * kappa * (quadratic - trace_terms)
            grad_z_membership = grad_z_membership * grad_output
        return grad_z, grad_z_membership, None


def cluster_coding_rate(z: torch.Tensor, membership: torch.Tensor, eps: float) -> torch.Tensor:
    """``R_c(Z, Pi) = sum_j tr(Pi_j) / (2n) logdet(I + d / (tr(Pi_j) eps^2) Z^T Pi_j Z)``.

    ``membership`` is ``(n, k)`` with rows summing to one (``Pi_j = diag(membership[:, j])``).
    Differentiable in both arguments.

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
        >>> bool(cluster_coding_rate(z, torch.full((8, 2), 0.5), 0.5) <= coding_rate(z, 0.5) + 1e-5)
        True
    """
    return _ClusterCodingRate.apply(z, membership, eps)


def sinkhorn(logits: torch.Tensor, entropy: float, n_iters: int) -> torch.Tensor:
    """Balanced soft assignment: rows sum to one, columns to about ``n / k`` (log-domain Sinkhorn).

    Example:
        >>> p = sinkhorn(torch.zeros(6, 3), entropy=0.1, n_iters=3)
        >>> torch.allclose(p.sum(1), torch.ones(6)), torch.allclose(p.sum(0), torch.full((3,), 2.0))
        (True, True)
    """
    log_p = logits / entropy
    for _ in range(max(1, n_iters)):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p.exp()


class _CPPHeads(nn.Module):
    """Feature head (MLP -> unit sphere) and cosine cluster head over the frozen input features."""

    def __init__(self, d_in: int, feature_dim: int, hidden_dim: int, centroids: torch.Tensor):
        super().__init__()
        self.feature_head = nn.Sequential(
            nn.Linear(d_in, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, feature_dim)
        )
        self.cluster_directions = nn.Parameter(centroids.clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = nn.functional.normalize(self.feature_head(x), dim=1)
        logits = x @ nn.functional.normalize(self.cluster_directions, dim=1).T
        return z, logits


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpp_cluster(
    features: np.ndarray,
    n_clusters: int,
    seed: int = 0,
    device: str | torch.device | None = None,
    *,
    feature_dim: int = 128,
    hidden_dim: int = 512,
    epochs: int | None = None,
    batch_size: int = 1024,
    eps: float = 0.1,
    gamma: float = 1.0,
    sinkhorn_iters: int = 5,
    entropy: float = 0.05,
    lr: float = 1e-3,
    cluster_lr: float | None = None,
    show_progress: bool = False,
    return_details: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, CPPDetails]:
    """Cluster frozen features by maximising rate reduction (CPP).

    Args:
        features: ``(N, d_in)`` float features (image or text embeddings); they are L2-normalised here.
        n_clusters: number of clusters ``k`` (``2 <= k <= N``).
        seed: seeds k-means, the head initialisation and the batch order (deterministic on CPU).
        device: torch device; ``None`` picks CUDA when available, else CPU.
        feature_dim: size of the learned features ``Z``.
        hidden_dim: hidden width of the feature head.
        epochs: passes over the data; ``None`` gives at least 20 epochs and at least 100 steps
            (small data sets need many passes: one batch is one step).
        batch_size: rows per step (capped at ``N``); the rates are estimated per batch, so a batch
            should hold several rows per cluster.
        eps: coding precision of the rates.
        gamma: weight of the within-cluster rate ``R_c`` (1.0 is the plain ``-Delta R``).
        sinkhorn_iters: Sinkhorn iterations turning logits into a balanced membership.
        entropy: Sinkhorn temperature on the cosine logits (smaller = harder memberships).
        lr: Adam learning rate of the feature head.
        cluster_lr: Adam learning rate of the cluster head (default ``lr / 10``: the k-means
            initialisation is already good and should only be refined).
        show_progress: show a tqdm bar over epochs.
        return_details: also return a :class:`CPPDetails` (loss history, learned ``Z``, ...).

    Returns:
        ``(assignments, centroids)``: int64 ``(N,)`` cluster ids (argmax of the learned membership
        logits) and float32 ``(k, d_in)`` centroids, the L2-normalised mean of the normalised input
        features of each cluster (a cluster left empty keeps its learned direction). With
        ``return_details=True`` a third element, the :class:`CPPDetails`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> centres = rng.normal(size=(3, 16))
        >>> x = np.repeat(centres, 50, axis=0) + 0.1 * rng.normal(size=(150, 16))
        >>> labels, centroids = cpp_cluster(x, 3, epochs=3, batch_size=150)
        >>> labels.shape, centroids.shape, len(set(labels[:50])), len(set(labels))
        ((150,), (3, 16), 1, 3)
    """
    started = time.perf_counter()
    array = validate_features(features, n_clusters)
    for name, value in (("feature_dim", feature_dim), ("hidden_dim", hidden_dim), ("epochs", epochs or 1),
                        ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
    for name, value in (("eps", eps), ("entropy", entropy), ("lr", lr)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}.")
    n_rows, d_in = array.shape
    torch_device = _resolve_device(device)
    unit = array

    np.random.seed(seed)
    torch.manual_seed(seed)
    init_assignments, init_centroids = spherical_kmeans(
        unit, n_clusters, seed=seed, use_gpu=None if torch_device.type == "cuda" else False
    )

    x_all = torch.from_numpy(unit).to(torch_device)
    heads = _CPPHeads(d_in, feature_dim, hidden_dim, torch.from_numpy(np.asarray(init_centroids, np.float32)))
    heads.to(torch_device)
    optimizer = torch.optim.Adam(
        [
            {"params": heads.feature_head.parameters(), "lr": lr},
            {"params": [heads.cluster_directions], "lr": cluster_lr if cluster_lr is not None else lr / 10},
        ]
    )
    batch = min(batch_size, n_rows)
    if batch < 4 * n_clusters:
        logger.warning(
            "cpp_cluster: batch_size %d holds fewer than 4 rows per cluster (k=%d); the within-cluster "
            "rate is poorly estimated. Raise batch_size.", batch, n_clusters,
        )
    n_batches = max(1, n_rows // batch)  # drop the ragged tail each epoch: small batches bias the rates
    if epochs is None:
        epochs = max(20, math.ceil(100 / n_batches))
    generator = torch.Generator().manual_seed(seed)
    details = CPPDetails(device=str(torch_device), init_assignments=np.asarray(init_assignments, np.int64))

    def step_losses(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, logits = heads(xb)
        membership = sinkhorn(logits, entropy, sinkhorn_iters)
        rate = coding_rate(z, eps)
        cluster_rate = cluster_coding_rate(z, membership, eps)
        return -rate + gamma * cluster_rate, rate, cluster_rate

    def record(totals: np.ndarray) -> None:
        totals = totals / n_batches
        details.loss_history.append(float(totals[0]))
        details.rate_history.append(float(totals[1]))
        details.cluster_rate_history.append(float(totals[2]))

    with torch.no_grad():  # the objective of the initialised heads, for the history
        order = torch.randperm(n_rows, generator=generator).to(torch_device)
        totals = np.zeros(3)
        for b in range(n_batches):
            totals += [float(t) for t in step_losses(x_all[order[b * batch:(b + 1) * batch]])]
        record(totals)

    epoch_iter = range(epochs)
    if show_progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc="CPP clustering", unit="epoch")
    heads.train()
    for _ in epoch_iter:
        order = torch.randperm(n_rows, generator=generator).to(torch_device)
        totals = np.zeros(3)
        for b in range(n_batches):
            loss, rate, cluster_rate = step_losses(x_all[order[b * batch:(b + 1) * batch]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals += [loss.item(), rate.item(), cluster_rate.item()]
        record(totals)
        _check_finite(details.loss_history[-1], "cpp_cluster loss")
        if show_progress:
            epoch_iter.set_postfix(loss=f"{details.loss_history[-1]:.3f}")

    heads.eval()
    with torch.no_grad():
        z_parts, logit_parts = [], []
        for start in range(0, n_rows, 8192):
            z, logits = heads(x_all[start:start + 8192])
            z_parts.append(z.cpu())
            logit_parts.append(logits.cpu())
        z_all = torch.cat(z_parts).numpy()
        logits_all = torch.cat(logit_parts)
        directions = nn.functional.normalize(heads.cluster_directions.detach(), dim=1).cpu().numpy()
    assignments = logits_all.argmax(dim=1).numpy().astype(np.int64)
    counts = np.bincount(assignments, minlength=n_clusters)
    if (counts == 0).any():
        logger.info("cpp_cluster: %d of %d clusters ended empty.", int((counts == 0).sum()), n_clusters)
    centroids = cluster_centroids(unit, assignments, n_clusters, fallback=directions)
    details.seconds = time.perf_counter() - started
    logger.info(
        "cpp_cluster: %d rows, k=%d, %d epochs in %.1fs on %s; loss %.3f -> %.3f",
        n_rows, n_clusters, epochs, details.seconds, torch_device,
        details.loss_history[0], details.loss_history[-1],
    )
    if not return_details:
        return assignments, centroids
    details.embeddings = z_all.astype(np.float32)
    details.membership = torch.softmax(logits_all / entropy, dim=1).numpy().astype(np.float32)
    return assignments, centroids, details


def _check_finite(value: float, name: str) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"{name} became {value}; lower lr or raise eps.")
