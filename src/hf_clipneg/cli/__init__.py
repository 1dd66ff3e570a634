"""`hf-clipneg`: thin command-line layer over the library. Every subcommand parses dataclasses with
`HfArgumentParser` (flags, or one JSON/YAML file holding them) and calls the library.

One module a subcommand (or a pair of close ones): `train` (demo, train), `mine`, `evaluate`, `search`,
`visualize` (inspect), `tldr`; `parsing` and `progress` serve them all. `tldr` loads on first use (it needs
torch), so `hf-clipneg --help` stays fast.

Example:
    >>> main(["--help"])  # doctest: +ELLIPSIS
    usage: hf-clipneg <command> ...
    0
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .evaluate import EvaluateArguments, cmd_evaluate
from .mine import MineArguments, cmd_mine, load_mined
from .parsing import apply_tower_training_defaults, parse, read_config_file
from .progress import set_progress_bars
from .search import SearchArguments, cmd_search
from .train import cmd_demo, cmd_train
from .visualize import InspectArguments, cmd_inspect

__all__ = [
    "COMMANDS",
    "EvaluateArguments",
    "InspectArguments",
    "MineArguments",
    "SearchArguments",
    "apply_tower_training_defaults",
    "load_mined",
    "main",
    "parse",
    "read_config_file",
    "set_progress_bars",
]


def cmd_tldr(argv: list[str]) -> int:
    from .tldr import tldr_main

    return tldr_main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "demo": (cmd_demo, "run the whole pipeline on the embedded synthetic data and print a results table"),
    "mine": (cmd_mine, "add cluster ids, mined negatives and weights to a dataset (save and/or push)"),
    "train": (cmd_train, "mine (if needed) and train a dual encoder with ClipNegTrainer"),
    "evaluate": (cmd_evaluate, "retrieval R@K and median rank of a trained model on a dataset"),
    "search": (cmd_search, "index images with a trained model and search them with text"),
    "inspect": (cmd_inspect, "write PNGs of a mined dataset: clusters, in-batch masked fraction, flagged pairs"),
    "tldr": (cmd_tldr, "train a classifier head from text only (TLDR) on a trained dual encoder"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-clipneg` console script: run the subcommand `argv[0]` and return its exit status
    (2 for no or an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: hf-clipneg <command> [--help] [options | config.json | config.yaml]", "", "commands:"]
        lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("\n".join(lines))
        return 0 if argv else 2
    command = argv[0]
    if command not in COMMANDS:
        print(f"hf-clipneg: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return COMMANDS[command][0](argv[1:])
