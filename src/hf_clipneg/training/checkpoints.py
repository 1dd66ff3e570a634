"""Which checkpoint a run may resume from: a killed process or a full disk leaves half-written ones."""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)


def last_complete_checkpoint(output_dir: str) -> str:
    """The newest checkpoint in `output_dir` that was completely written (see `checkpoint_problem`).

    Raises:
        ValueError: there is none; the message lists the incomplete ones.
    """
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted((int(n.split("-")[1]) for n in names if re.fullmatch(r"checkpoint-\d+", n)), reverse=True)
    skipped = []
    for step in steps:
        folder = os.path.join(output_dir, f"checkpoint-{step}")
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("Ignoring the incomplete checkpoint %s: %s", folder, problem)
        skipped.append(f"{folder} ({problem})")
    detail = f" Incomplete ones: {'; '.join(skipped)}." if skipped else ""
    raise ValueError(
        f"No complete checkpoint in {output_dir} to resume from.{detail} Delete the incomplete checkpoint "
        "folders and train from the start (resume_from_checkpoint=None), or pass the path of a complete one."
    )


def checkpoint_problem(folder: str) -> str | None:
    """Why the checkpoint `folder` cannot be resumed from (None when it is complete): its
    `trainer_state.json` must parse and its weights files must load (a disk that filled up while they
    were written leaves them empty or truncated)."""
    import json
    import zipfile

    from safetensors import SafetensorError, safe_open

    state_path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state_path):
        return "no trainer_state.json (it is written last)"
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (ValueError, UnicodeDecodeError) as err:
        return f"{state_path} is not valid JSON ({err}); it was not completely written"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{state_path} holds no trainer state"

    def unreadable(path: str) -> str | None:
        try:
            if path.endswith(".safetensors"):
                with safe_open(path, framework="pt") as handle:
                    handle.keys()
            else:
                with zipfile.ZipFile(path) as archive:  # torch.save files are zip archives
                    archive.namelist()
        except (SafetensorError, zipfile.BadZipFile, OSError) as err:
            return f"{path} cannot be read ({err}): it is truncated or corrupt"
        return None

    weights = []
    index_path = next(
        (os.path.join(folder, n) for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
         if os.path.isfile(os.path.join(folder, n))),
        None,
    )
    if index_path is not None:
        try:
            with open(index_path, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{index_path} is not a valid weights index ({err!r})"
        weights = [os.path.join(folder, shard) for shard in shards]
        missing = [path for path in weights if not os.path.isfile(path)]
        if missing:
            return f"the weights shard {missing[0]} is missing"
    else:
        weights = [os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin",
                                                     "adapter_model.safetensors")
                   if os.path.isfile(os.path.join(folder, n))]
        if not weights:
            if any(n.startswith(("pytorch_model_fsdp", "global_step")) for n in os.listdir(folder)):
                return None  # FSDP / DeepSpeed shards: written in their own formats, left to their loaders
            return "no model weights (model.safetensors)"
    others = [os.path.join(folder, n) for n in ("optimizer.pt", "scheduler.pt") if os.path.isfile(os.path.join(folder, n))]
    for path in weights + others:
        problem = unreadable(path)
        if problem:
            return problem
    return None
