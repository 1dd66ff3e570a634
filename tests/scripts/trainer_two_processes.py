"""Run by tests/test_gather_distributed.py: ClipNegTrainer for 2 SGD steps on tiny towers, on cached tower
features or with the towers (`gradcache`: the last blocks trained, in GradCache chunks when a chunk size is
given), under `accelerate launch` (2 processes) or alone. Writes the step losses and the
trained projections of process 0 to <output_dir>/<name>.json."""

from __future__ import annotations

import json
import sys

import torch

from accelerate import PartialState

from hf_clipneg.mining import MiningConfig, mine_negatives
from hf_clipneg.data import make_synthetic_pairs
from hf_clipneg.testing import build_tiny_dual_encoder
from hf_clipneg.training import ClipNegTrainer
from hf_clipneg.training import ClipNegTrainingArguments


def main(output_dir: str, name: str, path: str, per_device_batch: int, mini_batch_size: int | None) -> None:
    cached = path == "cached"
    model, processor = build_tiny_dual_encoder()
    if path == "gradcache":  # trained blocks: processes and chunks draw other dropout masks than one large batch
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    config = MiningConfig(evidence="image_cluster", n_image_clusters=4, n_text_clusters=4, negatives_per_row=2)
    mined, _ = mine_negatives(make_synthetic_pairs(num_rows=32, seed=0, image_size=32), config, model, processor)
    args = ClipNegTrainingArguments(
        output_dir=f"{output_dir}/{name}", per_device_train_batch_size=per_device_batch, max_steps=2, optim="sgd",
        learning_rate=0.5, max_grad_norm=0.0, weight_decay=0.0, lr_scheduler_type="constant",
        train_sampling_strategy="sequential", negative_strategy="cluster_weighted", cached_tower_features=cached,
        tower_training="partial" if path == "gradcache" else "frozen", mini_batch_size=mini_batch_size,
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
    )
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=mined, processing_class=processor)
    assert trainer.cached_tower_features is cached
    trainer.train()
    if PartialState().is_main_process:
        result = {
            "world_size": PartialState().num_processes,
            "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
            "projections": {n: trainer.model.state_dict()[n].tolist() for n in ("visual_projection.weight", "text_projection.weight")},
        }
        with open(f"{output_dir}/{name}.json", "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else None)
