"""Issue #16: no local-file leaks through Hub datasets, strict index files, no lost results, no silently
wrong evaluation split, strictly typed configs, no silently ignored options."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import struct

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value, load_from_disk
from huggingface_hub import HfApi
from PIL import Image as PILImage

from hf_clipneg._config import ConfigTypeError
from hf_clipneg.cli import main
from hf_clipneg.data import ForeignImagePathError, SplitNotFoundError, load_pairs, make_synthetic_pairs
from hf_clipneg.mining import MiningConfig, mine_negatives
from hf_clipneg.retrieval import ClipNegRetriever
from hf_clipneg.testing import build_tiny_dual_encoder
from hub_fixtures import ALICE_TOKEN, hub, unique_repo  # noqa: F401 - `hub` is a fixture

TINY = ["--tiny_random_towers"]


def _png(path, colour=(200, 10, 10)) -> str:
    PILImage.new("RGB", (8, 8), colour).save(path)
    return str(path)


def _no_model(*_args, **_kwargs):
    raise AssertionError("the model was loaded although the command should have failed before any work")


@pytest.fixture(scope="module")
def mined():
    pairs = make_synthetic_pairs(num_rows=32, seed=0, image_size=32)
    model, processor = build_tiny_dual_encoder()
    dataset, _ = mine_negatives(
        pairs, MiningConfig(evidence="image_cluster", n_image_clusters=3, n_text_clusters=3, negatives_per_row=2),
        model=model, processor=processor,
    )
    return dataset


# ----------------------------------------------------------------------------------------------- 1. local files
def _push_with_paths(repo_id: str, paths: list[str | None], good_png: str) -> None:
    """A Hub dataset whose image column holds un-embedded paths (row 0 is an embedded, valid image)."""
    with open(good_png, "rb") as handle:
        good = handle.read()
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"bytes": good, "path": None}] + [{"bytes": None, "path": path} for path in paths]
    schema = Features({"image": Image(), "caption": Value("string")}).arrow_schema
    table = pa.table({"image": rows, "caption": [f"caption {i}" for i in range(len(rows))]}, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    api = HfApi(token=ALICE_TOKEN)
    api.create_repo(repo_id, repo_type="dataset")
    api.upload_file(path_or_fileobj=buffer.getvalue(), path_in_repo="data/train-00000-of-00001.parquet",
                    repo_id=repo_id, repo_type="dataset")


def test_hub_dataset_cannot_point_at_local_files(hub, tmp_path, monkeypatch):
    secret = _png(tmp_path / "secret.png")
    repo_id = unique_repo("leaky")
    _push_with_paths(repo_id, [secret, "secret.png", "hf://datasets/bob/private/a.png"], _png(tmp_path / "good.png"))
    monkeypatch.chdir(tmp_path)  # the relative path would resolve to the secret too

    with pytest.raises(ForeignImagePathError) as err:
        load_pairs(repo_id)
    message = str(err.value)
    assert "row 1" in message and repr(secret) in message and "row 2" in message and "row 3" in message
    assert "3 image(s)" in message and "never read from this machine's disk" in message

    kept = load_pairs(repo_id, on_missing_image="skip")
    assert kept["caption"] == ["caption 0"]  # only the embedded image is left
    assert kept.cast_column("image", Image(decode=False))[0]["image"]["bytes"] is not None

    # The CLI stops before mining or pushing: nothing of the secret file reaches the Hub.
    target = unique_repo("mined-leak")
    monkeypatch.setattr("hf_clipneg.pipeline.load_model", _no_model)
    with pytest.raises(ForeignImagePathError):
        main(["mine", *TINY, "--train_data", repo_id, "--push_to_hub", target, "--on_bad_image", "skip"])
    assert not HfApi(token=ALICE_TOKEN).repo_exists(target, repo_type="dataset")


def test_hub_imagefolder_files_of_the_same_repo_are_accepted(hub, tmp_path):
    folder = tmp_path / "imf"
    (folder / "train").mkdir(parents=True)
    for i in range(2):
        _png(folder / "train" / f"{i}.png", (i * 100, 0, 0))
    (folder / "train" / "metadata.csv").write_text("file_name,caption\n0.png,a dark square\n1.png,a red square\n")
    repo_id = unique_repo("imagefolder")
    api = HfApi(token=ALICE_TOKEN)
    api.create_repo(repo_id, repo_type="dataset")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset")
    pairs = load_pairs(repo_id)
    assert pairs["caption"] == ["a dark square", "a red square"]
    assert np.asarray(pairs[1]["image"]).tolist()[0][0] == [100, 0, 0]


@pytest.mark.parametrize("source", ["a/../../x", "../outside", "./missing_folder", "data/x.csv"])
def test_sources_written_as_paths_are_never_hub_ids(source):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(source)


@pytest.mark.parametrize("source", ["a/b/c", "user/na me", "-bad/name"])
def test_invalid_hub_ids_are_refused(source):
    with pytest.raises(ValueError, match="neither an existing local file or folder nor a valid Hub dataset id"):
        load_pairs(source)


# ----------------------------------------------------------------------------------------------- 2. index files
@pytest.fixture
def retriever():
    retriever = ClipNegRetriever(*build_tiny_dual_encoder(), device="cpu")
    vectors = np.random.default_rng(0).standard_normal((5, retriever.embedding_dim))
    retriever.index_embeddings(vectors, ids=["a", "b", "c", "d", "e"])
    return retriever


def _flat_header(d: int, ntotal: int) -> bytes:
    return b"IxFI" + struct.pack("<iqqq?i", d, ntotal, 1 << 20, 1 << 20, True, 0)


def test_index_declaring_huge_sizes_is_refused_without_allocating(retriever, tmp_path):
    good = tmp_path / "good.faiss"
    retriever.save_index(good)
    crafted = tmp_path / "crafted.faiss"
    content = _flat_header(16, 1 << 24) + struct.pack("<Q", 16 << 24)
    crafted.write_bytes(content + b"\0" * (160 - len(content)))
    (tmp_path / "crafted.faiss.json").write_bytes((tmp_path / "good.faiss.json").read_bytes())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ValueError, match="declares 1073741824 bytes of data but only 115 are left"):
        retriever.load_index(crafted)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024
    assert retriever.indexed_size() == 5


def test_ivf_index_with_a_foreign_quantizer_is_refused(retriever, tmp_path):
    from hf_clipneg._faiss import import_faiss

    faiss = import_faiss()
    d = retriever.embedding_dim
    vectors = np.random.default_rng(1).standard_normal((40, d)).astype("float32")
    quantizer = faiss.IndexHNSWFlat(d, 8, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIVFFlat(quantizer, d, 2, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors[:5])
    path = tmp_path / "hnsw.faiss"
    faiss.write_index(index, str(path))
    retriever.save_index(tmp_path / "good.faiss")
    sidecar = json.loads((tmp_path / "good.faiss.json").read_text())
    sidecar.update(index_type="ivf", nlist=2, nprobe=1)
    del sidecar["index_sha256"]
    (tmp_path / "hnsw.faiss.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="coarse quantizer is b'IHNf', not the flat inner-product index"):
        retriever.load_index(path)


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([{"x": 1}, "b", "c", "d", "e"], "id of type dict at row 0"),
        (["a", ["b"], "c", "d", "e"], "id of type list at row 1"),
        (["a", "b", None, "d", "e"], "id of type NoneType at row 2"),
        (["a", "b", "c", True, "e"], "id of type bool at row 3"),
        (["a", "b", "c", "d", "a"], "lists the id 'a' at rows 0 and 4"),
    ],
)
def test_sidecar_ids_are_validated(retriever, tmp_path, ids, expected):
    path = tmp_path / "images.faiss"
    retriever.save_index(path)
    sidecar = json.loads((tmp_path / "images.faiss.json").read_text())
    sidecar["ids"] = ids
    (tmp_path / "images.faiss.json").write_text(json.dumps(sidecar))
    fresh = ClipNegRetriever(retriever.model, retriever.processor, device="cpu")
    with pytest.raises(ValueError, match=expected):
        fresh.load_index(path)


def test_sidecar_of_another_index_is_refused(retriever, tmp_path):
    retriever.save_index(tmp_path / "one.faiss")
    other = ClipNegRetriever(retriever.model, retriever.processor, device="cpu")
    other.index_embeddings(np.random.default_rng(5).standard_normal((5, other.embedding_dim)), ids=list("vwxyz"))
    other.save_index(tmp_path / "two.faiss")
    (tmp_path / "one.faiss.json").write_bytes((tmp_path / "two.faiss.json").read_bytes())
    with pytest.raises(ValueError, match="checksum mismatch"):
        other.load_index(tmp_path / "one.faiss")


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_save_index_failure_keeps_the_earlier_index(retriever, tmp_path, monkeypatch):
    from hf_clipneg._faiss import import_faiss

    path = tmp_path / "images.faiss"
    retriever.save_index(path)
    before = (path.read_bytes(), (tmp_path / "images.faiss.json").read_bytes())
    retriever.index_embeddings(np.random.default_rng(3).standard_normal((7, retriever.embedding_dim)))
    faiss = import_faiss()
    real_write = faiss.write_index

    def write_half_then_fail(index, target):
        real_write(index, target)
        with open(target, "r+b") as handle:
            handle.truncate(20)
        _enospc()

    monkeypatch.setattr(faiss, "write_index", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        retriever.save_index(path)
    assert (path.read_bytes(), (tmp_path / "images.faiss.json").read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["images.faiss", "images.faiss.json"]
    monkeypatch.setattr(faiss, "write_index", real_write)
    fresh = ClipNegRetriever(retriever.model, retriever.processor, device="cpu")
    fresh.load_index(path)
    assert fresh.indexed_size() == 5


# ----------------------------------------------------------------------------------------------- 4. lost results
def test_failed_mine_keeps_the_earlier_dataset(tmp_path, monkeypatch, capsys):
    out = tmp_path / "mined"
    args = ["mine", *TINY, "--synthetic_rows", "24", "--output_dir", str(out), "--n_image_clusters", "3",
            "--n_text_clusters", "3", "--negatives_per_row", "2"]
    assert main(args) == 0
    earlier = load_from_disk(str(out))
    rows, description = earlier["caption"], earlier.info.description

    def partial_shard_then_enospc(job_id, shard, fpath, storage_options, writer_batch_size):
        with open(fpath, "wb") as handle:
            handle.write(b"\0" * 64)
        _enospc()
        yield  # a generator, like the method it replaces

    monkeypatch.setattr(Dataset, "_save_to_disk_single", staticmethod(partial_shard_then_enospc))
    with pytest.raises(OSError, match="No space left"):
        main([*args, "--seed", "1"])
    again = load_from_disk(str(out))
    assert again["caption"] == rows and again.info.description == description
    assert sorted(os.listdir(tmp_path)) == ["mined"]  # no temporary sibling left behind


def test_outputs_are_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("hf_clipneg.pipeline.load_model", _no_model)
    data = tmp_path / "data"
    DatasetDict({"train": Dataset.from_dict({"image": [_png(tmp_path / "a.png")], "caption": ["a red square"]})}
                ).save_to_disk(str(data))
    with pytest.raises(ValueError, match="overlaps the input"):
        main(["mine", *TINY, "--train_data", str(data), "--output_dir", str(data)])
    with pytest.raises(ValueError, match="overlaps the input"):
        main(["mine", *TINY, "--train_data", str(data), "--output_dir", str(data / "train")])
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        main(["mine", *TINY, "--train_data", str(data), "--output_dir", str(tmp_path / "a_file" / "out")])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds other files"):
        main(["mine", *TINY, "--train_data", str(data), "--output_dir", str(busy)])
    with pytest.raises(FileExistsError, match="already holds other files"):
        main(["tldr", "--model_name_or_path", str(tmp_path / "model"), "--class_names", "a,b",
              "--output_dir", str(busy)])
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        main(["mine", *TINY, "--train_data", str(data), "--push_to_hub", "me/../x"])


def _csv_pairs(tmp_path, n: int = 8) -> str:
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    lines = ["image,caption"]
    for i in range(n):
        _png(tmp_path / f"{i}.png", (i * 30, 255 - i * 30, 0))
        lines.append(f"{i}.png,a {colours[i % 8]} square")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "pairs.csv")


def test_train_without_eval_data_reports_no_metrics_and_a_failed_save_keeps_the_model(tmp_path, monkeypatch, caplog):
    from transformers import VisionTextDualEncoderModel

    from hf_clipneg.pipeline import DataArguments, ModelArguments, train
    from hf_clipneg.training import ClipNegTrainingArguments

    csv_file = _csv_pairs(tmp_path)
    out = tmp_path / "model"

    def run(seed: int):
        args = ClipNegTrainingArguments(output_dir=str(out), max_steps=1, per_device_train_batch_size=4,
                                        negative_strategy="vanilla", report_to="none", use_cpu=True,
                                        save_strategy="no", disable_tqdm=True, seed=seed)
        return train(DataArguments(train_data=csv_file), ModelArguments(tiny_random_towers=True), args)

    with caplog.at_level(logging.WARNING, logger="hf_clipneg"):
        _, metrics = run(0)
    assert metrics == {}
    assert "No evaluation data" in caplog.text and "no named splits" in caplog.text
    weights = (out / "model.safetensors").read_bytes()

    real_save = VisionTextDualEncoderModel.save_pretrained

    def save_then_enospc(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        with open(os.path.join(folder, "model.safetensors"), "r+b") as handle:
            handle.truncate(10)
        _enospc()

    monkeypatch.setattr(VisionTextDualEncoderModel, "save_pretrained", save_then_enospc)
    with pytest.raises(OSError, match="No space left"):
        run(1)
    monkeypatch.setattr(VisionTextDualEncoderModel, "save_pretrained", real_save)
    assert (out / "model.safetensors").read_bytes() == weights
    VisionTextDualEncoderModel.from_pretrained(str(out))  # still loads
    assert not any(name.startswith(".hf_clipneg") for name in os.listdir(out))


# ----------------------------------------------------------------------------------------------- 5. checkpoints
def test_resume_skips_half_written_checkpoints(tmp_path, caplog):
    from hf_clipneg.training import ClipNegTrainer
    from hf_clipneg.training import ClipNegTrainingArguments

    pairs = make_synthetic_pairs(num_rows=8, seed=0, image_size=32)
    model, processor = build_tiny_dual_encoder()
    args = ClipNegTrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, save_strategy="steps",
                                    per_device_train_batch_size=4, negative_strategy="vanilla", report_to="none",
                                    use_cpu=True, disable_tqdm=True)
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=pairs, processing_class=processor)
    trainer.train()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("")  # the disk filled while it was written
    with caplog.at_level(logging.WARNING, logger="hf_clipneg"):
        assert trainer._last_complete_checkpoint() == str(tmp_path / "checkpoint-1")
    assert "checkpoint-2" in caplog.text and "trainer_state.json is not valid JSON" in caplog.text

    weights = tmp_path / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="No complete checkpoint") as err:
        trainer.train(resume_from_checkpoint=True)
    assert f"{weights} cannot be read" in str(err.value) and "truncated" in str(err.value)
    assert "Delete the incomplete checkpoint folders" in str(err.value)


def test_pipeline_refuses_to_resume_from_a_truncated_checkpoint(tmp_path, monkeypatch):
    from hf_clipneg.pipeline import DataArguments, ModelArguments, train
    from hf_clipneg.training import ClipNegTrainingArguments

    monkeypatch.setattr("hf_clipneg.pipeline.load_model", _no_model)
    checkpoint = tmp_path / "out" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    args = ClipNegTrainingArguments(output_dir=str(tmp_path / "out"), resume_from_checkpoint=str(checkpoint),
                                    report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-3: .*model.safetensors cannot be read"):
        train(DataArguments(synthetic_rows=16, synthetic_eval_rows=8), ModelArguments(tiny_random_towers=True), args)


# ----------------------------------------------------------------------------------------------- 6. atomic push
def _fail_final_commit(monkeypatch):
    """Make the loopback Hub refuse the commit on main that carries mining_config.json."""
    import hub_server

    real_commit = hub_server._Handler._commit

    def failing(self, repo, revision, user):
        if revision == "main" and b"mining_config.json" in self.body:
            raise hub_server.HubError(500, "Internal error (injected by the test)")
        return real_commit(self, repo, revision, user)

    monkeypatch.setattr(hub_server._Handler, "_commit", failing)


def test_push_mined_dataset_is_one_commit_and_a_failure_keeps_the_earlier_push(hub, mined, monkeypatch):
    from hf_clipneg.hub import load_mined_dataset, push_mined_dataset

    api = HfApi(token=ALICE_TOKEN)
    small = mined.select(range(6)).remove_columns(["image_features", "text_features"])
    config = MiningConfig.from_dataset(mined).to_dict()
    repo_id = unique_repo("atomic")
    push_mined_dataset(small, repo_id, config, token=ALICE_TOKEN)
    history = api.list_repo_commits(repo_id, repo_type="dataset")
    assert len(history) == 2  # the initial commit, then data + card + config together
    assert {"README.md", "mining_config.json"} <= set(api.list_repo_files(repo_id, repo_type="dataset"))

    _fail_final_commit(monkeypatch)
    with pytest.raises(Exception, match="injected by the test"):
        push_mined_dataset(mined.select(range(10)), repo_id, config, token=ALICE_TOKEN)
    reloaded = load_mined_dataset(repo_id, split="train")
    assert reloaded["caption"] == small["caption"] and MiningConfig.from_dataset(reloaded).to_dict() == config
    assert [b.name for b in api.list_repo_refs(repo_id, repo_type="dataset").branches] == ["main"]

    fresh = unique_repo("atomic-new")
    with pytest.raises(Exception, match="injected by the test"):
        push_mined_dataset(small, fresh, config, token=ALICE_TOKEN)
    assert api.list_repo_files(fresh, repo_type="dataset") == [".gitattributes"]  # no data without its config
    with pytest.raises(FileNotFoundError, match="push the mined dataset again with push_mined_dataset"):
        load_mined_dataset(fresh, split="train")


# ----------------------------------------------------------------------------------------------- 7. eval split
def test_evaluate_on_a_missing_split_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr("hf_clipneg.retrieval.ClipNegRetriever.from_pretrained", _no_model)
    data = tmp_path / "data"
    DatasetDict({"train": Dataset.from_dict({"image": [_png(tmp_path / "a.png")], "caption": ["a red square"]})}
                ).save_to_disk(str(data))
    with pytest.raises(SplitNotFoundError, match=r"Split 'validation' not found .*available splits: \['train'\]"):
        main(["evaluate", "--model_name_or_path", "m", "--train_data", str(data)])
    csv_file = _csv_pairs(tmp_path, n=2)
    with pytest.raises(SplitNotFoundError, match="has no named splits .* --eval_data"):
        main(["evaluate", "--model_name_or_path", "m", "--train_data", csv_file])
    with pytest.raises(SplitNotFoundError, match=r"Split 'test' not found .*available splits: \['train'\]"):
        main(["evaluate", "--model_name_or_path", "m", "--eval_data", str(data), "--eval_split", "test"])
    with pytest.raises(SplitNotFoundError, match=r"Split 'test' not found .*available splits: \['train'\]"):
        main(["search", "--model_name_or_path", "m", "--eval_data", str(data), "--eval_split", "test", "--query", "x"])


def test_load_data_never_evaluates_on_the_training_rows(tmp_path):
    from hf_clipneg.pipeline import DataArguments, load_data

    csv_file = _csv_pairs(tmp_path, n=3)
    train, evaluation = load_data(DataArguments(train_data=csv_file))
    assert len(train) == 3 and evaluation is None
    train, evaluation = load_data(DataArguments(train_data=csv_file, eval_data=csv_file))
    assert len(evaluation) == 3  # an explicit evaluation file is used whole


def test_eval_strategy_without_eval_data_fails_before_work(tmp_path, monkeypatch):
    from hf_clipneg.pipeline import DataArguments, ModelArguments, train
    from hf_clipneg.training import ClipNegTrainingArguments

    monkeypatch.setattr("hf_clipneg.pipeline.load_model", _no_model)
    args = ClipNegTrainingArguments(output_dir=str(tmp_path / "out"), eval_strategy="steps", eval_steps=1,
                                    report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="eval_strategy=.*needs evaluation data"):
        train(DataArguments(train_data=_csv_pairs(tmp_path, n=2)), ModelArguments(tiny_random_towers=True), args)


# ----------------------------------------------------------------------------------------------- 8. config types
@pytest.mark.parametrize(
    ("command", "values", "expected"),
    [
        ("mine", {"tiny_random_towers": "false", "output_dir": "x"}, "key 'tiny_random_towers' must be a bool"),
        ("mine", {"private": "false", "output_dir": "x"}, "key 'private' must be a bool (true/false), got the str 'false'"),
        ("mine", {"batch_size": "sixty", "output_dir": "x"}, "key 'batch_size' must be an integer, got the str 'sixty'"),
        ("mine", {"kmeans_iterations": 2.5, "output_dir": "x"}, "key 'kmeans_iterations' must be an integer, got the float 2.5"),
        ("mine", {"strategy": "clustr", "output_dir": "x"}, "key 'strategy' must be one of 'vanilla', 'random'"),
        ("mine", {"on_bad_image": "ignore", "output_dir": "x"}, "key 'on_bad_image' must be one of ['error', 'skip']"),
        ("train", {"learning_rate": "fast", "output_dir": "x"}, "key 'learning_rate' must be a number"),
        ("train", {"report_to": 3, "output_dir": "x"}, "key 'report_to'"),
        ("search", {"model_name_or_path": "m", "query": "one", "k": "5"}, "key 'query' must be a list of strings"),
    ],
)
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_files_are_type_checked(tmp_path, command, values, expected, suffix):
    import yaml

    path = tmp_path / f"config{suffix}"
    path.write_text(json.dumps(values) if suffix == ".json" else yaml.safe_dump(values))
    with pytest.raises(ConfigTypeError) as err:
        main([command, str(path)])
    assert expected in str(err.value) and str(path) in str(err.value)


def test_well_typed_config_files_still_parse(tmp_path):
    from hf_clipneg.cli import MineArguments, parse
    from hf_clipneg.pipeline import DataArguments, ModelArguments

    path = tmp_path / "mine.yaml"
    path.write_text("output_dir: out\nprivate: true\nkmeans_iterations: 3\nstrategy: cluster_weighted\n"
                    "pair_quantile: 0.9\ntiny_random_towers: false\n")
    mine_args, _, model_args, config = parse([MineArguments, DataArguments, ModelArguments, MiningConfig],
                                             [str(path)], "test")
    assert (mine_args.private, model_args.tiny_random_towers, config.kmeans_iterations) == (True, False, 3)
    assert config.strategy.value == "cluster_weighted" and config.image_cosine_threshold is None


def test_mining_config_file_is_type_checked(tmp_path):
    from hf_clipneg.pipeline import read_mining_config

    bad = tmp_path / "rule.json"
    bad.write_text(json.dumps({"kmeans_iterations": 2.5}))
    with pytest.raises(ConfigTypeError, match="rule.json'.*key 'kmeans_iterations' must be an integer"):
        read_mining_config(str(bad))
    bad.write_text(json.dumps({"negatives_per_rwo": 2}))
    with pytest.raises(ConfigTypeError, match=r"unknown keys \['negatives_per_rwo'\]"):
        read_mining_config(str(bad))
    bad.write_text(json.dumps({"negatives_per_row": 2, "strategy": "cluster_weighted"}))
    config, keys = read_mining_config(str(bad))
    assert (config.negatives_per_row, keys) == (2, {"negatives_per_row", "strategy"})


# ----------------------------------------------------------------------------------------------- 9. contradictions
def test_pair_quantile_sets_both_thresholds():
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(MiningConfig).parse_args_into_dataclasses(args=["--pair_quantile", "0.5"])
    assert config.image_cosine_threshold is None  # resolved from the quantile, not left at 0.97
    assert MiningConfig(pair_quantile=0.5, image_cosine_threshold=0.9).image_cosine_threshold == 0.9
    assert MiningConfig().image_cosine_threshold == 0.97

    pairs = make_synthetic_pairs(num_rows=24, seed=0, image_size=32)
    model, processor = build_tiny_dual_encoder()
    mined, _ = mine_negatives(pairs, MiningConfig(pair_quantile=0.05, n_image_clusters=3, n_text_clusters=3,
                                                  negatives_per_row=1), model=model, processor=processor)
    resolved = MiningConfig.from_dataset(mined)
    image = np.asarray(mined["image_features"], dtype=np.float64)
    expected = np.quantile((image @ image.T)[np.triu_indices(len(image), k=1)], 0.05)
    assert abs(expected - 0.97) > 0.1  # the quantile is far from the default, so the check below can tell them apart
    # The 5% quantile of sampled pair cosines: close to that of all pairs (0.807 here; sampled 0.818).
    assert abs(resolved.image_cosine_threshold - expected) < 0.03
    assert resolved.text_cosine_threshold is not None


def test_a_rule_file_contradicting_mined_data_fails_before_work(tmp_path, mined, monkeypatch):
    from hf_clipneg.pipeline import DataArguments, ModelArguments, train
    from hf_clipneg.training import ClipNegTrainingArguments

    data = tmp_path / "mined"
    mined.save_to_disk(str(data))
    rule = tmp_path / "rule.json"
    rule.write_text(json.dumps({"evidence": "image_cluster", "weight_power": 3.0, "n_image_clusters": None}))
    monkeypatch.setattr("hf_clipneg.pipeline.load_model", _no_model)
    args = ClipNegTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"already mined, and --mining_config .*rule.json contradicts .*"
                                         r"weight_power=3.0 \(mined with 1.0\)") as err:
        train(DataArguments(train_data=str(data), mining_config=str(rule)), ModelArguments(tiny_random_towers=True), args)
    assert "evidence" not in str(err.value) and "n_image_clusters" not in str(err.value)  # these agree

    rule.write_text(json.dumps({"evidence": "image_cluster", "negatives_per_row": 2}))
    with pytest.raises(AssertionError, match="the model was loaded"):  # agrees: training goes ahead
        train(DataArguments(train_data=str(data), mining_config=str(rule)), ModelArguments(tiny_random_towers=True), args)


def test_trainer_refuses_a_rule_that_contradicts_the_mined_data(tmp_path, mined):
    import dataclasses

    from hf_clipneg.training import ClipNegTrainer
    from hf_clipneg.training import ClipNegTrainingArguments

    model, processor = build_tiny_dual_encoder()
    args = ClipNegTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    stored = MiningConfig.from_dataset(mined)
    with pytest.raises(ValueError, match=r"negatives_per_row=5 \(mined with 2\)"):
        ClipNegTrainer(model=model, args=args, train_dataset=mined, processing_class=processor,
                       mining_config=dataclasses.replace(stored, negatives_per_row=5))
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=mined, processing_class=processor,
                             mining_config=MiningConfig(evidence="image_cluster"))
    assert trainer.mining_config == stored  # the resolved rule the rows were mined with


# ----------------------------------------------------------------------------------------------- a real full disk
@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (needs the right to mount, e.g. root in a container; skipped otherwise)."""
    import subprocess

    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        import gc

        gc.collect()  # drop memory maps of datasets loaded from it
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(folder, leave: int) -> None:
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    with open(os.path.join(folder, "filler"), "wb") as handle:
        handle.write(b"\0" * max(free - leave, 0))


def test_full_disk_keeps_earlier_results(small_fs, retriever, tmp_path):
    path = small_fs / "images.faiss"
    retriever.save_index(path)
    out = small_fs / "mined"
    args = ["mine", *TINY, "--synthetic_rows", "16", "--synthetic_eval_rows", "4", "--output_dir", str(out),
            "--n_image_clusters", "2", "--n_text_clusters", "2", "--negatives_per_row", "1"]
    assert main(args) == 0
    rows = load_from_disk(str(out))["caption"]
    _fill(small_fs, leave=16 * 1024)

    retriever.index_embeddings(np.random.default_rng(0).standard_normal((4000, retriever.embedding_dim)))
    with pytest.raises(OSError) as err:
        retriever.save_index(path)
    assert err.value.errno == errno.ENOSPC or "No space left" in str(err.value)
    with pytest.raises(OSError):
        main([*args, "--seed", "1"])

    fresh = ClipNegRetriever(retriever.model, retriever.processor, device="cpu")
    fresh.load_index(path)
    assert fresh.indexed_size() == 5
    assert load_from_disk(str(out))["caption"] == rows
    assert sorted(os.listdir(small_fs)) == ["filler", "images.faiss", "images.faiss.json", "mined"]
