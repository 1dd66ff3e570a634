"""`hf-clipneg mine`: add cluster ids, mined negatives and weights to a dataset, then save and/or push it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .parsing import parse
from .progress import set_progress_bars


@dataclass
class MineArguments:
    """Arguments of `hf-clipneg mine` (the mining rule itself is `MiningConfig`)."""

    output_dir: str | None = field(default=None, metadata={"help": "save_to_disk folder for the mined dataset."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push the mined dataset to."})
    private: bool = field(default=False, metadata={"help": "With --push_to_hub: create the dataset repo as private."})
    batch_size: int = field(default=64, metadata={"help": "Images and captions per tower forward pass when embedding."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars (embedding, mining, saving)."})


def cmd_mine(argv: list[str]) -> int:
    """`hf-clipneg mine`: the data and the model are checked and loaded, the dataset mined, saved and/or pushed."""
    from .._atomic import DATASET_MARKERS, atomic_directory, check_output_path
    from ..hub import check_hub_repo_id, push_mined_dataset
    from ..mining import MiningConfig, mine_negatives
    from ..pipeline import DataArguments, ModelArguments, canonical_columns, load_data, load_model
    from ..towers import without_log_messages

    mine_args, data_args, model_args, config = parse(
        [MineArguments, DataArguments, ModelArguments, MiningConfig], argv, "hf-clipneg mine"
    )
    if mine_args.output_dir is None and mine_args.push_to_hub is None:
        raise SystemExit("hf-clipneg mine: give --output_dir and/or --push_to_hub, or the result is lost.")
    if mine_args.output_dir:
        check_output_path(mine_args.output_dir, [data_args.train_data, data_args.eval_data], "--output_dir",
                          replace_markers=DATASET_MARKERS)
    if mine_args.push_to_hub:
        check_hub_repo_id(mine_args.push_to_hub, "--push_to_hub")
    set_progress_bars(not mine_args.disable_tqdm)
    pairs, _ = load_data(data_args, config, seed=config.seed, load_eval=False)  # bad data fails before the model loads
    model, processor = load_model(model_args)
    config = canonical_columns(config)
    # The statistics are this command's result: printed once below, not also logged by mine_negatives.
    with without_log_messages("hf_clipneg.mining.mine", "Mining statistics:"):
        mined, stats = mine_negatives(
            pairs, config, model=model, processor=processor, batch_size=mine_args.batch_size,
            on_bad_image=data_args.on_bad_image,
        )
    print(stats.to_markdown())
    if mine_args.output_dir:
        with atomic_directory(mine_args.output_dir) as tmp:  # an earlier result survives a failed save
            mined.save_to_disk(tmp)
        print(f"saved to {mine_args.output_dir}")
    if mine_args.push_to_hub:
        url = push_mined_dataset(
            mined, mine_args.push_to_hub, MiningConfig.from_dataset(mined).to_dict(), stats=stats,
            private=mine_args.private, source=data_args.train_data,
        )
        print(f"pushed to {url}")
    return 0


def load_mined(source: str) -> Any:
    """A mined dataset from a `save_to_disk` folder, else from the Hub (its train split)."""
    from datasets import load_from_disk

    if os.path.isdir(source):
        return load_from_disk(source)
    from ..hub import load_mined_dataset

    return load_mined_dataset(source, split="train")
