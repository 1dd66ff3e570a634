"""`hf-clipneg`: thin command-line layer over the library. Every subcommand parses dataclasses with
`HfArgumentParser` (flags, or one JSON/YAML file holding them) and calls the library."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from transformers import HfArgumentParser

logger = logging.getLogger("hf_clipneg")


def parse(dataclass_types: Sequence[type], argv: list[str], prog: str) -> tuple[Any, ...]:
    """Parse `argv` into the dataclasses; a single `.json`/`.yaml`/`.yml` argument is read as a config file."""
    parser = HfArgumentParser(list(dataclass_types), prog=prog)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def cmd_demo(argv: list[str]) -> int:
    from .demo import DemoArguments, format_table, run_demo

    (args,) = parse([DemoArguments], argv, "hf-clipneg demo")
    rows = run_demo(args)
    print(format_table(rows))
    return 0


def cmd_train(argv: list[str]) -> int:
    from .mining import MiningConfig
    from .pipeline import DataArguments, ModelArguments, train
    from .training_args import ClipNegTrainingArguments

    data_args, model_args, mining_config, training_args = parse(
        [DataArguments, ModelArguments, MiningConfig, ClipNegTrainingArguments], argv, "hf-clipneg train"
    )
    _, metrics = train(data_args, model_args, mining_config, training_args)
    for key, value in sorted(metrics.items()):
        print(f"{key}\t{value:.4f}" if isinstance(value, float) else f"{key}\t{value}")
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "demo": (cmd_demo, "run the whole pipeline on the embedded synthetic data and print a results table"),
    "train": (cmd_train, "mine (if needed) and train a dual encoder with ClipNegTrainer"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-clipneg` console script."""
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


if __name__ == "__main__":
    sys.exit(main())
