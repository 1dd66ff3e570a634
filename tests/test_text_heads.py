"""Tests of text-only last-layer retraining (TLDR) and the modality-gap tools."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from hub_fixtures import ALICE_TOKEN, hub, unique_repo  # noqa: F401 - `hub` is a fixture

from hf_clipneg.cli.tldr import TldrArguments, parse_attributes, tldr_main
from hf_clipneg.tldr import (
    Balance,
    Description,
    ImageSpaceProjector,
    TextTrainedHead,
    balanced_weights,
    build_descriptions,
    encode_texts,
    filter_descriptions,
    fit_text_head,
    group_accuracy,
    modality_gap,
    read_descriptions,
    zero_shot_classify,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The heads train tiny full-batch problems; on a busy 2-core machine intra-op threads only
    oversubscribe the CPU (observed: 10 s instead of 0.15 s per fit)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_pairs(n_per_class=60, num_classes=4, dim=16, offset_scale=1.0, noise=0.35, seed=0, noise_seed=None):
    """Image and text embeddings sharing one class structure; images = texts' class structure + a known offset.

    ``seed`` fixes the class means and the offset, ``noise_seed`` the samples (fresh test data)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    offset = rng.normal(size=dim)
    offset *= offset_scale / np.linalg.norm(offset)
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    texts = means[labels] + noise * rng.normal(size=(len(labels), dim))
    images = means[labels] + noise * rng.normal(size=(len(labels), dim)) + offset
    return _normalize(images), _normalize(texts), labels, offset


# ---------------------------------------------------------------------------------------------- gap


def test_modality_gap_constructed_example():
    theta = 0.4
    images = np.array([[math.cos(theta), math.sin(theta), 0.0], [math.cos(theta), -math.sin(theta), 0.0]])
    texts = np.array([[-math.cos(theta), math.sin(theta), 0.0], [-math.cos(theta), -math.sin(theta), 0.0]])
    gap = modality_gap(images * 3.0, texts)  # scale must not matter: rows are normalised
    np.testing.assert_allclose(gap.vector, [2 * math.cos(theta), 0.0, 0.0], atol=1e-6)
    assert gap.norm == pytest.approx(2 * math.cos(theta))
    # pooled variance: cos^2 along x (the gap direction), sin^2 along y
    assert gap.explained_variance == pytest.approx(math.cos(theta) ** 2)
    np.testing.assert_allclose(gap.direction, [1.0, 0.0, 0.0], atol=1e-6)
    assert json.loads(json.dumps(gap.to_dict()))["norm"] == pytest.approx(gap.norm)


def test_modality_gap_two_points_explains_everything():
    gap = modality_gap(np.array([[1.0, 0.0]] * 3), np.array([[0.0, 1.0]] * 3))
    assert gap.norm == pytest.approx(math.sqrt(2))
    assert gap.explained_variance == pytest.approx(1.0)


def test_modality_gap_bad_input_names_row():
    images = np.ones((3, 4))
    texts = np.ones((3, 4))
    texts[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        modality_gap(images, texts)
    with pytest.raises(ValueError, match="features per row"):
        modality_gap(images, np.ones((3, 5)))
    with pytest.raises(TypeError, match="numbers"):
        modality_gap(np.array([["a", "b"]]), np.ones((1, 2)))


# ---------------------------------------------------------------------------------------------- projector


def test_projector_maps_gap_direction_to_zero():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(200, 12)), rng.normal(size=(200, 7))
    gap = rng.normal(size=12)
    projector = ImageSpaceProjector().fit(X, Y, gap, alpha=1e-2)
    W = projector.weight.double().numpy()
    assert np.linalg.norm(W @ (gap / np.linalg.norm(gap))) / np.linalg.norm(W) < 1e-5
    raw = ImageSpaceProjector(normalize_inputs=False).fit(X, Y, gap)
    np.testing.assert_allclose(raw.transform(X[:5]), raw.transform(X[:5] + 3.0 * gap), atol=1e-4)


def test_projector_recovers_a_gap_free_linear_map_exactly():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 10))
    u = np.eye(10)[3]
    A = rng.normal(size=(10, 6))
    A[3] = 0.0  # the true map ignores the gap direction
    Y = X @ A + 0.5
    projector = ImageSpaceProjector(normalize_inputs=False).fit(X, Y, u, alpha=0.0)
    np.testing.assert_allclose(projector.weight.numpy(), A.T, atol=1e-4)
    assert projector.score(X, Y) == pytest.approx(1.0, abs=1e-6)
    # An unconstrained fit would use dimension 3 when it matters; the constrained one may not.
    Y2 = Y + 2.0 * X[:, [3]]
    constrained = ImageSpaceProjector(normalize_inputs=False).fit(X, Y2, u, alpha=0.0)
    assert np.abs(constrained.weight.numpy()[:, 3]).max() < 1e-6
    assert constrained.score(X, Y2) < 0.99


def test_projector_save_load_and_errors(tmp_path):
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
    projector = ImageSpaceProjector().fit(X, Y, np.ones(6))
    projector.save_pretrained(tmp_path / "p")
    loaded = ImageSpaceProjector.from_pretrained(tmp_path / "p")
    np.testing.assert_allclose(loaded.transform(X), projector.transform(X), atol=1e-6)
    assert torch.is_tensor(loaded.transform(torch.from_numpy(X).float()))
    with pytest.raises(ValueError, match="rows"):
        ImageSpaceProjector().fit(X, Y[:10], np.ones(6))
    with pytest.raises(RuntimeError, match="not fitted"):
        ImageSpaceProjector().transform(X)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        ImageSpaceProjector.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- heads


def test_text_trained_head_matches_image_trained_head_after_gap_removal():
    images, texts, labels, _ = synthetic_pairs(offset_scale=1.5)
    test_images, _, test_labels, _ = synthetic_pairs(offset_scale=1.5, noise_seed=10)
    gap = modality_gap(images, texts)
    assert gap.norm > 0.5
    image_head = TextTrainedHead(["a", "b", "c", "d"], 16, gap_vector=gap.vector).fit(images, labels)
    text_head = TextTrainedHead(["a", "b", "c", "d"], 16, gap_vector=gap.vector).fit(texts, labels)
    image_acc = (image_head.predict(test_images) == test_labels).mean()
    text_acc = (text_head.predict(test_images) == test_labels).mean()
    assert image_acc > 0.9 and text_acc > 0.9
    assert abs(image_acc - text_acc) <= 0.05


def test_text_trained_head_through_projector_and_target_space():
    images, texts, labels, _ = synthetic_pairs(n_per_class=80, offset_scale=1.5, seed=4, noise=0.25)
    rng = np.random.default_rng(5)
    A = rng.normal(size=(16, 24))
    target = np.tanh(images @ A) + 0.05 * rng.normal(size=(len(images), 24))  # the "vision tower" features
    gap = modality_gap(images, texts)
    projector = ImageSpaceProjector().fit(images, target, gap.vector, alpha=1e-3)
    train, test = np.arange(len(labels)) % 2 == 0, np.arange(len(labels)) % 2 == 1
    text_head = TextTrainedHead(list("abcd"), 16, projector=projector).fit(texts[train], labels[train])
    probe = TextTrainedHead(list("abcd"), 16, projector=projector).fit(target[train], labels[train], space="target")
    text_acc_joint = (text_head.predict(images[test]) == labels[test]).mean()
    text_acc_target = (text_head.predict(target[test], space="target") == labels[test]).mean()
    probe_acc = (probe.predict(target[test], space="target") == labels[test]).mean()
    assert probe_acc > 0.9
    assert text_acc_joint > 0.9 and text_acc_target > 0.9
    assert probe_acc - text_acc_target <= 0.05


def test_head_save_load_round_trip(tmp_path):
    images, texts, labels, _ = synthetic_pairs(seed=6)
    gap = modality_gap(images, texts)
    projector = ImageSpaceProjector().fit(images, images @ np.random.default_rng(0).normal(size=(16, 8)), gap.vector)
    for name, head in {
        "gap": TextTrainedHead(list("abcd"), 16, gap_vector=gap.vector),
        "projector": TextTrainedHead(list("abcd"), 16, projector=projector),
        "plain": TextTrainedHead(list("abcd"), 16),
    }.items():
        head.fit(texts, [head.class_names[i] for i in labels])
        head.save_pretrained(tmp_path / name)
        loaded = TextTrainedHead.from_pretrained(tmp_path / name)
        np.testing.assert_array_equal(loaded.predict(images), head.predict(images))
        np.testing.assert_allclose(loaded.predict_proba(images), head.predict_proba(images), atol=1e-6)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["id2label"] == {"0": "a", "1": "b", "2": "c", "3": "d"}
        assert (config["projector"] is not None) == (name == "projector")


def test_head_and_projector_push_to_and_load_from_the_hub(hub, tmp_path):
    images, texts, labels, _ = synthetic_pairs(seed=8)
    gap = modality_gap(images, texts)
    projector = ImageSpaceProjector().fit(images, images @ np.random.default_rng(1).normal(size=(16, 8)), gap.vector)
    head = TextTrainedHead(list("abcd"), 16, projector=projector).fit(texts, labels)
    head_repo, projector_repo = unique_repo("tldr-head"), unique_repo("tldr-projector")
    head.push_to_hub(head_repo, token=ALICE_TOKEN)
    projector.push_to_hub(projector_repo, token=ALICE_TOKEN)
    loaded = TextTrainedHead.from_pretrained(head_repo, cache_dir=tmp_path)
    np.testing.assert_array_equal(loaded.predict(images), head.predict(images))
    np.testing.assert_allclose(loaded.predict_proba(images), head.predict_proba(images), atol=1e-6)
    assert loaded.training_summary == head.training_summary and loaded.projector.out_dim == 8
    loaded_projector = ImageSpaceProjector.from_pretrained(projector_repo, cache_dir=tmp_path)
    np.testing.assert_allclose(loaded_projector.transform(images), projector.transform(images), atol=1e-6)
    with pytest.raises(ValueError, match="not a 'hf_clipneg_image_space_projector'"):
        ImageSpaceProjector.from_pretrained(head_repo, cache_dir=tmp_path)


def test_head_input_errors():
    head = TextTrainedHead(["x", "y"], 4)
    with pytest.raises(ValueError, match="not one of the classes"):
        head.fit(np.eye(4), ["x", "y", "x", "zebra"])
    bad = np.ones((3, 4))
    bad[1, 0] = np.inf
    with pytest.raises(ValueError, match="row 1"):
        head.predict(bad)
    with pytest.raises(ValueError, match="needs a head with a projector"):
        head.predict(np.ones((2, 4)), space="target")
    with pytest.raises(ValueError, match="duplicates"):
        TextTrainedHead(["x", "x"], 4)


def test_balanced_weights():
    w = balanced_weights([0, 0, 0, 1, 1, 1], ["m", "m", "w", "m", "w", "w"], "group")
    cells = {}
    for key, value in zip([(0, "m"), (0, "m"), (0, "w"), (1, "m"), (1, "w"), (1, "w")], w.tolist()):
        cells[key] = cells.get(key, 0.0) + value
    assert all(v == pytest.approx(1.5) for v in cells.values())
    assert float(w.mean()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs groups"):
        balanced_weights([0, 1], None, Balance.GROUP)
    assert balanced_weights([0, 1, 1], None, "none").tolist() == [1.0, 1.0, 1.0]


def test_group_balanced_training_helps_the_minority_group():
    """Spurious feature: class 0 mostly group g0, class 1 mostly g1 in training; test is balanced."""
    rng = np.random.default_rng(7)

    def sample(label, group, n):
        x = np.zeros((n, 3))
        x[:, 0] = (2 * label - 1) * 0.6 + rng.normal(size=n)  # weak core feature
        x[:, 1] = (2 * group - 1) * 2.0 + 0.3 * rng.normal(size=n)  # strong spurious feature
        x[:, 2] = 3.0
        return x

    cells = [(0, 0, 200), (0, 1, 10), (1, 1, 200), (1, 0, 10)]
    X = np.concatenate([sample(c, g, n) for c, g, n in cells])
    y = np.concatenate([[c] * n for c, g, n in cells])
    groups = np.concatenate([[g] * n for c, g, n in cells]).tolist()
    Xt = np.concatenate([sample(c, g, 300) for c, g, _ in cells])
    yt = np.concatenate([[c] * 300 for c, g, _ in cells])
    gt = np.concatenate([[g] * 300 for c, g, _ in cells]).tolist()
    plain = TextTrainedHead(["c0", "c1"], 3, normalize_inputs=False).fit(X, y, balance="class")
    balanced = TextTrainedHead(["c0", "c1"], 3, normalize_inputs=False).fit(X, y, groups, balance="group")
    worst_plain = group_accuracy(plain.predict(Xt), yt, gt)["worst_group"]
    worst_balanced = group_accuracy(balanced.predict(Xt), yt, gt)["worst_group"]
    assert worst_balanced > worst_plain + 0.15


# ---------------------------------------------------------------------------------------------- descriptions


def test_build_descriptions_is_group_balanced():
    d = build_descriptions(["shirt", "shoe", "watch"], {"gender": ["men", "women"], "usage": ["casual", "formal"]})
    counts = {}
    for x in d:
        counts[(x.label, x.group)] = counts.get((x.label, x.group), 0) + 1
    assert len(counts) == 3 * 4 and len(set(counts.values())) == 1
    assert Description("a photo of a men casual shirt.", "shirt", "men/casual") in d
    some = build_descriptions(["shirt", "shoe"], {"gender": ["men", "women"]}, per_class=4, seed=1)
    assert len(some) == 8
    assert sorted((x.label, x.group) for x in some).count(("shoe", "women")) == 2
    assert build_descriptions(["a", "b"], templates=["{class} photo"]) == [Description("a photo", "a"), Description("b photo", "b")]
    named = build_descriptions(["shoe", "bag"], {"colour": ["red"]}, templates=["a {colour} {class}"])
    assert named[0].text == "a red shoe" and named[0].group == "red"


def test_build_descriptions_errors():
    with pytest.raises(ValueError, match="multiple of the number of groups"):
        build_descriptions(["a", "b"], {"g": ["x", "y"]}, per_class=3)
    with pytest.raises(ValueError, match="no '\\{class\\}'"):
        build_descriptions(["a", "b"], templates=["a photo"])
    with pytest.raises(ValueError, match="unknown placeholder"):
        build_descriptions(["a", "b"], templates=["{colour} {class}"])
    with pytest.raises(TypeError, match="not one string"):
        build_descriptions("a,b")
    with pytest.raises(ValueError, match="no values"):
        build_descriptions(["a", "b"], {"g": []})


def test_read_descriptions_csv_and_tsv(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([["text", "label", "group"], ["a men's shirt", "shirt", "men"], ["a shoe", "1", ""]])
    d = read_descriptions(path, ["shirt", "shoe"])
    assert d == [Description("a men's shirt", "shirt", "men"), Description("a shoe", "shoe", None)]
    tsv = tmp_path / "d.txt"
    tsv.write_text("# comment\na shirt\tshirt\n\na bag\tbag\twomen\n")
    assert read_descriptions(tsv) == [Description("a shirt", "shirt"), Description("a bag", "bag", "women")]
    tsv.write_text("a shirt\tshirt\n  \tshirt\n")
    with pytest.raises(ValueError, match="line 2: the text is empty"):
        read_descriptions(tsv)
    with pytest.raises(ValueError, match="line 3: label 'cat'"):
        path.write_text("text,label\na shirt,shirt\na cat,cat\n")
        read_descriptions(path, ["shirt", "shoe"])
    path.write_text("words,label\nx,y\n")
    with pytest.raises(ValueError, match="lacks the column"):
        read_descriptions(path)


def test_filter_descriptions_drops_wrong_label():
    shirt, shoe = np.array([1.0, 0.0, 0.2]), np.array([0.0, 1.0, 0.2])
    d = [Description("a photo of a shirt", "shirt"), Description("a photo of a shoe", "shirt"), Description("a shoe", "shoe")]
    embeds = np.stack([shirt + 0.1, shoe, shoe + 0.05])
    kept, dropped = filter_descriptions(d, embeds, {"shirt": shirt, "shoe": shoe})
    assert kept == [d[0], d[2]] and dropped == [d[1]]
    kept2, dropped2 = filter_descriptions(d, embeds, np.stack([shirt, shoe]), class_names=["shirt", "shoe"])
    assert kept2 == kept and dropped2 == dropped
    with pytest.raises(ValueError, match="pass class_names"):
        filter_descriptions(d, embeds, np.stack([shirt, shoe]))
    with pytest.raises(ValueError, match="label 'bag'"):
        filter_descriptions([Description("x", "bag")] * 3, embeds, {"shirt": shirt, "shoe": shoe})


def test_fit_text_head_with_dual_encoder_filters_mislabelled_text(tiny_dual_encoder):
    model, processor = tiny_dual_encoder
    names = ["shirt", "shoe", "watch"]
    descriptions = build_descriptions(names, {"gender": ["men", "women"]}, templates=["a photo of a {attr} {class}", "a {attr} {class}"])
    # The text of the shoe class prompt, labelled shirt: identical to the shoe prompt, so it must go.
    wrong = Description("a photo of a shoe.", "shirt", "men")
    head = fit_text_head(model, processor, names, descriptions + [wrong], gap_vector=np.ones(16))
    dropped = [Description(**d) for d in head.training_summary["dropped"]]
    assert wrong in dropped
    assert head.training_summary["num_dropped"] == len(dropped)
    assert head.training_summary["num_samples"] + len(dropped) == len(descriptions) + 1
    image_embeds = encode_texts(model, processor, ["a photo of a men watch"])  # stands in for an image
    assert head.predict(image_embeds).shape == (1,)
    with pytest.raises(ValueError, match="Text 1 is empty"):
        encode_texts(model, processor, ["a shirt", "  "])


# ---------------------------------------------------------------------------------------------- baselines, CLI


def test_zero_shot_and_group_accuracy():
    prompts = np.array([[[1.0, 0.0], [0.9, 0.1]], [[0.0, 1.0], [0.1, 0.9]]])  # two prompts per class
    preds, scores = zero_shot_classify(np.array([[2.0, 0.1], [0.3, 0.5], [0.5, -1.0]]), prompts, return_scores=True)
    assert preds.tolist() == [0, 1, 0] and scores.shape == (3, 2)
    report = group_accuracy([0, 1, 0, 0], [0, 1, 1, 1], ["m", "m", "w", "m"])
    assert report["average"] == 0.5
    assert report["worst_group"] == 0.0 and report["per_group"]["1/m"] == 0.5


@pytest.mark.slow
def test_tldr_cli_end_to_end(tmp_path, tiny_dual_encoder):
    import datasets
    from PIL import Image

    model, processor = tiny_dual_encoder
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(12)]
    texts = ["a red shirt", "a blue shoe", "a black watch"] * 4
    pairs = datasets.Dataset.from_dict({"image": images, "title": texts}).cast_column("image", datasets.Image())
    pairs.to_parquet(str(tmp_path / "pairs.parquet"))
    (tmp_path / "classes.txt").write_text("shirt\nshoe\nwatch\n")
    code = tldr_main([
        "--model_name_or_path", str(tmp_path / "model"), "--class_names", str(tmp_path / "classes.txt"),
        "--output_dir", str(tmp_path / "head"), "--attributes", "gender:men,women",
        "--paired_data", str(tmp_path / "pairs.parquet"), "--text_column", "title", "--fit_projector",
        "--balance", "group", "--max_iter", "50",
    ])
    assert code == 0
    head = TextTrainedHead.from_pretrained(tmp_path / "head")
    assert head.class_names == ["shirt", "shoe", "watch"]
    assert head.projector is not None and head.projector.out_dim == 32  # the ViT tower's hidden size
    assert head.training_summary["balance"] == "group"
    gap = json.loads((tmp_path / "head" / "modality_gap.json").read_text())
    assert gap["norm"] > 0 and 0 <= gap["explained_variance"] <= 1
    rows = list(csv.DictReader((tmp_path / "head" / "descriptions.csv").open()))
    assert len(rows) == 3 * 2 * 6
    with pytest.raises(ValueError, match="needs --paired_data"):
        TldrArguments(model_name_or_path="m", class_names="a,b", output_dir="o", fit_projector=True)
    assert parse_attributes("gender:men,women;usage:casual") == {"gender": ["men", "women"], "usage": ["casual"]}
    assert TldrArguments(model_name_or_path="m", class_names="a,b", output_dir="o", balance="class").balance is Balance.CLASS
