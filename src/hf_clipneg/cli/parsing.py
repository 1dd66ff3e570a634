"""Parsing of every subcommand's options: `HfArgumentParser` over dataclasses (flags, or one JSON/YAML file
holding them), with config files type-checked and the tower-dependent training defaults applied."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from transformers import HfArgumentParser

logger = logging.getLogger("hf_clipneg")


def parse(dataclass_types: Sequence[type], argv: list[str], prog: str) -> tuple[Any, ...]:
    """Parse `argv` into the dataclasses; a single `.json`/`.yaml`/`.yml` argument is read as a config file.

    Every value of a config file is checked against the type of its dataclass field first: a
    `ConfigTypeError` names each key whose value has the wrong type (`"false"` for a bool, `"sixty"` or
    `2.5` for an integer...) and the type it expects.

    With `ClipNegTrainingArguments` among the dataclasses, the learning rate and batch sizes the user does not
    give follow what trains (`tower_training`): see :func:`apply_tower_training_defaults`.
    """
    parser = HfArgumentParser(list(dataclass_types), prog=prog)
    _adjust_actions(parser)
    training = _training_arguments_type(dataclass_types)
    if training is not None:
        _describe_tower_dependent_options(parser)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        values = read_config_file(argv[0], dataclass_types)
        parsed = parser.parse_dict(values)
        given = set(values)
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
        given = _given_options(dataclass_types, argv, prog) if training is not None else set()
    if training is not None:
        for value in parsed:
            if isinstance(value, training):
                apply_tower_training_defaults(value, given)
    return tuple(parsed)


def _adjust_actions(parser: HfArgumentParser) -> None:
    """`--help` shows `(default: cluster)`, not `(default: NegativeStrategy.CLUSTER)`; the dataclasses turn the
    value back into their enum. Optional booleans (transformers' `--disable_tqdm`) also work as bare flags."""
    from enum import Enum

    from transformers.hf_argparser import string_to_bool

    for action in parser._actions:
        if isinstance(action.default, Enum):
            action.default = action.default.value
        if action.type is string_to_bool and action.nargs is None and action.option_strings:
            action.nargs, action.const = "?", True


def _training_arguments_type(dataclass_types: Sequence[type]) -> type | None:
    from ..training import ClipNegTrainingArguments

    return ClipNegTrainingArguments if any(issubclass(t, ClipNegTrainingArguments) for t in dataclass_types) else None


def _given_options(dataclass_types: Sequence[type], argv: list[str], prog: str) -> set[str]:
    """The option names `argv` gives explicitly (abbreviations and `--name=value` included): parsed again with
    every default suppressed, so that only given options reach the namespace."""
    import argparse

    parser = HfArgumentParser(list(dataclass_types), prog=prog)
    _adjust_actions(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(parser.parse_known_args(argv)[0]))


def _describe_tower_dependent_options(parser: HfArgumentParser) -> None:
    """Make the options whose default depends on `--tower_training` say so in `--help`."""
    from ..training.setup_checks import TOWER_TRAINING_DEFAULTS

    what = {
        "learning_rate": "Peak AdamW learning rate (linear decay)",
        "per_device_train_batch_size": "Training batch size per process (the contrastive batch: more in-batch negatives)",
        "per_device_eval_batch_size": "Evaluation and embedding batch size per process",
    }
    for action in parser._actions:
        if action.dest in what:
            defaults = ", ".join(f"{mode}: {values[action.dest]:g}" for mode, values in TOWER_TRAINING_DEFAULTS.items())
            action.help = (
                f"{what[action.dest]}. Default by --tower_training (what trains) — {defaults}. The new, randomly "
                "initialised projections need a large step (also beside the last tower blocks, as measured); whole "
                "pretrained towers a small one. "
                "(ClipNegTrainingArguments in Python keeps transformers' %(default)s.)"
            )


def apply_tower_training_defaults(args: Any, given: set[str]) -> dict[str, float | int]:
    """Set the learning rate and batch sizes the user did not give (`given`: the option names given) to the
    defaults of `args.tower_training` (`hf_clipneg.training.setup_checks.TOWER_TRAINING_DEFAULTS`) and log them.

    transformers' own defaults (5e-5, batch 8) are meant for fine-tuning whole networks: the new projections
    learn slowly at 5e-5 (README, The CLI). Returns the values set.

    Example:
        >>> from hf_clipneg.training import ClipNegTrainingArguments
        >>> args = ClipNegTrainingArguments(output_dir="/tmp/hf_clipneg_defaults", report_to="none", learning_rate=3e-4)
        >>> apply_tower_training_defaults(args, {"learning_rate"})  # tower_training="partial", the default
        {'per_device_train_batch_size': 256, 'per_device_eval_batch_size': 64}
        >>> args.learning_rate, args.per_device_train_batch_size
        (0.0003, 256)
    """
    from ..training.setup_checks import TOWER_TRAINING_DEFAULTS

    mode = getattr(args.tower_training, "value", args.tower_training)
    chosen = {name: value for name, value in TOWER_TRAINING_DEFAULTS[mode].items() if name not in given}
    for name, value in chosen.items():
        setattr(args, name, value)
    if chosen:
        listed = ", ".join(f"{name}={value:g}" for name, value in chosen.items())
        logger.info("tower_training=%s: %s (the defaults for what trains; pass the options to change them).", mode, listed)
    return chosen


def read_config_file(path: str, dataclass_types: Sequence[type]) -> dict[str, Any]:
    """Read a JSON/YAML config file into a dict whose values match the dataclasses' field types."""
    import json

    from .._config import ConfigTypeError, check_config_types

    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except ValueError as err:  # json.JSONDecodeError
        raise ConfigTypeError(f"The config file {path!r} is not valid JSON: {err}.") from err
    except Exception as err:  # yaml.YAMLError
        raise ConfigTypeError(f"The config file {path!r} is not valid YAML: {err}.") from err
    if not isinstance(values, dict):
        raise ConfigTypeError(
            f"The config file {path!r} must hold a mapping of option names to values, not a {type(values).__name__}."
        )
    check_config_types(dataclass_types, values, source=f"The config file {path!r}")
    return values
