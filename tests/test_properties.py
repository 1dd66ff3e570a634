"""Property-based tests (hypothesis): the loss and the mining rule hold for arbitrary inputs."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_clipneg.losses import weighted_contrastive_loss
from hf_clipneg.mining import MiningConfig, NegativeMiner, mine_negatives

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def logit_matrices(draw):
    """(B, B) float64 logits at CLIP's logit scales, including the largest (100). The loss's other properties
    (finite, symmetric, masked pairs get no gradient) are in test_losses.py."""
    size = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 14.3, 100.0]))
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(size, size, generator=generator, dtype=torch.float64)


@SETTINGS
@given(logit_matrices())
def test_all_ones_weights_equal_plain_clip(logits):
    plain = weighted_contrastive_loss(logits)
    ones = weighted_contrastive_loss(logits, negative_weights=torch.ones_like(logits))
    torch.testing.assert_close(plain, ones, rtol=1e-10, atol=1e-10)


@st.composite
def feature_sets(draw):
    n = draw(st.integers(4, 40))
    dim = draw(st.integers(2, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n_centres = draw(st.integers(1, 5))
    centres = rng.normal(size=(n_centres, dim))
    image = centres[rng.integers(0, n_centres, n)] + draw(st.sampled_from([0.05, 0.5, 2.0])) * rng.normal(size=(n, dim))
    n_nan = draw(st.integers(0, 2))
    image[rng.choice(n, size=min(n_nan, n - 2), replace=False)] = np.nan  # skipped rows
    text = rng.normal(size=(n, dim))
    text[~np.isfinite(image).all(1)] = np.nan
    k = draw(st.integers(2, max(2, n - n_nan - 1)))
    return image.astype(np.float32), text.astype(np.float32), k, seed


def _check_mining_rule(features, quantile, strategy, sampling, m):
    image, text, k, seed = features
    config = MiningConfig(evidence="image_cluster", strategy=strategy, n_image_clusters=k, n_text_clusters=1, negatives_per_row=m,
                          similar_cluster_quantile=quantile, sampling=sampling, seed=seed % 1000)
    data = Dataset.from_dict({"image_features": image, "text_features": text})
    mined, stats = mine_negatives(data, config)
    clusters = np.asarray(mined["image_cluster"])
    skipped = np.flatnonzero(~np.isfinite(image).all(1))
    assert stats.rows_skipped == skipped.size and (clusters[skipped] == -1).all()
    for row, (negatives, similar, weights) in enumerate(
        zip(mined["negative_indices"], mined["similar_image_clusters"], mined["negative_weights"])
    ):
        assert len(negatives) == m
        for j, w in zip(negatives, weights):
            if j < 0:
                assert w == 0  # padding carries no weight
                continue
            assert j != row and clusters[j] >= 0
            assert clusters[j] != clusters[row], (row, j)
            assert clusters[j] not in similar, (row, j, similar)
            assert w > 0


@SETTINGS
@given(feature_sets(), st.sampled_from([None, 1.0]), st.sampled_from(["cluster", "cluster_weighted"]),
       st.sampled_from(["random", "lowest"]), st.integers(0, 5))
def test_mined_negatives_never_come_from_the_same_image_cluster(features, quantile, strategy, sampling, m):
    _check_mining_rule(features, quantile, strategy, sampling, m)


@SETTINGS
@given(feature_sets(), st.one_of(st.sampled_from([0.3, 0.8]), st.floats(0.01, 0.99)),
       st.sampled_from(["cluster", "cluster_weighted"]), st.sampled_from(["random", "lowest"]), st.integers(0, 5))
def test_mined_negatives_never_come_from_a_similar_image_cluster(features, quantile, strategy, sampling, m):
    _check_mining_rule(features, quantile, strategy, sampling, m)


@SETTINGS
@given(st.integers(2, 30), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_in_batch_rule_masks_exactly_the_same_cluster_pairs(n, k, seed):
    """pair_weights (the loss side of the rule) on random cluster assignments: W[i, j] == 0 iff same cluster."""
    from hf_clipneg.mining import pair_weights

    rng = np.random.default_rng(seed)
    clusters = torch.from_numpy(rng.integers(0, k, n))
    weights, positives = pair_weights({"image_cluster": clusters}, MiningConfig(evidence="image_cluster", strategy="cluster"))
    same = clusters[:, None] == clusters[None, :]
    off = ~torch.eye(n, dtype=torch.bool)
    assert positives is None
    assert torch.all(weights[same & off] == 0) and torch.all(weights[~same] == 1) and torch.all(weights.diagonal() == 1)


@SETTINGS
@given(feature_sets(), st.integers(1, 4))
def test_miner_selection_is_independent_of_batch_composition(features, m):
    image, text, k, seed = features
    miner = NegativeMiner(MiningConfig(evidence="image_cluster", n_image_clusters=k, n_text_clusters=1, negatives_per_row=m, seed=seed % 97))
    miner.fit_arrays(image, text)
    rows = np.arange(image.shape[0])
    whole, _, _ = miner.select_negatives(rows)
    parts = np.concatenate([miner.select_negatives(rows[i : i + 3])[0] for i in range(0, rows.size, 3)])
    np.testing.assert_array_equal(whole, parts)
