"""Run by tests/test_real_world_data.py under `accelerate launch` (2 processes): 6 rows in per-device batches
of 4, so accelerate pads process 1's batch with repeated rows. For every strategy, on cached tower features
and with the towers, records the gathered row indices and the in-batch negative weights the loss receives.
Writes <output_dir>/repeated.json from process 0."""

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


class RecordingTrainer(ClipNegTrainer):
    """Keeps the gathered row indices and the weights handed to the loss of every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[dict] = []
        loss_fn = self.loss_fn

        def recording_loss(image_embeds, text_embeds, logit_scale, negative_weights=None, **kw):
            size = negative_weights.shape[0] if negative_weights is not None else image_embeds.shape[0] * 2
            weights = negative_weights if negative_weights is not None else torch.ones(size, size)
            self.steps[-1]["weights"] = weights.tolist()
            return loss_fn(image_embeds, text_embeds, logit_scale, negative_weights=negative_weights, **kw)

        self.loss_fn = recording_loss

    def _global_metadata(self, meta):
        gathered = super()._global_metadata(meta)
        self.steps.append({"row_index": gathered["row_index"].tolist()})
        return gathered


def main(output_dir: str) -> None:
    model, processor = build_tiny_dual_encoder()
    config = MiningConfig(strategy="cluster", evidence="image_cluster", n_image_clusters=2, n_text_clusters=2,
                          negatives_per_row=1)
    mined, _ = mine_negatives(make_synthetic_pairs(num_rows=6, seed=0, image_size=32), config, model, processor)
    results = {}
    for cached in (True, False):
        for strategy in ("vanilla", "random", "cluster", "cluster_weighted"):
            model, processor = build_tiny_dual_encoder()
            args = ClipNegTrainingArguments(
                output_dir=f"{output_dir}/{strategy}_{cached}", per_device_train_batch_size=4, max_steps=1,
                train_sampling_strategy="sequential", negative_strategy=strategy, cached_tower_features=cached,
                report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
            )
            trainer = RecordingTrainer(model=model, args=args, train_dataset=mined, processing_class=processor)
            trainer.train()
            results[f"{strategy}_{'cached' if cached else 'towers'}"] = trainer.steps
    if PartialState().is_main_process:
        with open(f"{output_dir}/repeated.json", "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
