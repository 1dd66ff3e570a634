"""Two CPU processes under accelerate/DDP give the single-process loss and gradients of the concatenated batch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_clipneg.losses import WeightedContrastiveLoss

SCRIPT = Path(__file__).parent / "scripts" / "distributed_gather.py"
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("distributed_gather", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clean_env(home: Path) -> dict[str, str]:
    """No Hub endpoint/token, no inherited accelerate or torchrun settings, a private HF_HOME (no accelerate
    default config), one thread per process on the 2-core runners."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ACCELERATE_", "HF_", "HUGGINGFACE_", "TORCHELASTIC_"))
        and key not in {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}
    }
    env.update(
        HF_HOME=str(home),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore::FutureWarning",
    )
    return env


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    out = tmp_path_factory.mktemp("distributed_gather")
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(SCRIPT), str(out),
    ]
    try:
        completed = subprocess.run(
            command, env=_clean_env(out / "hf_home"), capture_output=True, text=True, timeout=120,
            cwd=Path(__file__).parent.parent,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"2-process run timed out after {err.timeout}s:\n{err.stderr}")
    assert completed.returncode == 0, f"2-process run failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}"
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[float, dict[str, torch.Tensor]]]:
    script = _load_script()
    model, loss_fn = script.TinyDualEncoder(), WeightedContrastiveLoss()
    return {case["name"]: script.loss_and_grads(model, loss_fn, case) for case in script.make_cases()}


@pytest.mark.slow
def test_two_processes_run_under_ddp(distributed_results):
    for rank, result in enumerate(distributed_results):
        assert result["rank"] == rank and result["world_size"] == 2
        assert result["wrapper"] == "DistributedDataParallel"
    # gather_metadata puts rank 0's rows first, also with unequal shares (4 + 3)
    assert distributed_results[1]["cases"]["weighted"]["gathered_rows"] == list(range(7))
    assert distributed_results[0]["cases"]["vanilla"]["gathered_rows"] == list(range(8))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vanilla", "weighted"])
def test_gathered_loss_and_gradients_equal_single_process(distributed_results, reference, case):
    expected_loss, expected_grads = reference[case]
    for result in distributed_results:
        got = result["cases"][case]
        assert abs(got["loss"] - expected_loss) <= TOLERANCE * max(1.0, abs(expected_loss))
        assert set(got["grads"]) == set(expected_grads)
        for name, grad in expected_grads.items():
            assert grad.abs().max() > 1e-3, f"{name}: reference gradient is too small to compare"
            torch.testing.assert_close(got["grads"][name], grad, atol=TOLERANCE, rtol=0, msg=f"{case}/{name}")


@pytest.mark.slow
def test_without_gather_the_gradient_differs(distributed_results, reference):
    """Negative control: the comparison above is sensitive to contrasting against the global batch."""
    _, expected_grads = reference["vanilla"]
    local = distributed_results[0]["cases"]["vanilla_local_only"]
    worst = max((local["grads"][name] - grad).abs().max().item() for name, grad in expected_grads.items())
    assert worst > 1e-2


@pytest.mark.slow
def test_plain_gather_keeps_the_local_graph_and_local_weights_are_refused(distributed_results):
    for rank, result in enumerate(distributed_results):
        # rank 0 holds one row of 0.0, rank 1 two rows of 1.0 (unequal, gathered in rank order)
        assert result["no_grad_gather"]["values"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        # d/dx of sum(row_index * x) over this process's own rows only
        expected = [[1.0, 1.0]] if rank == 0 else [[2.0, 2.0], [3.0, 3.0]]
        assert result["no_grad_gather"]["local_grad"] == expected
        message = result["local_weights_error"]
        assert "(4, 4), expected (8, 8)" in message and "GLOBAL" in message


TRAINER_SCRIPT = Path(__file__).parent / "scripts" / "trainer_two_processes.py"


@pytest.mark.slow
@pytest.mark.parametrize("path", ["cached", "towers", "gradcache"])
def test_trainer_on_two_processes_equals_one_process_on_the_global_batch(tmp_path, path):
    """`accelerate launch --multi_gpu --num_processes 2` with `use_cpu=True` really runs 2 CPU processes; 2 steps of
    per-device batch 4 train the same projections as one process with batch 8 (the global-batch gather). With
    `gradcache`, the 2 processes train the towers' last blocks in GradCache chunks of 3 rows under DDP."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    env = _clean_env(tmp_path / "hf_home")
    runs = {
        "two": [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                str(TRAINER_SCRIPT), str(tmp_path), "two", path, "4", *(["3"] if path == "gradcache" else [])],
        "one": [sys.executable, str(TRAINER_SCRIPT), str(tmp_path), "one", path, "8"],
    }
    for name, command in runs.items():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    two, one = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("two", "one"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    np.testing.assert_allclose(two["losses"], one["losses"], atol=TOLERANCE)
    for name, weight in one["projections"].items():
        np.testing.assert_allclose(two["projections"][name], weight, atol=TOLERANCE, err_msg=name)
