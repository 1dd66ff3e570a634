"""`hf-clipneg search`: index images with a trained model (or load an index) and search them with text."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .parsing import parse
from .progress import set_progress_bars

logger = logging.getLogger("hf_clipneg")


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


def _search_split(data_args: Any, columns: Any) -> tuple[Any, str]:
    """The rows `search` indexes and where they come from: the evaluation data when there is some, else the
    training rows (said in the log)."""
    from ..data import SplitNotFoundError
    from ..pipeline import SYNTHETIC, load_data, load_eval_data

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
    """`hf-clipneg search`: index (or load) the images, run the text queries, print the hits (text or JSON)."""
    import json

    from .._atomic import check_output_path
    from ..data import without_image_decoding
    from ..pipeline import ColumnArguments, DataArguments
    from ..retrieval import ClipNegRetriever

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
