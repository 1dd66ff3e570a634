"""Rate-reduction (CPP) clustering and the choice of k by minimum coding length."""

import numpy as np
import pytest
import torch

from hf_clipneg.clustering.choose_k import (
    choose_n_clusters,
    coding_length,
    default_candidates,
    resolve_n_clusters,
)
from hf_clipneg.clustering.rate_reduction import (
    cluster_coding_rate,
    coding_rate,
    cpp_cluster,
    sinkhorn,
)


def sphere_blobs(n_blobs=6, dim=32, n_rows=600, noise=0.3, seed=0):
    """Unit-norm Gaussian blobs around random unit centres; `noise` is the expected noise norm."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, n_blobs, n_rows)
    x = centres[truth] + noise * rng.normal(size=(n_rows, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def agreement(truth, predicted):
    """Share of rows whose cluster's majority class is their class (purity)."""
    total = 0
    for cluster in np.unique(predicted):
        total += np.bincount(truth[predicted == cluster]).max()
    return total / truth.size


CPP_FAST = dict(epochs=8, batch_size=300, feature_dim=32, hidden_dim=64)


def test_objective_decreases_and_blobs_recovered():
    x, truth = sphere_blobs(n_blobs=4, dim=16, n_rows=300, noise=0.5)
    labels, centroids, details = cpp_cluster(x, 4, seed=0, return_details=True, **CPP_FAST)
    losses = details.loss_history
    assert len(losses) == CPP_FAST["epochs"] + 1
    assert losses[-1] < losses[0] - 0.5
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= len(losses) // 2  # mostly monotone
    assert all(np.isfinite(losses))
    assert labels.dtype == np.int64 and labels.shape == (300,)
    assert agreement(truth, labels) > 0.95 and len(np.unique(labels)) == 4
    assert details.embeddings.shape == (300, 32)
    np.testing.assert_allclose(np.linalg.norm(details.embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(details.membership.sum(1), 1.0, atol=1e-5)


def test_centroids_are_normalised_input_means():
    x, _ = sphere_blobs(n_blobs=3, dim=8, n_rows=120)
    labels, centroids = cpp_cluster(x * 5.0, 3, seed=1, **CPP_FAST)  # scale must not matter
    assert centroids.shape == (3, 8) and centroids.dtype == np.float32
    for j in range(3):
        mean = x[labels == j].mean(axis=0)
        np.testing.assert_allclose(centroids[j], mean / np.linalg.norm(mean), atol=1e-5)


def test_deterministic_under_seed():
    x, _ = sphere_blobs(n_blobs=5, dim=16, n_rows=250, noise=0.8, seed=3)
    first = cpp_cluster(x, 5, seed=7, return_details=True, **CPP_FAST)
    second = cpp_cluster(x, 5, seed=7, return_details=True, **CPP_FAST)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2].loss_history == second[2].loss_history


def test_cluster_rate_gradient_matches_autograd_reference():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(12, 5, dtype=torch.double), dim=1).requires_grad_()
    membership = torch.softmax(torch.randn(12, 3, dtype=torch.double), dim=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: cluster_coding_rate(a, b, 0.5), (z, membership))
    # value: the textbook formula with explicit diagonal matrices
    eps, n, d = 0.5, 12, 5
    expected = 0.0
    for j in range(3):
        pi = torch.diag(membership[:, j])
        t = membership[:, j].sum()
        expected += t / (2 * n) * torch.logdet(torch.eye(d, dtype=torch.double) + d / (t * eps**2) * z.T @ pi @ z)
    assert torch.allclose(cluster_coding_rate(z, membership, eps), expected)
    # one cluster holding everything compresses nothing: R_c == R
    assert torch.allclose(cluster_coding_rate(z, torch.ones(12, 1, dtype=torch.double), eps), coding_rate(z, eps))


def test_sinkhorn_is_balanced():
    logits = torch.randn(40, 4)
    logits[:, 0] += 3  # everyone prefers cluster 0; Sinkhorn must still spread the mass
    p = sinkhorn(logits, entropy=0.5, n_iters=20)
    torch.testing.assert_close(p.sum(1), torch.ones(40))
    torch.testing.assert_close(p.sum(0), torch.full((4,), 10.0), atol=0.1, rtol=0)


@pytest.mark.parametrize(
    "features, k, error, match",
    [
        (np.ones((5, 3)), 6, ValueError, "larger than the number of rows"),
        (np.ones((5, 3)), 1, ValueError, "at least 2"),
        (np.ones(5), 2, ValueError, "2-D"),
        (np.array([["a", "b"], ["c", "d"]]), 2, TypeError, "numeric"),
        (np.ones((5, 3)), 2.5, TypeError, "int"),
    ],
)
def test_bad_input(features, k, error, match):
    with pytest.raises(error, match=match):
        cpp_cluster(features, k)


def test_nan_rows_are_named():
    x = np.ones((6, 3), dtype=np.float32)
    x[2, 0] = np.nan
    x[4, 1] = np.inf
    with pytest.raises(ValueError, match=r"2, 4|\[2, 4\]"):
        cpp_cluster(x, 2)


def test_coding_length_prefers_true_partition():
    x, truth = sphere_blobs(n_blobs=4, dim=16, n_rows=200)
    shuffled = np.random.default_rng(0).permutation(truth)
    assert coding_length(x, truth) < coding_length(x, shuffled)


def test_auto_recovers_blob_count():
    x, _ = sphere_blobs(n_blobs=6, dim=32, n_rows=600, noise=0.3)
    assert 6 in default_candidates(600)
    assert resolve_n_clusters("auto", x, backend="kmeans", seed=0) == 6
    best, lengths = choose_n_clusters(x, [3, 4, 6, 9, 12], backend="kmeans")
    assert best == 6 and set(lengths) == {3, 4, 6, 9, 12}
    assert lengths[6] < lengths[4] and lengths[6] < lengths[9]


def test_choose_k_with_cpp_backend():
    x, _ = sphere_blobs(n_blobs=4, dim=16, n_rows=300, noise=0.3, seed=1)
    best, lengths = choose_n_clusters(x, [2, 4, 8], backend="cpp", backend_kwargs=CPP_FAST)
    assert best == 4 and set(lengths) == {2, 4, 8}


def test_resolve_n_clusters_values():
    x = np.random.default_rng(0).normal(size=(50, 4))
    assert resolve_n_clusters(7, x) == 7
    assert resolve_n_clusters("12", x) == 12
    with pytest.raises(ValueError, match="outside"):
        resolve_n_clusters(51, x)
    with pytest.raises(ValueError, match="auto"):
        resolve_n_clusters("many", x)
    with pytest.raises(ValueError, match="outside"):
        choose_n_clusters(x, [1, 3])
    with pytest.raises(ValueError, match="backend"):
        choose_n_clusters(x, [3], backend="dbscan")
