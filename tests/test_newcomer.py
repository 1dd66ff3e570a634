"""Issue #17, what a new user hit: training defaults by what trains, a launch/world-size mismatch named up front,
progress bars, no error-looking noise, usable `search` output, the `inspect` PNGs, help and one column name."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hf_clipneg.cli import COMMANDS, main, parse

TINY = ["--tiny_random_towers"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]


@pytest.fixture
def records():
    """Every record reaching the `hf_clipneg`, `transformers` and `faiss` loggers (transformers' does not
    propagate to the root logger, so caplog alone misses it)."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("hf_clipneg", "transformers", "faiss")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield handler
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def _train_types():
    from hf_clipneg.pipeline import ColumnArguments, DataArguments, ModelArguments
    from hf_clipneg.training import ClipNegTrainingArguments

    return [DataArguments, ColumnArguments, ModelArguments, ClipNegTrainingArguments]


def _training_args(argv: list[str]):
    return parse(_train_types(), ["--output_dir", "/tmp/hf_clipneg_newcomer", "--report_to", "none", *argv], "t")[3]


# 1. defaults by what trains -------------------------------------------------------------------------------------

def test_train_defaults_follow_what_trains():
    default = _training_args([])
    assert default.tower_training.value == "partial"  # the last blocks train: the setting chosen on validation
    assert (default.learning_rate, default.per_device_train_batch_size, default.per_device_eval_batch_size) == (
        1e-3, 256, 64)
    frozen = _training_args(["--tower_training", "frozen"])
    assert (frozen.learning_rate, frozen.per_device_train_batch_size, frozen.per_device_eval_batch_size) == (1e-3, 64, 64)
    full = _training_args(["--tower_training", "full"])
    assert (full.learning_rate, full.per_device_train_batch_size) == (2e-5, 32)
    # what the user gives is kept, in any spelling argparse accepts
    given = _training_args(["--learning_rate", "5e-5", "--per-device-train-batch-size=8"])
    assert (given.learning_rate, given.per_device_train_batch_size, given.per_device_eval_batch_size) == (5e-5, 8, 64)


def test_train_defaults_from_a_config_file(tmp_path):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "report_to": "none", "tower_training": "partial",
                                  "per_device_train_batch_size": 16}))
    args = parse(_train_types(), [str(config)], "t")[3]
    assert (args.learning_rate, args.per_device_train_batch_size) == (1e-3, 16)


def test_train_help_states_the_defaults_by_tower_training(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "frozen: 0.001, partial: 0.001, full: 2e-05" in text
    assert "frozen: 64, partial: 256, full: 32" in text


@pytest.mark.parametrize("tower_training,warns", [("frozen", True), ("partial", True), ("full", False)])
def test_new_projections_at_transformers_default_learning_rate_warn(tiny_dual_encoder, records, tmp_path,
                                                                    tower_training, warns):
    from datasets import Dataset
    from PIL import Image

    from hf_clipneg.training import ClipNegTrainer
    from hf_clipneg.training import ClipNegTrainingArguments

    model, processor = tiny_dual_encoder
    rows = Dataset.from_dict({"image": [Image.new("RGB", (8, 8), c) for c in ("red", "blue")], "caption": ["a", "b"]})
    args = ClipNegTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                    negative_strategy="vanilla", tower_training=tower_training)
    ClipNegTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)
    warned = [m for m in records.messages() if "learning_rate=5e-05 is transformers' default" in m]
    assert len(warned) == warns and all(f"tower_training={tower_training!r}" in m for m in warned)


def test_a_run_of_few_optimizer_steps_warns_with_a_batch_that_fits(records, tmp_path):
    from hf_clipneg.training import ClipNegTrainingArguments
    from hf_clipneg.training.setup_checks import check_step_count

    def warnings(**options):
        records.records.clear()
        args = ClipNegTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **options)
        check_step_count(args, num_rows=600)
        return [m for m in records.messages() if "optimiser step" in m]

    # the README CLI run at the partial-depth default batch: 600 rows in 3 batches of 256, 2 epochs = 6 steps
    (message,) = warnings(per_device_train_batch_size=256, num_train_epochs=2)
    assert "makes 6 optimiser step(s)" in message and "about 60 rows" in message
    assert warnings(per_device_train_batch_size=64, num_train_epochs=2) == []  # 20 steps
    assert warnings(per_device_train_batch_size=256, num_train_epochs=8) == []  # 24 steps
    assert warnings(per_device_train_batch_size=256, max_steps=5) == []  # a length the user chose
    (message,) = warnings(per_device_train_batch_size=64, num_train_epochs=2, gradient_accumulation_steps=4)
    assert "makes 5 optimiser step(s)" in message


# 2. a launch the Trainer does not know about ---------------------------------------------------------------------

def test_world_size_mismatch_names_the_fix(monkeypatch, tmp_path):
    import torch.distributed as dist

    from hf_clipneg.training import setup_checks
    from hf_clipneg.training import ClipNegTrainingArguments

    args = ClipNegTrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert args.world_size == 1
    setup_checks.check_world_size(args)  # not launched: fine
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(setup_checks, "_has_accelerator", lambda: False)
    with pytest.raises(setup_checks.LaunchMismatchError) as info:
        setup_checks.check_world_size(args)
    message = str(info.value)
    assert "one of 2 processes" in message and "args.world_size=1" in message
    assert "--use_cpu" in message and "accelerate launch --multi_gpu --num_processes 2" in message


def test_world_size_from_the_environment(monkeypatch, tmp_path):
    from hf_clipneg.training import setup_checks
    from hf_clipneg.training import ClipNegTrainingArguments

    args = ClipNegTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(setup_checks.LaunchMismatchError, match="one of 4 processes .*WORLD_SIZE"):
        setup_checks.check_world_size(args)


@pytest.mark.slow
def test_two_processes_without_use_cpu_fail_up_front(tmp_path):
    """The README's multi-process command without `--use_cpu`, on a machine without GPUs: both processes stop in
    ClipNegTrainer.__init__ with the message, not deep in the loss with a shape error."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine --multi_gpu without use_cpu is a valid launch")
    from test_gather_distributed import _clean_env, _free_port

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    script = Path(__file__).parent / "scripts" / "launch_without_use_cpu.py"
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script), str(tmp_path)]
    done = subprocess.run(command, env=_clean_env(tmp_path / "hf_home"), capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(2):
        error = json.loads((tmp_path / f"rank{rank}.json").read_text())["error"]
        assert error.startswith("LaunchMismatchError") and "--use_cpu" in error


# 3. progress bars -----------------------------------------------------------------------------------------------

def _tiny_demo(tmp_path, *extra: str) -> list[str]:
    return ["demo", *TINY, "--num_train", "32", "--num_eval", "16", "--strategies", "vanilla", "--num_train_epochs", "1",
            "--batch_size", "16", "--output_dir", str(tmp_path), *extra]


def test_demo_shows_training_progress_and_disable_tqdm_hides_it(tmp_path, capsys):
    from hf_clipneg.cli import set_progress_bars

    try:
        assert main(_tiny_demo(tmp_path / "a")) == 0
        shown = capsys.readouterr().err
        assert re.search(r"\d+/2 \[", shown), "the Trainer's progress bar (2 steps) is missing"
        assert main(_tiny_demo(tmp_path / "b", "--disable_tqdm")) == 0
        hidden = capsys.readouterr().err
        assert not re.search(r"\d+/\d+ \[", hidden), hidden[-2000:]
    finally:
        set_progress_bars(True)


# 4. noise -------------------------------------------------------------------------------------------------------

def test_packaged_towers_load_without_error_looking_reports(records):
    from hf_clipneg.towers import build_dual_encoder

    build_dual_encoder(projection_dim=8, device="cpu")
    text = "\n".join(records.messages())
    assert "LOAD REPORT" not in text and "UNEXPECTED" not in text
    assert "newly initialized" not in text and "You should probably TRAIN" not in text
    assert "left out 2 checkpoint weights a dual encoder does not use (classifier)" in text
    assert not [r for r in records.records if r.levelno >= logging.WARNING]


def test_faiss_loader_info_is_dropped_and_its_warnings_kept(records):
    from hf_clipneg._faiss import _quiet_faiss_loader

    loader = logging.getLogger("faiss.loader")
    with _quiet_faiss_loader():
        loader.info("Could not load library with AVX2 support due to:\nModuleNotFoundError(...swigfaiss_avx2)")
        loader.warning("a real faiss problem")
    assert records.messages() == ["a real faiss problem"]


def test_no_pin_memory_warning_on_cpu(tiny_dual_encoder, tmp_path):
    from datasets import Dataset
    from PIL import Image

    from hf_clipneg.training import ClipNegTrainer
    from hf_clipneg.training import ClipNegTrainingArguments

    if torch.cuda.is_available():
        pytest.skip("pinning is useful with a GPU")
    model, processor = tiny_dual_encoder
    rows = Dataset.from_dict({"image": [Image.new("RGB", (8, 8), c) for c in ("red", "blue")], "caption": ["a", "b"]})
    args = ClipNegTrainingArguments(output_dir=str(tmp_path), report_to="none", max_steps=1, learning_rate=1e-3,
                                    per_device_train_batch_size=2, negative_strategy="vanilla", disable_tqdm=True,
                                    save_strategy="no")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ClipNegTrainer(model=model, args=args, train_dataset=rows, processing_class=processor).train()
    assert not [w for w in caught if "pin_memory" in str(w.message)]


def test_mining_statistics_appear_once(tmp_path, capsys, records):
    assert main(["mine", *TINY, "--synthetic_rows", "32", "--output_dir", str(tmp_path / "mined"), "--disable_tqdm"]) == 0
    out = capsys.readouterr().out
    assert out.count("| statistic | value |") == 1
    assert not [m for m in records.messages() if m.startswith("Mining statistics")]
    records.records.clear()
    assert main(["train", *TINY, "--synthetic_rows", "32", "--synthetic_eval_rows", "16", "--output_dir",
                 str(tmp_path / "model"), "--max_steps", "1", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
                 "--disable_tqdm"]) == 0
    assert len([m for m in records.messages() if m.startswith("Mining statistics")]) == 1


# 5. search output -----------------------------------------------------------------------------------------------

@pytest.fixture
def saved_tiny_model(tmp_path, tiny_dual_encoder):
    model, processor = tiny_dual_encoder
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def _csv_with_image_files(folder: Path) -> str:
    from PIL import Image

    lines = ["file,title,sku"]
    for i, colour in enumerate(("red", "green", "blue", "white")):
        Image.new("RGB", (16, 16), colour).save(folder / f"{colour}.png")
        lines.append(f"{colour}.png,a {colour} square,SKU-{i}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "pairs.csv")


def test_search_prints_captions_image_paths_and_the_split(saved_tiny_model, tmp_path, capsys):
    data = _csv_with_image_files(tmp_path)
    base = ["search", "--model_name_or_path", saved_tiny_model, "--train_data", data, "--image_column", "file",
            "--caption_column", "title", "--query", "a red square", "--k", "2", "--disable_tqdm"]
    assert main([*base, "--output", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "pairs.csv" in result["indexed"]["source"] and "'train'" in result["indexed"]["source"]
    assert result["indexed"]["images"] == 4
    hit = result["results"][0]["hits"][0]
    assert set(hit) == {"rank", "id", "score", "caption", "image"}
    assert hit["caption"].startswith("a ") and hit["image"].endswith(".png") and isinstance(hit["id"], int)
    assert main([*base, "--show_columns", "sku,caption"]) == 0
    text = capsys.readouterr().out
    assert "indexed: 4 images of" in text and "query: a red square" in text
    assert re.search(r"row \d+\s+sku: SKU-\d\s+caption: a \w+ square", text)
    with pytest.raises(SystemExit, match=r"--show_columns names \['price'\].*'sku'"):
        main([*base, "--show_columns", "price"])


# 6. inspect -----------------------------------------------------------------------------------------------------

def test_inspect_shows_the_rule_at_the_users_batch_size(tmp_path, capsys):
    from datasets import load_from_disk

    from hf_clipneg.visualize import in_batch_summary

    mined_dir = tmp_path / "mined"
    assert main(["mine", *TINY, "--synthetic_rows", "48", "--output_dir", str(mined_dir), "--evidence", "image_cluster",
                 "--n_image_clusters", "4", "--disable_tqdm"]) == 0
    capsys.readouterr()
    assert main(["inspect", "--mined_dataset", str(mined_dir), "--output_dir", str(tmp_path / "png"), "--batch_size",
                 "16", "--num_batches", "20", "--max_clusters", "2", "--per_cluster", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("clusters.png", "negative_weights.png", "flagged_pairs.png"):
        assert (tmp_path / "png" / name).stat().st_size > 0
    summary = json.loads(out.split("in-batch: ", 1)[1])
    assert summary["batch_size"] == 16 and summary["batches"] == 20
    # 4 image clusters: about a quarter of the pairs of a batch share a cluster and are masked
    assert 0.1 < summary["masked_fraction"] < 0.45
    mined = load_from_disk(str(mined_dir))
    details = in_batch_summary(mined, batch_size=16, num_batches=20, max_examples=6)
    assert 0 < len(details.flagged) <= 6
    labels = mined["image_cluster"]
    for i, j, image_cos, text_cos in details.flagged:
        assert labels[i] == labels[j] and -1.0 <= image_cos <= 1.0 and -1.0 <= text_cos <= 1.0
    vanilla = in_batch_summary(mined, batch_size=16, num_batches=5, strategy="vanilla")
    assert vanilla.to_dict()["masked_fraction"] == 0.0 and vanilla.flagged == []


# 7. help and names ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"tldr"}) + ["tldr"])
def test_every_option_has_help_and_shows_its_default(command, capsys):
    from transformers import TrainingArguments

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    inherited = {f"--{name}" for name in TrainingArguments.__dataclass_fields__}  # transformers' own options
    blocks = re.split(r"\n  (?=--)", text.split("options:", 1)[1])[1:]
    missing = []
    for block in blocks:
        flag = block.split()[0].rstrip(",")
        if flag in inherited or flag.startswith("--no_") or flag in ("--help",):
            continue
        words = " ".join(block.split())
        if "(default:" not in words and "required" not in words.lower() and "Default" not in words:
            missing.append(flag)
    assert not missing, f"{command}: options without help or default: {missing}"
    assert "shared/notes" not in text


def test_tldr_uses_the_caption_column_and_checks_it_before_loading_the_model(tmp_path, monkeypatch):
    from datasets import Dataset

    from hf_clipneg.modeling import ClipNegDualEncoderModel
    from hf_clipneg.cli.tldr import TldrArguments

    assert TldrArguments(model_name_or_path="m", class_names="a,b", output_dir="o").text_column == "caption"

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(ClipNegDualEncoderModel, "from_pretrained", no_model)
    Dataset.from_dict({"image": ["x.png"], "text": ["a shirt"]}).to_parquet(str(tmp_path / "pairs.parquet"))
    with pytest.raises(ValueError, match=r"no column 'caption'; columns are \['image', 'text'\]"):
        main(["tldr", "--model_name_or_path", "m", "--class_names", "shirt,shoe", "--output_dir", str(tmp_path / "head"),
              "--paired_data", str(tmp_path / "pairs.parquet")])
