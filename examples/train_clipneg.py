"""Train a dual encoder with hf_clipneg under Accelerate.

    accelerate launch --multi_gpu --num_processes 2 examples/train_clipneg.py \
        --train_data synthetic --output_dir outputs/clipneg --negative_strategy cluster_weighted \
        --num_train_epochs 2 --per_device_train_batch_size 32 --report_to none

On a machine without GPUs add `--use_cpu` (without it accelerate starts 2 processes that transformers treats as
one, and ClipNegTrainer stops with a LaunchMismatchError saying so).

Any flag of `DataArguments`, `ColumnArguments`, `ModelArguments` or `ClipNegTrainingArguments` works, or a
single JSON/YAML file holding them; `--mining_config rule.json` sets the mining rule for unmined data. The
learning rate and batch sizes not given follow `--tower_training` as in `hf-clipneg train` (partial, the default:
1e-3, batch 256; frozen: 1e-3, 64).
Add `--push_to_hub --hub_model_id you/name` to publish the model.
"""

import logging
import sys

from hf_clipneg.cli import parse
from hf_clipneg.pipeline import ColumnArguments, DataArguments, ModelArguments, train
from hf_clipneg.training import ClipNegTrainingArguments


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data_args, columns, model_args, training_args = parse(
        [DataArguments, ColumnArguments, ModelArguments, ClipNegTrainingArguments], sys.argv[1:], "train_clipneg.py"
    )
    trainer, metrics = train(data_args, model_args, training_args, columns=columns)
    if trainer.is_world_process_zero():
        logging.getLogger("train_clipneg").info("Final evaluation: %s", metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main()
