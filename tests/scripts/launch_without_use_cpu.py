"""Run under `accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs and WITHOUT use_cpu: the
Trainer sets up one process while the launcher started two. Writes the error ClipNegTrainer raises per rank."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from datasets import Dataset
from PIL import Image

from hf_clipneg.testing import build_tiny_dual_encoder
from hf_clipneg.training import ClipNegTrainer
from hf_clipneg.training import ClipNegTrainingArguments


def main(output_dir: str) -> None:
    model, processor = build_tiny_dual_encoder()
    rows = Dataset.from_dict({"image": [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green", "white")],
                              "caption": ["a red square", "a blue square", "a green square", "a white square"]})
    args = ClipNegTrainingArguments(output_dir=os.path.join(output_dir, "run"), max_steps=1, report_to="none",
                                    per_device_train_batch_size=2, negative_strategy="vanilla", disable_tqdm=True)
    rank = os.environ.get("RANK", "0")
    try:
        ClipNegTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)
        result = {"error": None}
    except Exception as err:  # noqa: BLE001 - the message is what the test checks
        result = {"error": f"{type(err).__name__}: {err}"}
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
