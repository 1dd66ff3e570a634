"""`hf-clipneg`: thin command-line layer over the library. Every subcommand parses dataclasses with
`HfArgumentParser` (flags, or one JSON/YAML file holding them) and calls the library."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    from .training_args import ClipNegTrainingArguments

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
    from .setup_checks import TOWER_TRAINING_DEFAULTS

    what = {
        "learning_rate": "Peak AdamW learning rate (linear decay)",
        "per_device_train_batch_size": "Training batch size per process (the contrastive batch: more in-batch negatives)",
        "per_device_eval_batch_size": "Evaluation and embedding batch size per process",
    }
    for action in parser._actions:
        if action.dest in what:
            defaults = ", ".join(f"{mode}: {values[action.dest]:g}" for mode, values in TOWER_TRAINING_DEFAULTS.items())
            action.help = (
                f"{what[action.dest]}. Default by --tower_training (what trains) — {defaults}. Frozen towers train only "
                "the new projections and the logit scale, which need a large step; trainable tower weights a small one. "
                "(ClipNegTrainingArguments in Python keeps transformers' %(default)s.)"
            )


def apply_tower_training_defaults(args: Any, given: set[str]) -> dict[str, float | int]:
    """Set the learning rate and batch sizes the user did not give (`given`: the option names given) to the
    defaults of `args.tower_training` (`hf_clipneg.setup_checks.TOWER_TRAINING_DEFAULTS`) and log them.

    transformers' own defaults (5e-5, batch 8) are meant for fine-tuning whole networks: with frozen towers
    the new projections learn slowly (README, The CLI). Returns the values set.

    Example:
        >>> from hf_clipneg.training_args import ClipNegTrainingArguments
        >>> args = ClipNegTrainingArguments(output_dir="/tmp/hf_clipneg_defaults", report_to="none", learning_rate=3e-4)
        >>> apply_tower_training_defaults(args, {"learning_rate"})
        {'per_device_train_batch_size': 64, 'per_device_eval_batch_size': 64}
        >>> args.learning_rate, args.per_device_train_batch_size
        (0.0003, 64)
    """
    from .setup_checks import TOWER_TRAINING_DEFAULTS

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

    from ._config import ConfigTypeError, check_config_types

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


def set_progress_bars(enabled: bool) -> None:
    """Turn the progress bars of `datasets` (embedding, mining, loading), `huggingface_hub` (downloads, uploads)
    and transformers (loading and writing weights) on or off; the Trainer's own bar follows `--disable_tqdm`."""
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging as transformers_logging

    if enabled:
        datasets.enable_progress_bars()
        huggingface_hub.utils.enable_progress_bars()
        transformers_logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
        transformers_logging.disable_progress_bar()


def cmd_demo(argv: list[str]) -> int:
    from .demo import DemoArguments, format_table, run_demo

    (args,) = parse([DemoArguments], argv, "hf-clipneg demo")
    set_progress_bars(not args.disable_tqdm)
    rows = run_demo(args)
    print(format_table(rows))
    return 0


def cmd_train(argv: list[str]) -> int:
    from .pipeline import ColumnArguments, DataArguments, ModelArguments, train
    from .training_args import ClipNegTrainingArguments

    data_args, columns, model_args, training_args = parse(
        [DataArguments, ColumnArguments, ModelArguments, ClipNegTrainingArguments], argv, "hf-clipneg train"
    )
    set_progress_bars(not training_args.disable_tqdm)
    _, metrics = train(data_args, model_args, training_args, columns=columns)
    for key, value in sorted(metrics.items()):
        print(f"{key}\t{value:.4f}" if isinstance(value, float) else f"{key}\t{value}")
    return 0


@dataclass
class MineArguments:
    """Arguments of `hf-clipneg mine` (the mining rule itself is `MiningConfig`)."""

    output_dir: str | None = field(default=None, metadata={"help": "save_to_disk folder for the mined dataset."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push the mined dataset to."})
    private: bool = field(default=False, metadata={"help": "With --push_to_hub: create the dataset repo as private."})
    batch_size: int = field(default=64, metadata={"help": "Images and captions per tower forward pass when embedding."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars (embedding, mining, saving)."})


@dataclass
class EvaluateArguments:
    """Arguments of `hf-clipneg evaluate`."""

    model_name_or_path: str = field(metadata={"help": "A trained dual encoder (folder or Hub id)."})
    batch_size: int = field(default=64, metadata={"help": "Images and captions per forward pass when embedding."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


@dataclass
class SearchArguments:
    """Arguments of `hf-clipneg search`: index the images of a dataset (or load an index) and query it."""

    model_name_or_path: str = field(metadata={"help": "A trained dual encoder (folder or Hub id)."})
    query: list[str] = field(default_factory=list, metadata={"help": "Text queries.", "nargs": "+"})
    k: int = field(default=5, metadata={"help": "Hits per query."})
    index_path: str | None = field(default=None, metadata={"help": "Load this saved index instead of indexing data."})
    save_index: str | None = field(default=None, metadata={"help": "Save the built index here."})
    index_type: str = field(
        default="flat",
        metadata={"help": "flat: exact search; ivf: approximate, faster on large collections.", "choices": ["flat", "ivf"]},
    )
    show_columns: str | None = field(
        default=None,
        metadata={
            "help": "Comma list of dataset columns printed with every hit (e.g. 'caption,product_id'; after loading, "
            "the image and caption columns are called 'image' and 'caption'). Default: the caption, and the image "
            "path when the images are files."
        },
    )
    output: str = field(
        default="text",
        metadata={"help": "text: a readable list per query; json: one JSON document (for scripts).", "choices": ["text", "json"]},
    )
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass when indexing."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


@dataclass
class InspectArguments:
    """Arguments of `hf-clipneg inspect`: PNGs of a mined dataset."""

    mined_dataset: str = field(metadata={"help": "A mined dataset: save_to_disk folder or Hub id."})
    output_dir: str = field(default="outputs/inspect", metadata={"help": "Folder the PNGs are written to."})
    max_clusters: int = field(default=8, metadata={"help": "clusters.png: how many clusters (largest first)."})
    per_cluster: int = field(default=6, metadata={"help": "clusters.png: sample images per cluster."})
    batch_size: int = field(
        default=64,
        metadata={"help": "Your training batch size (per_device_train_batch_size x processes): the in-batch masked "
                  "fraction is measured on random batches of this size."},
    )
    num_batches: int = field(default=200, metadata={"help": "Random batches the masked fraction is measured on."})
    flagged_pairs: int = field(default=12, metadata={"help": "flagged_pairs.png: example flagged pairs shown."})
    strategy: str | None = field(
        default=None,
        metadata={"help": "The negative strategy to show (default: the dataset's).",
                  "choices": ["vanilla", "random", "cluster", "cluster_weighted"]},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random batches and the examples shown."})


def cmd_mine(argv: list[str]) -> int:
    from ._atomic import DATASET_MARKERS, atomic_directory, check_output_path
    from .hub import check_hub_repo_id, push_mined_dataset
    from .mining import MiningConfig, mine_negatives
    from .pipeline import DataArguments, ModelArguments, canonical_columns, load_data, load_model
    from .towers import without_log_messages

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


def _load_mined(source: str) -> Any:
    import os

    from datasets import load_from_disk

    if os.path.isdir(source):
        return load_from_disk(source)
    from .hub import load_mined_dataset

    return load_mined_dataset(source, split="train")


def cmd_evaluate(argv: list[str]) -> int:
    from .metrics import groups_from_captions, retrieval_metrics
    from .pipeline import ColumnArguments, DataArguments, load_eval_data
    from .retrieval import ClipNegRetriever

    eval_args, data_args, columns = parse(
        [EvaluateArguments, DataArguments, ColumnArguments], argv, "hf-clipneg evaluate"
    )
    set_progress_bars(not eval_args.disable_tqdm)
    dataset = load_eval_data(data_args, columns)  # before the model: a missing split fails at once
    retriever = ClipNegRetriever.from_pretrained(eval_args.model_name_or_path)
    show = not eval_args.disable_tqdm
    images = retriever.embed_images(dataset, batch_size=eval_args.batch_size, show_progress=show)
    texts = retriever.embed_texts(list(dataset["caption"]), batch_size=eval_args.batch_size, show_progress=show)
    groups = list(dataset["group"]) if "group" in dataset.column_names else groups_from_captions(dataset["caption"])
    for key, value in retrieval_metrics(images, texts, groups, groups).items():
        print(f"{key}\t{value:.4f}")
    return 0


def _search_split(data_args: Any, columns: Any) -> tuple[Any, str]:
    """The rows `search` indexes and where they come from: the evaluation data when there is some, else the
    training rows (said in the log)."""
    from .data import SplitNotFoundError
    from .pipeline import SYNTHETIC, load_data, load_eval_data

    try:
        dataset = load_eval_data(data_args, columns)
        source = data_args.eval_data if data_args.eval_data is not None else data_args.train_data
        split = data_args.eval_split if source != SYNTHETIC else "validation"
        return dataset, f"{source} (split {split!r})"
    except SplitNotFoundError as err:
        if data_args.eval_data is not None:
            raise  # evaluation data was named explicitly: a missing split is an error
        logger.info("Indexing the training rows of %s (split %r): %s", data_args.train_data, data_args.train_split, err)
    train, _ = load_data(data_args, columns, load_eval=False)
    return train, f"{data_args.train_data} (split {data_args.train_split!r})"


def _display_columns(dataset: Any, wanted: str | None) -> list[str]:
    """The columns `search` prints with every hit: `--show_columns`, else the caption and the image path."""
    if wanted:
        names = [name.strip() for name in wanted.split(",") if name.strip()]
        missing = [name for name in names if name not in dataset.column_names]
        if missing:
            raise SystemExit(
                f"hf-clipneg search: --show_columns names {missing}, which the indexed data does not have; its columns "
                f"are {dataset.column_names} (the image and caption columns are renamed to 'image' and 'caption')."
            )
        return names
    return [name for name in ("caption", "image") if name in dataset.column_names]


def _hit_fields(dataset: Any, row: int, names: list[str]) -> dict[str, Any]:
    """Printable values of `names` for one row; an image column gives its file path (None for embedded bytes)."""
    record = dataset[row]
    fields: dict[str, Any] = {}
    for name in names:
        value = record[name]
        if isinstance(value, dict) and "path" in value and "bytes" in value:  # an undecoded image
            if not value["path"]:
                continue  # embedded image bytes: no file to name
            value = value["path"]
        elif not isinstance(value, (str, int, float, bool, type(None))):
            value = str(value)
        fields[name] = value
    return fields


def cmd_search(argv: list[str]) -> int:
    import json

    from ._atomic import check_output_path
    from .images import without_image_decoding
    from .pipeline import ColumnArguments, DataArguments
    from .retrieval import ClipNegRetriever

    search_args, data_args, columns = parse(
        [SearchArguments, DataArguments, ColumnArguments], argv, "hf-clipneg search"
    )
    if not search_args.query:
        raise SystemExit("hf-clipneg search: give at least one --query.")
    if search_args.save_index:
        check_output_path(search_args.save_index, [search_args.index_path], "--save_index")
    set_progress_bars(not search_args.disable_tqdm)
    # Data errors come before the model loads. With a saved index, data is read only to show --show_columns.
    dataset, source = (None, None)
    if not search_args.index_path or search_args.show_columns:
        dataset, source = _search_split(data_args, columns)
    names = _display_columns(dataset, search_args.show_columns) if dataset is not None else []
    retriever = ClipNegRetriever.from_pretrained(search_args.model_name_or_path)
    if search_args.index_path:
        retriever.load_index(search_args.index_path)
        if dataset is not None and len(dataset) != retriever.indexed_size("images"):
            raise SystemExit(
                f"hf-clipneg search: the index {search_args.index_path} holds {retriever.indexed_size('images')} images "
                f"but {source} has {len(dataset)} rows, so --show_columns cannot be matched to hits; pass the data the "
                "index was built from."
            )
        source = f"{search_args.index_path} (a saved index{'; columns from ' + source if source else ''})"
    else:
        retriever.index_images(dataset, index_type=search_args.index_type, batch_size=search_args.batch_size,
                               show_progress=not search_args.disable_tqdm)
    if search_args.save_index:
        retriever.save_index(search_args.save_index)
    rows = without_image_decoding(dataset, "image") if dataset is not None and "image" in names else dataset
    results = []
    for query, hits in zip(search_args.query, retriever.search(search_args.query, k=search_args.k)):
        entries = []
        for hit in hits:
            entry = hit.to_dict()
            if rows is not None and isinstance(hit.id, int):
                entry.update(_hit_fields(rows, hit.id, names))
            entries.append(entry)
        results.append({"query": query, "hits": entries})
    indexed = {"source": source, "images": retriever.indexed_size("images")}
    if search_args.output == "json":
        print(json.dumps({"indexed": indexed, "k": search_args.k, "results": results}, indent=2, ensure_ascii=False))
        return 0
    print(f"indexed: {indexed['images']} images of {source}; a hit's id is its row in that split")
    for result in results:
        print(f"query: {result['query']}")
        for entry in result["hits"]:
            extra = "  ".join(f"{name}: {entry[name]}" for name in names if name in entry)
            print(f"  {entry['rank']:>3}  score {entry['score']:.4f}  row {entry['id']}  {extra}".rstrip())
    return 0


def cmd_inspect(argv: list[str]) -> int:
    import json
    import os

    from .inspect import cluster_montage, flagged_pairs_grid, in_batch_summary, in_batch_weights_plot

    (args,) = parse([InspectArguments], argv, "hf-clipneg inspect")
    mined = _load_mined(args.mined_dataset)
    os.makedirs(args.output_dir, exist_ok=True)
    montage = os.path.join(args.output_dir, "clusters.png")
    cluster_montage(mined, montage, max_clusters=args.max_clusters, per_cluster=args.per_cluster)
    summary = in_batch_summary(mined, batch_size=args.batch_size, num_batches=args.num_batches, strategy=args.strategy,
                               max_examples=args.flagged_pairs, seed=args.seed)
    weights_png = os.path.join(args.output_dir, "negative_weights.png")
    in_batch_weights_plot(summary, weights_png)
    pairs_png = os.path.join(args.output_dir, "flagged_pairs.png")
    flagged_pairs_grid(mined, summary, pairs_png)
    print(f"wrote {montage}\nwrote {weights_png}\nwrote {pairs_png}\nin-batch: {json.dumps(summary.to_dict())}")
    return 0


def _check_tldr_inputs(args: Any) -> None:
    """Fail on bad `tldr` inputs before any model loads: the class names, the descriptions file, a saved
    projector's folder, and the image/caption columns of --paired_data."""
    from .text_heads import _check_class_names, _load_pairs, _split_list, read_descriptions

    class_names = _check_class_names(_split_list(args.class_names, ","))
    if args.descriptions_file:
        read_descriptions(args.descriptions_file, class_names)
    if args.projector_path and not os.path.exists(args.projector_path):
        raise FileNotFoundError(f"--projector_path {args.projector_path!r} does not exist.")
    if args.paired_data:
        _load_pairs(args)  # names a missing --image_column / --caption_column and the columns that exist


def cmd_tldr(argv: list[str]) -> int:
    from ._atomic import atomic_directory, check_output_path
    from .text_heads import TldrArguments, tldr_main

    if any(arg in ("-h", "--help") for arg in argv) or (len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml"))):
        return tldr_main(argv)
    (args,) = parse([TldrArguments], argv, "hf-clipneg tldr")
    _check_tldr_inputs(args)  # the data's columns, class names and files, before the model loads (~12 s)
    check_output_path(args.output_dir, [args.model_name_or_path, args.paired_data, args.descriptions_file, args.projector_path],
                      "--output_dir", replace_markers=("config.json",))
    # The head is written to a temporary sibling first (the last --output_dir wins), then swapped in.
    with atomic_directory(args.output_dir) as tmp:
        code = tldr_main([*argv, "--output_dir", tmp])
        if code != 0:
            raise SystemExit(code)
    return code


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
