"""`hf-clipneg`: thin command-line layer over the library. Every subcommand parses dataclasses with
`HfArgumentParser` (flags, or one JSON/YAML file holding them) and calls the library."""

from __future__ import annotations

import logging
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
    """
    parser = HfArgumentParser(list(dataclass_types), prog=prog)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        return parser.parse_dict(read_config_file(argv[0], dataclass_types))
    return parser.parse_args_into_dataclasses(args=argv)


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


def cmd_demo(argv: list[str]) -> int:
    from .demo import DemoArguments, format_table, run_demo

    (args,) = parse([DemoArguments], argv, "hf-clipneg demo")
    rows = run_demo(args)
    print(format_table(rows))
    return 0


def cmd_train(argv: list[str]) -> int:
    from .pipeline import ColumnArguments, DataArguments, ModelArguments, train
    from .training_args import ClipNegTrainingArguments

    data_args, columns, model_args, training_args = parse(
        [DataArguments, ColumnArguments, ModelArguments, ClipNegTrainingArguments], argv, "hf-clipneg train"
    )
    _, metrics = train(data_args, model_args, training_args, columns=columns)
    for key, value in sorted(metrics.items()):
        print(f"{key}\t{value:.4f}" if isinstance(value, float) else f"{key}\t{value}")
    return 0


@dataclass
class MineArguments:
    """Arguments of `hf-clipneg mine` (the mining rule itself is `MiningConfig`)."""

    output_dir: str | None = field(default=None, metadata={"help": "save_to_disk folder for the mined dataset."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push the mined dataset to."})
    private: bool = field(default=False)
    batch_size: int = field(default=64, metadata={"help": "Embedding batch size."})


@dataclass
class EvaluateArguments:
    """Arguments of `hf-clipneg evaluate`."""

    model_name_or_path: str = field(metadata={"help": "A trained dual encoder (folder or Hub id)."})
    batch_size: int = field(default=64)


@dataclass
class SearchArguments:
    """Arguments of `hf-clipneg search`: index the images of a dataset (or load an index) and query it."""

    model_name_or_path: str = field(metadata={"help": "A trained dual encoder (folder or Hub id)."})
    query: list[str] = field(default_factory=list, metadata={"help": "Text queries.", "nargs": "+"})
    k: int = field(default=5)
    index_path: str | None = field(default=None, metadata={"help": "Load this saved index instead of indexing data."})
    save_index: str | None = field(default=None, metadata={"help": "Save the built index here."})
    index_type: str = field(default="flat", metadata={"choices": ["flat", "ivf"]})


@dataclass
class InspectArguments:
    """Arguments of `hf-clipneg inspect`: PNGs of a mined dataset."""

    mined_dataset: str = field(metadata={"help": "A mined dataset: save_to_disk folder or Hub id."})
    output_dir: str = field(default="outputs/inspect")
    max_clusters: int = field(default=8)
    per_cluster: int = field(default=6)


def cmd_mine(argv: list[str]) -> int:
    from ._atomic import DATASET_MARKERS, atomic_directory, check_output_path
    from .hub import check_hub_repo_id, push_mined_dataset
    from .mining import MiningConfig, mine_negatives
    from .pipeline import DataArguments, ModelArguments, canonical_columns, load_data, load_model

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
    pairs, _ = load_data(data_args, config, seed=config.seed, load_eval=False)  # bad data fails before the model loads
    model, processor = load_model(model_args)
    config = canonical_columns(config)
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
    dataset = load_eval_data(data_args, columns)  # before the model: a missing split fails at once
    retriever = ClipNegRetriever.from_pretrained(eval_args.model_name_or_path)
    images = retriever.embed_images(dataset, batch_size=eval_args.batch_size)
    texts = retriever.embed_texts(list(dataset["caption"]), batch_size=eval_args.batch_size)
    groups = list(dataset["group"]) if "group" in dataset.column_names else groups_from_captions(dataset["caption"])
    for key, value in retrieval_metrics(images, texts, groups, groups).items():
        print(f"{key}\t{value:.4f}")
    return 0


def _search_split(data_args: Any, columns: Any) -> Any:
    """The rows `search` indexes: the evaluation data when there is some, else the training rows (said in the log)."""
    from .data import SplitNotFoundError
    from .pipeline import load_data, load_eval_data

    try:
        return load_eval_data(data_args, columns)
    except SplitNotFoundError as err:
        if data_args.eval_data is not None:
            raise  # evaluation data was named explicitly: a missing split is an error
        logger.info("Indexing the training rows of %s (split %r): %s", data_args.train_data, data_args.train_split, err)
    train, _ = load_data(data_args, columns, load_eval=False)
    return train


def cmd_search(argv: list[str]) -> int:
    from ._atomic import check_output_path
    from .pipeline import ColumnArguments, DataArguments
    from .retrieval import ClipNegRetriever

    search_args, data_args, columns = parse(
        [SearchArguments, DataArguments, ColumnArguments], argv, "hf-clipneg search"
    )
    if not search_args.query:
        raise SystemExit("hf-clipneg search: give at least one --query.")
    if search_args.save_index:
        check_output_path(search_args.save_index, [search_args.index_path], "--save_index")
    dataset = None if search_args.index_path else _search_split(data_args, columns)  # data errors before the model
    retriever = ClipNegRetriever.from_pretrained(search_args.model_name_or_path)
    if search_args.index_path:
        retriever.load_index(search_args.index_path)
    else:
        retriever.index_images(dataset, index_type=search_args.index_type)
    if search_args.save_index:
        retriever.save_index(search_args.save_index)
    for query, hits in zip(search_args.query, retriever.search(search_args.query, k=search_args.k)):
        print(f"query: {query}")
        for hit in hits:
            print(f"  {hit.rank}\t{hit.id}\t{hit.score:.4f}")
    return 0


def cmd_inspect(argv: list[str]) -> int:
    import os

    from .inspect import cluster_montage, weight_histogram

    (args,) = parse([InspectArguments], argv, "hf-clipneg inspect")
    mined = _load_mined(args.mined_dataset)
    os.makedirs(args.output_dir, exist_ok=True)
    montage = os.path.join(args.output_dir, "clusters.png")
    cluster_montage(mined, montage, max_clusters=args.max_clusters, per_cluster=args.per_cluster)
    histogram = os.path.join(args.output_dir, "negative_weights.png")
    summary = weight_histogram(mined, histogram)
    print(f"wrote {montage}\nwrote {histogram}\nweights: {summary}")
    return 0


def cmd_tldr(argv: list[str]) -> int:
    from ._atomic import atomic_directory, check_output_path
    from .text_heads import TldrArguments, tldr_main

    if any(arg in ("-h", "--help") for arg in argv) or (len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml"))):
        return tldr_main(argv)
    (args,) = parse([TldrArguments], argv, "hf-clipneg tldr")
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
    "inspect": (cmd_inspect, "write PNGs of a mined dataset: cluster montages, weight histogram"),
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
