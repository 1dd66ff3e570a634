"""Cards, pushes and loads of hf_clipneg models and mined datasets against the loopback Hub."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, List, Value, load_dataset
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
from PIL import Image as PILImage
from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

from hf_clipneg.hub import (
    CITATION,
    MINING_CONFIG_PREFIX,
    CardTokenLeakError,
    load_mined_dataset,
    push_mined_dataset,
    push_model,
    render_dataset_card,
    render_model_card,
)
from hf_clipneg.mining import CONFIG_PREFIX, MiningConfig
from hub_fixtures import ALICE_TOKEN, BOB_TOKEN, hub, unique_repo  # noqa: F401 - `hub` is a fixture

MINING_CONFIG = MiningConfig(evidence="image_cluster", n_image_clusters=3, negatives_per_row=2).to_dict()
EVAL = {"text_to_image/R@1": 0.25, "text_to_image/R@5": 0.75, "image_to_text/R@10": 1.0}


def _mined_dataset(n: int = 6) -> Dataset:
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    features = Features({
        "image": Image(),
        "text": Value("string"),
        "row_id": Value("int64"),
        "image_cluster": Value("int32"),
        "negative_indices": List(Value("int64")),
        "negative_weights": List(Value("float32")),
        "image_features": List(Value("float32")),
    })
    return Dataset.from_dict({
        "image": [PILImage.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(n)],
        "text": [f"a {colors[i % 6]} circle" for i in range(n)],
        "row_id": list(range(n)),
        "image_cluster": [i % 3 for i in range(n)],
        "negative_indices": [[(i + 1) % n, (i + 2) % n] for i in range(n)],
        "negative_weights": [rng.random(2).astype(np.float32).tolist() for _ in range(n)],
        "image_features": [rng.standard_normal(4).astype(np.float32).tolist() for _ in range(n)],
    }, features=features)


def _same_rows(a: Dataset, b: Dataset) -> None:
    assert a.features == b.features
    for column in a.column_names:
        if column == "image":
            for x, y in zip(a[column], b[column]):
                np.testing.assert_array_equal(np.asarray(x.convert("RGB")), np.asarray(y.convert("RGB")))
        else:
            assert a[column] == b[column], column


def test_push_mined_dataset_roundtrip_and_config(hub, tmp_path):
    repo_id = unique_repo("mined")
    ds = _mined_dataset()
    commit_url = push_mined_dataset(ds, repo_id, MINING_CONFIG, stats={"rows": 6, "mean negatives": 2.0},
                                    token=ALICE_TOKEN, source="alice/pairs")
    assert f"/datasets/{repo_id}/commit/" in commit_url

    plain = load_dataset(repo_id, split="train")
    _same_rows(ds, plain)

    mined = load_mined_dataset(repo_id, split="train")
    _same_rows(ds, mined)
    assert mined.info.description.startswith(MINING_CONFIG_PREFIX)
    assert json.loads(mined.info.description[len(MINING_CONFIG_PREFIX):]) == MINING_CONFIG
    assert CONFIG_PREFIX == MINING_CONFIG_PREFIX
    assert MiningConfig.from_dataset(mined).to_dict() == MINING_CONFIG
    whole = load_mined_dataset(repo_id)
    assert json.loads(whole["train"].info.description[len(MINING_CONFIG_PREFIX):]) == MINING_CONFIG

    api = HfApi(token=ALICE_TOKEN)
    files = set(api.list_repo_files(repo_id, repo_type="dataset"))
    assert {"README.md", "mining_config.json"} <= files
    assert any(f.startswith("data/train-") and f.endswith(".parquet") for f in files)
    card = ModelCard.load(repo_id, repo_type="dataset")  # any RepoCard parses the YAML
    meta = card.data.to_dict()
    assert {"hf-clipneg", "image-text-retrieval"} <= set(meta["tags"])
    assert meta["hf_clipneg"]["mining_config"] == MINING_CONFIG
    assert "dataset_info" in meta and "configs" in meta  # what push_to_hub wrote is kept
    assert "| rows | 6 |" in card.text and "Tagami" in card.text


def test_the_hub_reads_the_mining_config_prefix_from_the_torch_free_mining_config():
    """One prefix, defined in hf_clipneg.mining.config and used by the Hub code, whose import stays free of torch."""
    code = (
        "import sys\n"
        "import hf_clipneg.hub as hub\n"
        "import hf_clipneg.mining.config as config\n"
        "assert hub.MINING_CONFIG_PREFIX is config.CONFIG_PREFIX\n"
        "print(sorted(name for name in ('torch', 'hf_clipneg.mining.rule', 'hf_clipneg.mining.miner') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_load_mined_dataset_needs_a_mining_config(hub):
    repo_id = unique_repo("plain")
    Dataset.from_dict({"text": ["a"], "row_id": [0]}).push_to_hub(repo_id, token=ALICE_TOKEN)
    with pytest.raises(FileNotFoundError, match="mining_config.json"):
        load_mined_dataset(repo_id, split="train")


def test_render_model_card_contents():
    card = render_model_card(
        {"vision": "google/vit-base-patch16-224-in21k", "text": "google-bert/bert-base-uncased"},
        dataset="alice/pairs",
        mining_config=MINING_CONFIG,
        negative_strategy="cluster-weighted",
        eval_results=EVAL,
        training_args={"learning_rate": 5e-5, "hub_token": "hf_should_not_appear", "push_to_hub": True},
        repo_id="alice/clipneg-model",
    )
    parsed = ModelCard(card)
    meta = parsed.data.to_dict()
    assert meta["library_name"] == "transformers"
    assert {"hf-clipneg", "clip", "image-text-retrieval"} <= set(meta["tags"])
    assert meta["datasets"] == ["alice/pairs"]
    results = {r.metric_name: r.metric_value for r in parsed.data.eval_results}
    assert results == EVAL
    for name, value in EVAL.items():
        assert f"| {name} | {value:.4f} |" in card
    assert CITATION in card and "WSCG 2024" in card and "Tagami" in card
    assert 'ClipNegRetriever.from_pretrained("alice/clipneg-model")' in card
    assert 'VisionTextDualEncoderModel.from_pretrained("alice/clipneg-model")' in card
    assert "cluster-weighted" in card and '"n_image_clusters": 3' in card
    assert "hf_should_not_appear" not in card and "hub_token" not in card
    assert "learning_rate" in card


def test_render_dataset_card_accepts_markdown_stats():
    card = render_dataset_card(MiningConfig(evidence="image_cluster", n_image_clusters=3, negatives_per_row=2), "**6 rows**, 0 skipped")
    assert "**6 rows**, 0 skipped" in card
    assert ModelCard(card).data.to_dict()["hf_clipneg"]["mining_config"] == MINING_CONFIG


def test_push_model_roundtrip(hub, tiny_dual_encoder, tmp_path):
    model, processor = tiny_dual_encoder
    repo_id = unique_repo("model")
    card = render_model_card({"vision": "tiny-vit", "text": "tiny-bert"}, eval_results=EVAL, repo_id=repo_id)
    commit_url = push_model(model, processor, repo_id, card, token=ALICE_TOKEN)
    assert f"/{repo_id}/commit/" in commit_url
    api = HfApi(token=ALICE_TOKEN)
    assert len(api.list_repo_commits(repo_id)) == 2  # repo creation + one upload commit

    loaded = VisionTextDualEncoderModel.from_pretrained(repo_id, cache_dir=tmp_path)
    expected = model.state_dict()
    got = loaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    loaded_processor = VisionTextDualEncoderProcessor.from_pretrained(repo_id, cache_dir=tmp_path)
    assert loaded_processor.tokenizer("a red circle")["input_ids"] == processor.tokenizer("a red circle")["input_ids"]
    image = PILImage.new("RGB", (40, 40), "red")
    torch.testing.assert_close(loaded_processor(images=image, return_tensors="pt")["pixel_values"],
                               processor(images=image, return_tensors="pt")["pixel_values"])

    from hf_clipneg.retrieval import ClipNegRetriever  # the card's usage snippet

    assert ClipNegRetriever.from_pretrained(repo_id, device="cpu").embedding_dim == model.config.projection_dim
    remote_card = open(hf_hub_download(repo_id, "README.md", cache_dir=tmp_path), encoding="utf-8").read()
    assert remote_card == card and "| text_to_image/R@1 | 0.2500 |" in remote_card and CITATION in remote_card


def test_private_pushes_are_denied_without_token(hub, tiny_dual_encoder, tmp_path):
    model, processor = tiny_dual_encoder
    repo_id = unique_repo("private-model")
    push_model(model, processor, repo_id, render_model_card({"vision": "v", "text": "t"}), private=True,
               token=ALICE_TOKEN)
    assert HfApi(token=ALICE_TOKEN).model_info(repo_id).private is True
    with pytest.raises(OSError):
        VisionTextDualEncoderModel.from_pretrained(repo_id, cache_dir=tmp_path / "anon")
    with pytest.raises(OSError):
        VisionTextDualEncoderModel.from_pretrained(repo_id, cache_dir=tmp_path / "bob", token=BOB_TOKEN)
    VisionTextDualEncoderModel.from_pretrained(repo_id, cache_dir=tmp_path / "alice", token=ALICE_TOKEN)

    data_repo = unique_repo("private-data")
    push_mined_dataset(_mined_dataset(3), data_repo, MINING_CONFIG, private=True, token=ALICE_TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        load_mined_dataset(data_repo, split="train", token=False)
    with pytest.raises(Exception, match="(?i)doesn't exist|not found|cannot be accessed"):
        load_dataset(data_repo, split="train", cache_dir=str(tmp_path / "ds_anon"), token=False)
    assert len(load_mined_dataset(data_repo, split="train", token=ALICE_TOKEN)) == 3


def _files_containing(root: str, needle: bytes) -> list[str]:
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        hits.append(path)
            except OSError:
                pass
    return hits


def test_token_never_written_or_logged(hub, tiny_dual_encoder, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    model, processor = tiny_dual_encoder
    repo_id = unique_repo("noleak")
    card = render_model_card({"vision": "v", "text": "t"}, training_args={"hub_token": ALICE_TOKEN}, repo_id=repo_id)
    assert ALICE_TOKEN not in card
    push_model(model, processor, repo_id, card, token=ALICE_TOKEN)
    data_repo = unique_repo("noleak-data")
    push_mined_dataset(_mined_dataset(3), data_repo, {**MINING_CONFIG, "api_key": ALICE_TOKEN},
                       token=ALICE_TOKEN)
    load_mined_dataset(data_repo, split="train", token=ALICE_TOKEN)
    with pytest.raises(CardTokenLeakError):
        push_model(model, processor, repo_id, card + f"\n{ALICE_TOKEN}\n", token=ALICE_TOKEN)

    assert caplog.records, "expected some log records to inspect"
    assert ALICE_TOKEN not in caplog.text
    needle = ALICE_TOKEN.encode()
    assert _files_containing(str(tmp_path), needle) == []
    assert _files_containing(os.environ["HF_HOME"], needle) == []
    api = HfApi(token=ALICE_TOKEN)
    for repo, repo_type in ((repo_id, "model"), (data_repo, "dataset")):
        for name in api.list_repo_files(repo, repo_type=repo_type):
            path = api.hf_hub_download(repo, name, repo_type=repo_type, cache_dir=tmp_path / "check")
            with open(path, "rb") as f:
                assert needle not in f.read(), name


def test_transformers_native_push_to_hub(hub, tiny_dual_encoder, tmp_path):
    model, processor = tiny_dual_encoder
    repo_id = unique_repo("native")
    model.push_to_hub(repo_id, token=ALICE_TOKEN)
    processor.push_to_hub(repo_id, token=ALICE_TOKEN)
    loaded = VisionTextDualEncoderModel.from_pretrained(repo_id, cache_dir=tmp_path)
    torch.testing.assert_close(loaded.logit_scale, model.logit_scale)
    torch.testing.assert_close(loaded.text_projection.weight, model.text_projection.weight)
    assert VisionTextDualEncoderProcessor.from_pretrained(repo_id, cache_dir=tmp_path).tokenizer.vocab_size == \
        processor.tokenizer.vocab_size
