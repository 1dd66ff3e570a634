"""Mining: clustering, the in-batch rule (pair_weights), explicit negatives, statistics, bad input."""

import dataclasses

import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk

from hf_clipneg.clustering import cluster_features, default_n_clusters, spherical_kmeans
from hf_clipneg.mining import (
    DuplicateAction,
    DuplicateEvidence,
    MiningConfig,
    NegativeMiner,
    NegativeStrategy,
    mine_negatives,
    pair_weights,
    random_pair_flags,
)

N_BLOBS, PER_BLOB, DIM = 6, 20, 16


def blob_features(seed=0, n_blobs=N_BLOBS, per_blob=PER_BLOB, dim=DIM, spread=0.05):
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:n_blobs]  # orthogonal: clearly separated
    labels = np.repeat(np.arange(n_blobs), per_blob)
    x = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    return x.astype(np.float32), labels


def blob_dataset(seed=0, captions=None, **kwargs):
    x, labels = blob_features(seed, **kwargs)
    t = np.roll(x, 1, axis=1)
    if captions is None:
        captions = [f"item {i}" for i in range(len(x))]
    return Dataset.from_dict(
        {"image_features": x, "text_features": t, "caption": captions, "blob": labels.tolist()}
    ), labels


def mine(ds, **config):
    config.setdefault("strategy", "cluster_weighted")
    config.setdefault("evidence", "image_cluster")
    config.setdefault("n_image_clusters", N_BLOBS)
    config.setdefault("n_text_clusters", N_BLOBS)
    return mine_negatives(ds, MiningConfig(**config))


# ---------------------------------------------------------------- clustering


def test_spherical_kmeans_recovers_blobs_and_is_reproducible():
    x, blobs = blob_features()
    labels, centroids = spherical_kmeans(x, N_BLOBS, seed=0)
    assert labels.dtype == np.int64 and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    for blob in range(N_BLOBS):  # every blob is one cluster
        assert len(set(labels[blobs == blob])) == 1
    again, _ = spherical_kmeans(x, N_BLOBS, seed=0)
    np.testing.assert_array_equal(labels, again)
    converted, _ = spherical_kmeans(x.astype(np.float64), N_BLOBS, seed=0)
    np.testing.assert_array_equal(labels, converted)


def test_spherical_kmeans_bad_input():
    x, _ = blob_features()
    with pytest.raises(ValueError, match=r"Cannot make 500 clusters from 120 rows.*fewer clusters"):
        spherical_kmeans(x, 500)
    with pytest.raises(ValueError, match="n_clusters must be an integer >= 1"):
        spherical_kmeans(x, 0)
    bad = x.copy()
    bad[[7, 42], 3] = np.nan
    with pytest.raises(ValueError, match=r"first rows: \[7, 42\]"):
        spherical_kmeans(bad, 3)
    bad[7, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        spherical_kmeans(bad, 3)
    with pytest.raises(TypeError, match="numeric"):
        spherical_kmeans(np.array([["a", "b"], ["c", "d"]]), 1)
    with pytest.raises(ValueError, match="Unknown clustering backend"):
        cluster_features(x, 2, backend="nope")


def test_default_n_clusters_scales_with_rows():
    assert default_n_clusters(2) == 2
    assert default_n_clusters(7600) == 131
    assert default_n_clusters(10**6) == 1500
    assert default_n_clusters(10**9) == 4096
    assert default_n_clusters(1) == 1


# ---------------------------------------------------------------- config


def test_config_coerces_validates_and_round_trips():
    config = MiningConfig(strategy="cluster", evidence="pair_cosine", duplicate_action="positive", sampling="lowest")
    assert config.evidence is DuplicateEvidence.PAIR_COSINE and config.duplicate_action is DuplicateAction.POSITIVE
    assert MiningConfig.from_dict(config.to_dict()) == config
    assert MiningConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match=r"strategy must be one of \['vanilla'"):
        MiningConfig(evidence="image_cluster", strategy="magic")
    with pytest.raises(ValueError, match="similar_cluster_quantile"):
        MiningConfig(evidence="image_cluster", similar_cluster_quantile=1.5)
    with pytest.raises(ValueError, match="group_column"):
        MiningConfig(evidence="group")
    with pytest.raises(ValueError, match="store_features=False"):
        MiningConfig(store_features=False)
    with pytest.raises(ValueError, match="store_features=False"):
        MiningConfig(strategy="cluster_weighted", evidence="image_cluster", store_features=False)


def test_config_parses_with_hf_argument_parser():
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(MiningConfig).parse_args_into_dataclasses(
        ["--strategy", "random", "--similar_cluster_quantile", "0.9", "--negatives_per_row", "2"]
    )
    assert config.strategy is NegativeStrategy.RANDOM
    assert config.similar_cluster_quantile == 0.9 and config.negatives_per_row == 2


# ---------------------------------------------------------------- pair_weights semantics


def _batch(size=6):
    rng = np.random.default_rng(0)
    feats = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(size, 4)), dtype=torch.float32), dim=-1)
    return {
        "row_id": torch.arange(size) * 7,
        "image_cluster": torch.tensor([0, 0, 1, 1, 2, 2])[:size],
        "text_cluster": torch.tensor([0, 1, 1, 1, 2, 3])[:size],
        "similar_image_clusters": torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0], [2, -1], [2, -1]])[:size],
        "image_features": feats,
        "text_features": feats.flip(0),
        "group": torch.tensor([5, 5, -1, -1, 9, 3])[:size],
    }


def test_pair_weights_vanilla_is_all_ones():
    weights, positives = pair_weights(_batch(), MiningConfig(evidence="image_cluster", strategy="vanilla"))
    assert torch.equal(weights, torch.ones(6, 6)) and positives is None


def test_pair_weights_cluster_masks_same_cluster_only():
    weights, positives = pair_weights(_batch(), MiningConfig(evidence="image_cluster", strategy="cluster"))
    cluster = _batch()["image_cluster"]
    same = cluster[:, None] == cluster[None, :]
    eye = torch.eye(6, dtype=torch.bool)
    assert (weights[same & ~eye] == 0).all() and (weights[~same] == 1).all() and (weights[eye] == 1).all()
    assert positives is None


def test_pair_weights_similar_clusters_and_both_modalities():
    batch = _batch()
    similar = pair_weights(batch, MiningConfig(evidence="image_cluster", strategy="cluster", similar_cluster_quantile=0.9))[0]
    assert similar[0, 2] == 0 and similar[0, 3] == 0 and similar[0, 4] == 1  # clusters 0 and 1 are "similar"
    both = pair_weights(batch, MiningConfig(strategy="cluster", evidence="image_and_text_cluster"))[0]
    # rows 2, 3: same image cluster (1) and same text cluster (1) -> masked; rows 0, 1: text clusters differ.
    assert both[2, 3] == 0 and both[3, 2] == 0 and both[0, 1] == 1 and both[4, 5] == 1


def test_pair_weights_actions_group_and_pair_cosine():
    batch = _batch()
    down = pair_weights(batch, MiningConfig(evidence="image_cluster", strategy="cluster", duplicate_action="downweight", downweight_factor=0.25))[0]
    assert down[0, 1] == 0.25 and down[0, 2] == 1
    weights, positives = pair_weights(batch, MiningConfig(evidence="image_cluster", strategy="cluster", duplicate_action="positive", extra_positive_weight=0.5))
    assert weights[0, 1] == 0 and positives[0, 1] == 0.5 and positives[0, 0] == 1 and positives[0, 2] == 0
    group = pair_weights(batch, MiningConfig(strategy="cluster", evidence="group", group_column="g"))[0]
    assert group[0, 1] == 0 and group[2, 3] == 1  # -1 means "no group", never a match
    cos = batch["image_features"] @ batch["image_features"].T
    threshold = 0.2  # no pair sits near it
    pairwise = pair_weights(batch, MiningConfig(strategy="cluster", evidence="pair_cosine", image_cosine_threshold=threshold))[0]
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.equal(pairwise[off] == 0, cos[off] > threshold)


def test_pair_weights_weighted_grows_with_distance_and_has_row_mean_one():
    batch = _batch()
    batch["image_cluster"] = torch.arange(6)  # nothing masked
    weights = pair_weights(batch, MiningConfig(evidence="image_cluster", strategy="cluster_weighted", weight_power=1.0))[0]
    cos = batch["image_features"] @ batch["image_features"].T
    off = ~torch.eye(6, dtype=torch.bool)
    for i in range(6):
        order = torch.argsort(cos[i][off[i]])  # increasing similarity
        assert (torch.diff(weights[i][off[i]][order]) <= 1e-6).all()  # weights fall as similarity rises
    torch.testing.assert_close(weights.masked_fill(~off, 0).sum(1) / 5, torch.ones(6))
    flat = pair_weights(batch, MiningConfig(evidence="image_cluster", strategy="cluster_weighted", weight_power=0.0))[0]
    assert torch.equal(flat, torch.ones(6, 6))
    strong = pair_weights(batch, MiningConfig(evidence="image_cluster", strategy="cluster_weighted", weight_power=3.0, max_weight=2.0))[0]
    assert strong.max() <= 2.0 and (strong[off].std() > weights[off].std())


def test_random_pair_flags_are_deterministic_symmetric_and_hit_the_fraction():
    ids = torch.arange(1000, 1400)
    flags = random_pair_flags(ids, 0.2, seed=3)
    assert torch.equal(flags, random_pair_flags(ids, 0.2, seed=3))
    assert torch.equal(flags, flags.T) and not flags.diagonal().any()
    assert abs(flags.float().sum().item() / (400 * 399) - 0.2) < 0.01
    assert not torch.equal(flags, random_pair_flags(ids, 0.2, seed=4))
    assert not torch.equal(flags, random_pair_flags(ids, 0.2, seed=3, step=1))
    # A pair's fate does not depend on the other rows of the batch (any process derives the same mask).
    sub = random_pair_flags(ids[[5, 17, 300]], 0.2, seed=3)
    assert sub[0, 1] == flags[5, 17] and sub[1, 2] == flags[17, 300]
    weights = pair_weights({"row_id": ids}, MiningConfig(evidence="image_cluster", strategy="random", random_drop_fraction=0.2, seed=3))[0]
    assert torch.equal(weights == 0, flags)


def test_pair_weights_missing_column_is_named():
    with pytest.raises(KeyError, match="similar_image_clusters.*mine_negatives"):
        pair_weights({"image_cluster": torch.tensor([0, 1])}, MiningConfig(evidence="image_cluster", strategy="cluster", similar_cluster_quantile=0.5))
    with pytest.raises(KeyError, match="image_features"):
        pair_weights({"image_cluster": torch.tensor([0, 1])}, MiningConfig(evidence="image_cluster", strategy="cluster_weighted"))
    with pytest.raises(ValueError, match="random_drop_fraction"):
        pair_weights({"row_id": torch.tensor([0, 1])}, MiningConfig(evidence="image_cluster", strategy="random"))


# ---------------------------------------------------------------- the mining step


def test_mined_negatives_never_share_or_neighbour_an_image_cluster():
    ds, blobs = blob_dataset()
    mined, stats = mine(ds, negatives_per_row=5, similar_cluster_quantile=0.6)
    cluster = np.array(mined["image_cluster"])
    assert len(set(zip(blobs, cluster))) == N_BLOBS  # clusters = blobs
    negatives = np.array(mined["negative_indices"])
    assert negatives.shape == (len(ds), 5) and (negatives >= 0).all()
    for row, similar in enumerate(mined["similar_image_clusters"]):
        assert cluster[row] in similar
        assert not np.isin(cluster[negatives[row]], similar).any()
    assert stats.rows_with_fewer_negatives == 0
    assert mined.features["image_cluster"].dtype == "int32" and mined.features["row_id"].dtype == "int64"
    assert mined["row_id"] == list(range(len(ds)))


def test_mined_weights_fall_as_image_similarity_rises():
    ds, _ = blob_dataset(spread=0.4)
    mined, _ = mine(ds, negatives_per_row=20, weight_power=2.0)
    config = MiningConfig.from_dataset(mined)
    x = np.array(mined["image_features"])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for row in range(0, len(ds), 13):
        idx = np.array(mined[row]["negative_indices"])
        w = np.array(mined[row]["negative_weights"])
        cos = x[idx] @ x[row]
        order = np.argsort(cos)
        assert (np.diff(w[order]) <= 1e-5).all()
        np.testing.assert_allclose(w, np.minimum(((1 - cos) / config.image_distance_mean) ** 2, 10.0), rtol=1e-4)


def test_mining_is_deterministic_per_seed():
    ds, _ = blob_dataset()
    first, _ = mine(ds, seed=1)
    second, _ = mine(ds, seed=1)
    other, _ = mine(ds, seed=2)
    assert first["negative_indices"] == second["negative_indices"]
    assert first["negative_weights"] == second["negative_weights"]
    assert first["negative_indices"] != other["negative_indices"]


def test_miner_map_is_independent_of_batch_size():
    ds, _ = blob_dataset()
    miner = NegativeMiner(MiningConfig(evidence="image_cluster", n_image_clusters=N_BLOBS, negatives_per_row=3)).fit(ds)
    small = ds.map(miner, batched=True, batch_size=7, with_indices=True)
    large = ds.map(miner, batched=True, batch_size=1000, with_indices=True)
    assert small["negative_indices"] == large["negative_indices"]


def test_lowest_sampling_picks_the_least_similar_clusters():
    ds, _ = blob_dataset(n_blobs=8, per_blob=40, spread=0.3)
    mined, _ = mine(ds, n_image_clusters=8, negatives_per_row=4, sampling="lowest")
    miner = NegativeMiner(MiningConfig.from_dataset(mined))
    miner.fit(ds)
    similarity = miner._image_similarity
    for row in range(0, len(ds), 37):
        c = mined[row]["image_cluster"]
        picked = {mined[j]["image_cluster"] for j in mined[row]["negative_indices"]}
        ranks = np.argsort(np.argsort(similarity[c]))
        # The pool holds at least max(8 m, 64) = 64 rows: the 2 least similar clusters of 40 rows.
        assert picked and all(ranks[p] < 2 for p in picked)


def test_round_trip_through_disk_keeps_columns_and_config(tmp_path):
    ds, _ = blob_dataset()
    mined, _ = mine(ds, strategy="random")
    config = MiningConfig.from_dataset(mined)
    assert config.n_image_clusters == N_BLOBS and config.random_drop_fraction is not None
    mined.save_to_disk(str(tmp_path / "mined"))
    loaded = load_from_disk(str(tmp_path / "mined"))
    assert loaded.column_names == mined.column_names
    for column in ("negative_indices", "negative_weights", "similar_image_clusters", "image_cluster"):
        assert loaded[column] == mined[column]
    assert MiningConfig.from_dataset(loaded) == config
    with pytest.raises(ValueError, match="run `mine_negatives`"):
        MiningConfig.from_dataset(ds)


def test_mining_map_is_cached_for_datasets_on_disk(tmp_path):
    ds, _ = blob_dataset()
    ds.save_to_disk(str(tmp_path / "raw"))
    on_disk = load_from_disk(str(tmp_path / "raw"))
    first, _ = mine(on_disk)
    second, _ = mine(on_disk)
    assert first.cache_files and first.cache_files == second.cache_files
    third, _ = mine(on_disk, seed=5)
    assert third.cache_files != first.cache_files


def test_random_strategy_drops_the_cluster_rule_fraction():
    ds, _ = blob_dataset()
    mined, stats = mine(ds, strategy="random", stats_batch_size=60)
    config = MiningConfig.from_dataset(mined)
    # Same-cluster pairs among 6 equal blobs: about (20 - 1) / (120 - 1) of the pairs.
    assert config.random_drop_fraction == pytest.approx(19 / 119, abs=0.03)
    assert stats.strategy_masked_fraction == config.random_drop_fraction
    # Random negatives ignore clusters: some fall in the row's own cluster.
    negatives = np.array(mined["negative_indices"])
    cluster = np.array(mined["image_cluster"])
    assert (cluster[negatives] == cluster[:, None]).any()


def test_statistics_report_duplicates_precision_and_recall():
    x, blobs = blob_features()
    captions = [f"blob {b} item {i % 10}" for i, b in enumerate(blobs)]  # duplicates only inside a blob
    ds = Dataset.from_dict({"image_features": x, "text_features": x, "caption": captions, "blob": blobs.tolist()})
    _, stats = mine_negatives(ds, MiningConfig(evidence="image_cluster", n_image_clusters=N_BLOBS, group_column="blob", stats_batch_size=60))
    assert stats.caption_duplicate_pair_rate > 0 and stats.caption_duplicates_per_batch > 0
    assert stats.evidence_recall == 1.0  # every duplicate sits in one cluster
    assert 0 < stats.evidence_precision < 1  # masked pairs are mostly different captions
    assert stats.group_pair_rate == pytest.approx(19 / 119, abs=0.03)
    assert "per batch of 60" in stats.hint
    markdown = stats.to_markdown()
    assert "| evidence recall | 1 |" in markdown and stats.to_dict()["n_rows"] == len(ds)


def test_group_evidence_excludes_same_group_negatives():
    ds, blobs = blob_dataset()
    groups = [f"product-{b}" for b in blobs]
    ds = ds.add_column("product", groups)
    mined, _ = mine(ds, evidence="group", group_column="product", negatives_per_row=6)
    group = np.array(mined["group"])
    negatives = np.array(mined["negative_indices"])
    assert (group[negatives] != group[:, None]).all()
    assert len(set(group.tolist())) == N_BLOBS


def test_pair_cosine_evidence_resolves_thresholds_from_quantile():
    ds, _ = blob_dataset()
    mined, stats = mine(ds, evidence="pair_cosine", pair_quantile=0.9, negatives_per_row=4)
    config = MiningConfig.from_dataset(mined)
    assert config.image_cosine_threshold is not None and config.text_cosine_threshold is not None
    assert 0.0 < stats.evidence_flagged_fraction < 0.3
    x = np.array(mined["image_features"])
    t = np.array(mined["text_features"])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    negatives = np.array(mined["negative_indices"])
    for row in range(len(ds)):
        image_cos = x[negatives[row]] @ x[row]
        text_cos = t[negatives[row]] @ t[row]
        assert not ((image_cos > config.image_cosine_threshold) & (text_cos > config.text_cosine_threshold)).any()


def test_clusters_are_computed_only_when_the_rule_or_an_option_asks_for_them():
    assert not MiningConfig().needs_image_clusters() and not MiningConfig().clusters_texts()
    for strategy in NegativeStrategy:  # no strategy reads clusters by itself: the evidence does
        assert not MiningConfig(strategy=strategy, evidence="pair_cosine").needs_image_clusters()
    assert not MiningConfig(evidence="group", group_column="g").needs_image_clusters()
    for asks in (dict(evidence="image_cluster"), dict(evidence="image_and_text_cluster"), dict(sampling="lowest"),
                 dict(cluster_images=True), dict(n_image_clusters=3)):
        assert MiningConfig(**asks).needs_image_clusters(), asks
    assert MiningConfig(evidence="image_and_text_cluster", cluster_text=False).clusters_texts()
    assert MiningConfig(n_text_clusters=3).clusters_texts() and not MiningConfig(cluster_images=True, cluster_text=False).clusters_texts()


def test_default_rule_skips_kmeans_and_writes_one_placeholder_cluster(monkeypatch, caplog):
    x, _ = blob_features()
    x[[3, 77]] = np.nan  # skipped rows keep -1
    ds = Dataset.from_dict({"image_features": x, "text_features": x, "caption": [f"c{i % 30}" for i in range(len(x))]})

    def no_kmeans(*args, **kwargs):
        raise AssertionError("k-means ran although the rule reads no clusters")

    monkeypatch.setattr("hf_clipneg.mining.clusters.cluster_features", no_kmeans)
    with caplog.at_level("INFO", logger="hf_clipneg.mining.miner"):
        mined, stats = mine_negatives(ds, MiningConfig(negatives_per_row=3))
    assert "Skipping the image k-means: evidence=pair_cosine" in caplog.text
    clusters = np.array(mined["image_cluster"])
    assert (clusters[[3, 77]] == -1).all() and (np.delete(clusters, [3, 77]) == 0).all()
    assert mined["similar_image_clusters"][0] == [0] and mined["similar_image_clusters"][3] == []
    assert "text_cluster" not in mined.column_names and "similar_text_clusters" not in mined.column_names
    assert stats.n_image_clusters == 0 and stats.n_text_clusters is None and stats.evidence_flagged_fraction >= 0
    assert MiningConfig.from_dataset(mined).n_image_clusters is None
    negatives = np.array(mined["negative_indices"])
    assert (negatives[0] >= 0).all() and not np.isin(negatives, [3, 77]).any()

    monkeypatch.undo()
    clustered, stats = mine_negatives(ds, MiningConfig(negatives_per_row=3, cluster_images=True))
    assert stats.n_image_clusters == default_n_clusters(118) and stats.n_text_clusters == default_n_clusters(118)
    assert len(set(clustered["image_cluster"]) - {-1}) > 1 and "text_cluster" in clustered.column_names


def test_training_with_a_cluster_sampler_asks_mining_for_image_clusters():
    from types import SimpleNamespace

    from hf_clipneg.pipeline import _with_sampler_clusters

    crowded = SimpleNamespace(train_sampler="crowded", sampler_group_column="image_cluster")
    assert _with_sampler_clusters(MiningConfig(), crowded).cluster_images
    assert not _with_sampler_clusters(MiningConfig(), SimpleNamespace(train_sampler="random")).cluster_images
    own_column = SimpleNamespace(train_sampler="cluster_spread", sampler_group_column="product_id")
    assert not _with_sampler_clusters(MiningConfig(), own_column).cluster_images


def test_every_public_name_of_the_mining_package_resolves():
    import hf_clipneg.mining as mining

    assert {"MiningConfig", "NegativeMiner", "MiningStats", "mine_negatives", "pair_weights", "group_codes"} <= set(mining.__all__)
    for name in mining.__all__:
        assert getattr(mining, name) is not None, name


def test_mining_and_retrieval_metrics_agree_on_what_the_same_caption_is():
    from hf_clipneg.metrics import groups_from_captions
    from hf_clipneg.mining.arrays import caption_codes

    captions = ["A red  circle", "a red circle\n", "STRASSE", "straße", "a blue square", " a Blue Square"]
    assert caption_codes(captions, len(captions)).tolist() == groups_from_captions(captions).tolist() == [0, 0, 1, 1, 2, 2]


# ---------------------------------------------------------------- bad input and edge cases


def test_too_few_rows_and_too_many_clusters():
    x, _ = blob_features()
    one = Dataset.from_dict({"image_features": x[:1], "text_features": x[:1], "caption": ["a"]})
    with pytest.raises(ValueError, match="at least 2 rows"):
        mine_negatives(one)
    with pytest.raises(ValueError, match="at least 2 rows"):
        mine_negatives(one.select([]))
    two = Dataset.from_dict({"image_features": x[[0, 50]], "text_features": x[[0, 50]], "caption": ["a", "b"]})
    mined, stats = mine_negatives(two, MiningConfig(evidence="image_cluster", negatives_per_row=3))
    assert mined["negative_indices"] == [[1, -1, -1], [0, -1, -1]]
    assert mined["negative_weights"][0][1:] == [0.0, 0.0]
    assert stats.rows_with_fewer_negatives == 2
    assert stats.fewer_negatives_reasons == {"all other rows are in similar image clusters": 2}
    ds, _ = blob_dataset()
    with pytest.raises(ValueError, match="n_image_clusters=500 is larger than the 120 usable rows"):
        mine_negatives(ds, MiningConfig(evidence="image_cluster", n_image_clusters=500))


def test_nan_rows_are_skipped_and_reported_inf_rows_error():
    x, _ = blob_features()
    x[[3, 77]] = np.nan
    ds = Dataset.from_dict({"image_features": x, "text_features": x, "caption": [f"c{i}" for i in range(len(x))]})
    mined, stats = mine(ds)
    assert stats.rows_skipped == 2 and stats.skipped_row_indices == [3, 77]
    negatives = np.array(mined["negative_indices"])
    assert not np.isin(negatives, [3, 77]).any()
    assert (negatives[[3, 77]] == -1).all() and mined["image_cluster"][3] == -1
    assert stats.fewer_negatives_reasons == {"row skipped (unreadable image / NaN features)": 2}
    x[5, 0] = np.inf
    bad = Dataset.from_dict({"image_features": x, "text_features": x, "caption": [f"c{i}" for i in range(len(x))]})
    with pytest.raises(ValueError, match=r"inf values in rows \[5\]"):
        mine(bad)


def test_empty_captions_and_existing_mining_columns_error():
    ds, _ = blob_dataset(captions=[""] + ["ok"] * (N_BLOBS * PER_BLOB - 2) + ["   "])
    with pytest.raises(ValueError, match=r"empty or missing caption.*\[0, 119\]"):
        mine(ds)
    good, _ = blob_dataset()
    mined, _ = mine(good)
    with pytest.raises(ValueError, match="already has mining columns"):
        mine(mined)


def test_store_features_false_drops_feature_columns():
    ds, _ = blob_dataset()
    mined, _ = mine(ds, strategy="cluster", store_features=False)
    assert "image_features" not in mined.column_names and "image_cluster" in mined.column_names
    W, _ = pair_weights(
        {k: torch.tensor(mined[:8][k]) for k in ("image_cluster", "row_id")},
        MiningConfig.from_dataset(mined),
    )
    assert W.shape == (8, 8)


def test_stats_masked_fraction_matches_pair_weights_on_the_batches():
    ds, _ = blob_dataset()
    miner = NegativeMiner(MiningConfig(evidence="image_cluster", n_image_clusters=N_BLOBS, strategy="cluster", stats_batch_size=40)).fit(ds)
    rows = np.arange(0, 120, 3)
    W, _ = pair_weights(miner.batch_tensors(rows), dataclasses.replace(miner.config))
    off = ~torch.eye(40, dtype=torch.bool)
    assert (W[off] == 0).float().mean().item() == pytest.approx(miner.stats.evidence_flagged_fraction, abs=0.05)


# ---------------------------------------------------------------- speed paths (ivf assignment, no copies)


def test_ivf_assignment_matches_exact_search_on_clustered_rows_and_bad_method_is_named():
    from hf_clipneg.clustering import assign_to_centroids

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(100, 32)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, 100, 4000)] + 0.02 * rng.normal(size=(4000, 32)).astype(np.float32)
    exact = assign_to_centroids(x, centres)
    ivf = assign_to_centroids(x, centres, method="ivf")
    assert (exact == np.argmax(x @ centres.T, axis=1)).all()
    assert (ivf >= 0).all() and (ivf == exact).mean() > 0.99
    labels, _ = spherical_kmeans(x, 100, seed=0, assignment="ivf")
    assert labels.shape == (4000,) and labels.min() >= 0
    with pytest.raises(ValueError, match="assignment must be one of"):
        spherical_kmeans(x, 3, assignment="fast")
    with pytest.raises(ValueError, match="kmeans_assignment must be one of"):
        MiningConfig(evidence="image_cluster", kmeans_assignment="fast")


def test_fit_arrays_never_modifies_the_callers_features_and_keeps_unit_norm_input_uncopied():
    x, _ = blob_features()
    original = x.copy()
    x[3] = np.nan  # a skipped row
    original[3] = np.nan
    miner = NegativeMiner(MiningConfig(evidence="image_cluster", n_image_clusters=N_BLOBS, cluster_text=False)).fit_arrays(x, x * 2)
    np.testing.assert_array_equal(x, original)  # not normalised in place, NaN row untouched
    np.testing.assert_allclose(np.linalg.norm(miner.image_features[[0, 5]], axis=1), 1.0, rtol=1e-5)
    assert (miner.image_features[3] == 0).all()
    unit = x[~np.isnan(x).any(1)] / np.linalg.norm(x[~np.isnan(x).any(1)], axis=1, keepdims=True)
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    miner = NegativeMiner(MiningConfig(evidence="image_cluster", n_image_clusters=N_BLOBS, cluster_text=False)).fit_arrays(unit)
    assert np.shares_memory(miner.image_features, unit)  # already unit-norm: no N x d copy
    converted = NegativeMiner(MiningConfig(evidence="image_cluster", n_image_clusters=N_BLOBS, cluster_text=False)).fit_arrays(unit.astype(np.float64))
    np.testing.assert_array_equal(converted.image.labels, miner.image.labels)


def test_any_evidence_flags_a_pair_when_one_signal_fires():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    batch = {"image_features": image, "text_features": text, "group": torch.tensor([0, 1, 2, 0])}
    config = MiningConfig(strategy="cluster", evidence="any", group_column="g", image_cosine_threshold=0.99,
                          text_cosine_threshold=None)
    weights, _ = pair_weights(batch, config)
    masked = {(i, j) for i in range(4) for j in range(4) if i != j and weights[i, j] == 0}
    # rows 0/1 and 2/3: near-identical images; rows 0/3: same group; the text column is not read.
    assert masked == {(0, 1), (1, 0), (0, 3), (3, 0), (2, 3), (3, 2)}
    with pytest.raises(ValueError, match="evidence='any' needs"):
        pair_weights(batch, MiningConfig(strategy="cluster", evidence="any", image_cosine_threshold=None))


def test_any_evidence_mined_negatives_avoid_every_flagged_pair():
    ds, _ = blob_dataset()
    mined, _ = mine(ds, evidence="any", image_cosine_threshold=0.9, group_column="blob", strategy="cluster")
    x = np.array(mined["image_features"])
    groups = np.array(mined["group"])
    for row in range(len(mined)):
        for j in mined[row]["negative_indices"]:
            if j >= 0:
                assert groups[row] != groups[j]
                assert float(x[row] @ x[j]) <= 0.9 + 1e-5
