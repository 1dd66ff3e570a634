"""A small, fully seeded training (or embedding) run that tests/test_interruption.py kills with SIGKILL.

    python tests/scripts/train_until_killed.py train OUTPUT_DIR [--slow SECONDS] [--resume]
    python tests/scripts/train_until_killed.py embed DATASET_DIR [--slow SECONDS]

`train`: tiny dual encoder, synthetic data mined with the cluster rule, `ClipNegTrainer` with
checkpoints every `SAVE_STEPS` steps; writes OUTPUT_DIR/result.json (per-step losses and the final
evaluation) when it finishes. `--slow` sleeps after every step so the test can kill it mid-epoch.
`embed`: `compute_features` on the `save_to_disk` dataset in DATASET_DIR (datasets caches the result
next to it); prints "EMBEDDING" when the first batch starts, sleeps `--slow` seconds per batch.
The test imports `run_training` and `embed` to make the uninterrupted reference runs in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SEED = 0
MAX_STEPS = 8
SAVE_STEPS = 2
BATCH = 4
TRAIN_ROWS = 24  # 6 steps per epoch: the kill lands mid-epoch


def build_data():
    from hf_clipneg.mining import MiningConfig, mine_negatives
    from hf_clipneg.data import make_synthetic_pairs
    from hf_clipneg.testing import build_tiny_dual_encoder

    model, processor = build_tiny_dual_encoder(seed=SEED)
    train = make_synthetic_pairs(num_rows=TRAIN_ROWS, seed=SEED, image_size=32)
    evaluation = make_synthetic_pairs(num_rows=16, seed=SEED + 1, image_size=32)
    config = MiningConfig(n_image_clusters=4, n_text_clusters=4, negatives_per_row=2, seed=SEED)
    mined, _ = mine_negatives(train, config, model, processor, device="cpu", batch_size=16)
    return model, processor, mined, evaluation


def run_training(output_dir: str, resume: bool = False, slow: float = 0.0) -> dict:
    """Train (or resume) and return {"losses": {step: loss}, "eval": metrics, "resumed_from": step}."""
    from transformers import TrainerCallback, set_seed

    from hf_clipneg.training import ClipNegTrainer
    from hf_clipneg.training import ClipNegTrainingArguments

    set_seed(SEED)
    model, processor, mined, evaluation = build_data()
    set_seed(SEED)

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if slow:
                time.sleep(slow)

    args = ClipNegTrainingArguments(
        output_dir=output_dir,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=16,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=1,
        seed=SEED,
        data_seed=SEED,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=mined, eval_dataset=evaluation,
                             processing_class=processor, callbacks=[Slow()])
    resumed_from = 0
    if resume:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir)
        resumed_from = int(last.rsplit("-", 1)[1]) if last else 0
    trainer.train(resume_from_checkpoint=True if resume else None)
    metrics = trainer.evaluate()
    losses = {int(log["step"]): float(log["loss"]) for log in trainer.state.log_history if "loss" in log}
    result = {"losses": losses, "eval": {k: v for k, v in metrics.items() if "R@" in k or k.endswith("_loss")},
              "resumed_from": resumed_from, "global_step": trainer.state.global_step}
    with open(os.path.join(output_dir, "result.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    return result


def embed(dataset_dir: str, slow: float = 0.0):
    """compute_features on the dataset saved in `dataset_dir` (a fresh load, so datasets caches on disk)."""
    from datasets import load_from_disk

    from hf_clipneg import features
    from hf_clipneg.testing import build_tiny_dual_encoder

    if slow:
        original = features._Embedder.__call__

        def slowed(self, batch, indices):
            print("EMBEDDING", indices[0], flush=True)
            time.sleep(slow)
            return original(self, batch, indices)

        features._Embedder.__call__ = slowed
    model, processor = build_tiny_dual_encoder(seed=SEED)
    dataset = load_from_disk(dataset_dir)
    return features.compute_features(dataset, model, processor, device="cpu", batch_size=4)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "embed"])
    parser.add_argument("path")
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "train":
        run_training(args.path, resume=args.resume, slow=args.slow)
    else:
        embed(args.path, slow=args.slow)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
