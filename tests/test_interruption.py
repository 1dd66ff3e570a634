"""SIGKILL mid-run, then rerun: training resumes to the same losses and metrics; mining caches are never half-trusted.

Tolerance (documented in the report): on CPU with the same seed, a resumed run's per-step losses and
final evaluation match an uninterrupted run to rtol=1e-5 / atol=1e-6 (in practice they are equal to
float32 rounding: the Trainer restores model, optimizer, scheduler and RNG states and skips the
already-seen batches of the epoch).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "train_until_killed.py"
RTOL, ATOL = 1e-5, 1e-6


def _script():
    spec = importlib.util.spec_from_file_location("train_until_killed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"},
                            start_new_session=True)


def _kill(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    return output


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 50.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run to reach the kill point")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in-process), with its checkpoints."""
    output_dir = tmp_path_factory.mktemp("reference")
    return output_dir, _script().run_training(str(output_dir))


def _assert_same_run(result: dict, reference: dict) -> None:
    assert result["global_step"] == reference["global_step"]
    losses = {int(step): loss for step, loss in result["losses"].items()}
    expected = {int(step): loss for step, loss in reference["losses"].items()}
    after = sorted(step for step in expected if step > result["resumed_from"])
    assert after and set(after) <= set(losses), (after, sorted(losses))
    np.testing.assert_allclose([losses[s] for s in after], [expected[s] for s in after], rtol=RTOL, atol=ATOL)
    assert result["eval"].keys() == reference["eval"].keys()
    for key, value in reference["eval"].items():
        assert result["eval"][key] == pytest.approx(value, rel=RTOL, abs=ATOL), key


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(reference, tmp_path):
    module = _script()
    output_dir = tmp_path / "killed"
    process = _start("train", str(output_dir), "--slow", "1.0")
    first = output_dir / f"checkpoint-{module.SAVE_STEPS}" / "trainer_state.json"
    _wait_for(first.exists, process, timeout=55)
    time.sleep(0.3)  # land somewhere inside the next steps, not exactly on the checkpoint
    _kill(process)

    assert not (output_dir / "result.json").exists()
    steps = sorted(int(p.rsplit("-", 1)[1]) for p in glob.glob(str(output_dir / "checkpoint-*")))
    assert steps and max(steps) < module.MAX_STEPS
    steps_per_epoch = module.TRAIN_ROWS // module.BATCH
    assert max(steps) % steps_per_epoch != 0  # killed mid-epoch, resuming mid-epoch

    resumed = module.run_training(str(output_dir), resume=True)
    assert 0 < resumed["resumed_from"] < module.MAX_STEPS
    _assert_same_run(resumed, reference[1])


def test_resume_skips_a_half_written_checkpoint(reference, tmp_path):
    module = _script()
    output_dir = tmp_path / "partial"
    shutil.copytree(reference[0], output_dir)
    os.remove(output_dir / "result.json")
    for step in range(2 * module.SAVE_STEPS + 1, module.MAX_STEPS + 1):
        shutil.rmtree(output_dir / f"checkpoint-{step}", ignore_errors=True)
    # The kill hit while checkpoint-9 was being written: the weights are there, the rest is not.
    partial = output_dir / f"checkpoint-{3 * module.SAVE_STEPS}"
    partial.mkdir()
    complete = output_dir / f"checkpoint-{2 * module.SAVE_STEPS}"
    shutil.copy(complete / "model.safetensors", partial / "model.safetensors")
    resumed = module.run_training(str(output_dir), resume=True)
    _assert_same_run(resumed, reference[1])


@pytest.mark.slow
def test_sigkill_during_embedding_leaves_no_cache_a_rerun_trusts(tmp_path):
    from datasets import load_from_disk

    from hf_clipneg.features import compute_features
    from hf_clipneg.data import make_synthetic_pairs
    from hf_clipneg.testing import build_tiny_dual_encoder

    module = _script()
    data = make_synthetic_pairs(num_rows=32, seed=0, image_size=32)
    dataset_dir = tmp_path / "pairs"
    data.save_to_disk(str(dataset_dir))
    before = set(os.listdir(dataset_dir))

    process = _start("embed", str(dataset_dir), "--slow", "0.4")
    seen: list[int] = []

    def third_batch_started() -> bool:
        match = re.search(r"EMBEDDING (\d+)", process.stdout.readline())
        if match:
            seen.append(int(match.group(1)))
        return bool(seen) and seen[-1] >= 8

    _wait_for(third_batch_started, process, timeout=55)
    _kill(process)
    leftovers = set(os.listdir(dataset_dir)) - before
    # datasets writes the map result to a temporary file and renames it when complete: no final cache file.
    assert not [name for name in leftovers if name.startswith("cache-")], leftovers

    rerun = module.embed(str(dataset_dir))  # a fresh process would do the same: a new load_from_disk
    assert rerun.cache_files and all(os.path.exists(f["filename"]) for f in rerun.cache_files)
    model, processor = build_tiny_dual_encoder(seed=module.SEED)
    clean = compute_features(load_from_disk(str(dataset_dir)).flatten_indices(keep_in_memory=True), model, processor,
                             device="cpu", batch_size=4)
    for column in ("image_features", "text_features"):
        np.testing.assert_allclose(np.asarray(rerun[column]), np.asarray(clean[column]), rtol=0, atol=1e-6)
    again = module.embed(str(dataset_dir))  # now served from the complete cache file
    assert [f["filename"] for f in again.cache_files] == [f["filename"] for f in rerun.cache_files]
    np.testing.assert_array_equal(np.asarray(again["image_features"]), np.asarray(rerun["image_features"]))
