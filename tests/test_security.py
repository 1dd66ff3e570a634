"""Security: safe weight loading, no remote code unless asked, tokens never leaked, index files validated."""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from hub_fixtures import ALICE_TOKEN, hub, unique_repo  # noqa: F401 - `hub` is a fixture

SRC = Path(__file__).resolve().parents[1] / "src" / "hf_clipneg"


def _sources() -> list[tuple[Path, str]]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    return [(path, path.read_text(encoding="utf-8")) for path in files]


def _calls(text: str, name: str) -> list[str]:
    """Full text of every call `name(...)` (balanced parentheses, across lines)."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        calls.append(text[match.start() : end + 1])
    return calls


def test_weights_load_only_through_safe_loaders():
    offenders = []
    for path, text in _sources():
        for call in _calls(text, "torch.load"):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        for unsafe in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "np.load", "numpy.load"):
            for call in _calls(text, unsafe):
                if unsafe.endswith("np.load") and "allow_pickle=False" in call:
                    continue
                offenders.append(f"{path.name}: {call}")
        if re.search(r"^\s*(import|from)\s+(pickle|dill|cloudpickle)\b", text, re.MULTILINE):
            offenders.append(f"{path.name}: imports a pickle module")
    assert offenders == []


def test_trust_remote_code_is_never_hardcoded_true():
    offenders = [f"{path.name}: {line.strip()}" for path, text in _sources() for line in text.splitlines()
                 if re.search(r"trust_remote_code\s*=\s*True", line)]
    assert offenders == []
    for path, text in _sources():  # every parameter of that name defaults to False
        for match in re.finditer(r"trust_remote_code\s*:\s*bool\s*=\s*(?!field\()(\w+)", text):
            assert match.group(1) == "False", f"{path.name}: {match.group(0)}"
        for match in re.finditer(r"trust_remote_code\s*:\s*bool\s*=\s*field\(default=(\w+)", text):
            assert match.group(1) == "False", f"{path.name}: {match.group(0)}"


class _Stop(Exception):
    pass


def test_build_dual_encoder_passes_trust_remote_code_false_by_default(monkeypatch):
    from hf_clipneg import towers

    seen: list[dict] = []

    def record(*args, **kwargs):
        seen.append(kwargs)
        raise _Stop

    monkeypatch.setattr(towers.AutoConfig, "from_pretrained", record)
    with pytest.raises(_Stop):
        towers.build_dual_encoder("some/vision", "some/text", device="cpu")
    monkeypatch.setattr(towers, "_load_vision_tower", lambda name, trust: seen.append({"trust_remote_code": trust}))
    monkeypatch.setattr(towers.AutoModel, "from_pretrained", record)
    with pytest.raises(_Stop):
        towers.build_dual_encoder("some/vision", "some/text", device="cpu")
    assert len(seen) == 3 and all(kwargs.get("trust_remote_code") is False for kwargs in seen), seen

    seen.clear()
    with pytest.raises(_Stop):
        towers.build_dual_encoder("some/vision", "some/text", device="cpu", trust_remote_code=True)
    assert all(kwargs.get("trust_remote_code") is True for kwargs in seen)  # forwarded when the user asks


def test_retriever_from_pretrained_does_not_trust_remote_code_by_default(monkeypatch, tiny_dual_encoder, tmp_path):
    from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

    from hf_clipneg.retrieval import ClipNegRetriever

    model, processor = tiny_dual_encoder
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    seen: list[dict] = []
    for cls in (VisionTextDualEncoderModel, VisionTextDualEncoderProcessor):
        original = cls.from_pretrained.__func__

        def recording(klass, *args, _original=original, **kwargs):
            seen.append(kwargs)
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    ClipNegRetriever.from_pretrained(tmp_path, device="cpu")
    assert len(seen) >= 2 and not any(kwargs.get("trust_remote_code") for kwargs in seen), seen
    seen.clear()
    ClipNegRetriever.from_pretrained(tmp_path, device="cpu", trust_remote_code=True)
    assert any(kwargs.get("trust_remote_code") is True for kwargs in seen)


def _files_containing(root: str | os.PathLike, needle: bytes) -> list[str]:
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                if needle in handle.read():
                    hits.append(path)
    return hits


def test_push_with_a_token_never_prints_logs_or_writes_it(hub, tiny_dual_encoder, tmp_path, caplog, capsys):
    from hf_clipneg.hub import push_mined_dataset, push_model, render_model_card
    from hf_clipneg.mining import MiningConfig

    caplog.set_level(logging.DEBUG)
    model, processor = tiny_dual_encoder
    repo_id = unique_repo("sec-model")
    card = render_model_card({"vision": "v", "text": "t"}, repo_id=repo_id,
                             training_args={"hub_token": ALICE_TOKEN, "push_to_hub_token": ALICE_TOKEN, "lr": 1e-3})
    push_model(model, processor, repo_id, card, token=ALICE_TOKEN)
    data = Dataset.from_dict({"caption": ["a red circle", "a blue star"], "row_id": [0, 1]})
    push_mined_dataset(data, unique_repo("sec-data"), MiningConfig(evidence="image_cluster", n_image_clusters=2).to_dict(), token=ALICE_TOKEN)
    captured = capsys.readouterr()
    assert caplog.records
    assert ALICE_TOKEN not in caplog.text
    assert ALICE_TOKEN not in captured.out + captured.err
    assert _files_containing(tmp_path, ALICE_TOKEN.encode()) == []
    assert _files_containing(os.environ["HF_HOME"], ALICE_TOKEN.encode()) == []


def test_trainer_outputs_never_contain_the_hub_token(tiny_dual_encoder, tmp_path, caplog, capsys):
    from hf_clipneg.training import ClipNegTrainer
    from hf_clipneg.training import ClipNegTrainingArguments

    caplog.set_level(logging.DEBUG)
    model, processor = tiny_dual_encoder
    rows = Dataset.from_dict({"image": [Image.new("RGB", (8, 8), c) for c in ("red", "blue")],
                              "caption": ["a red square", "a blue square"]})
    args = ClipNegTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                                    negative_strategy="vanilla", report_to="none", use_cpu=True, save_steps=1,
                                    hub_token=ALICE_TOKEN, logging_steps=1, disable_tqdm=True)
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                             processing_class=processor)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    trainer.create_model_card()
    captured = capsys.readouterr()
    assert (tmp_path / "out" / "README.md").exists()
    assert ALICE_TOKEN not in caplog.text and ALICE_TOKEN not in captured.out + captured.err
    assert _files_containing(tmp_path, ALICE_TOKEN.encode()) == []


# ------------------------------------------------------------------------------------------------ index files


@pytest.fixture
def retriever(tiny_dual_encoder):
    from hf_clipneg.retrieval import ClipNegRetriever

    found = ClipNegRetriever(*tiny_dual_encoder, device="cpu")
    found.index_embeddings(np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32))
    return found


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("content", ["text", "pickle", "torch", "truncated", "fourcc_garbage", "empty"])
def test_index_loader_rejects_files_that_are_not_faiss_indexes(content, retriever, tmp_path):
    good = tmp_path / "good.faiss"
    retriever.save_index(good)
    path = tmp_path / "bad.faiss"
    if content == "text":
        path.write_text("not an index at all\n" * 4)
    elif content == "pickle":
        path.write_bytes(pickle.dumps(_Boom()))
    elif content == "torch":
        torch.save({"weights": torch.zeros(3)}, path)
    elif content == "truncated":
        path.write_bytes(good.read_bytes()[:60])
    elif content == "fourcc_garbage":
        path.write_bytes(b"IxFI" + os.urandom(200))
    else:
        path.write_bytes(b"")
    (tmp_path / "bad.faiss.json").write_bytes((tmp_path / "good.faiss.json").read_bytes())
    with pytest.raises(ValueError) as err:
        retriever.load_index(path)
    assert "bad.faiss" in str(err.value)
    assert retriever.indexed_size() == 5  # the previous index is untouched


def test_index_loader_rejects_a_sidecar_or_mismatched_pair(retriever, tmp_path):
    path = tmp_path / "images.faiss"
    retriever.save_index(path)
    with pytest.raises(ValueError, match="not a faiss index"):
        retriever.load_index(str(path) + ".json")
    (tmp_path / "images.faiss.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="sidecar"):
        retriever.load_index(path)


def test_benchmarks_never_unpickle_their_caches():
    """The benchmarks cache through `datasets` (Arrow files) and safetensors/JSON: none of them loads a pickle, so a
    planted cache file can hold data but never run code."""
    import re
    from pathlib import Path

    unsafe = re.compile(r"pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)|allow_pickle=True|joblib\.load")
    for script in sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py")):
        hits = [n for n, line in enumerate(script.read_text().splitlines(), 1) if unsafe.search(line)]
        assert not hits, f"{script.name} lines {hits} load pickles"
