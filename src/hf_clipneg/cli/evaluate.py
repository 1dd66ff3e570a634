"""`hf-clipneg evaluate`: retrieval R@K and median rank of a trained model on a dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

from .parsing import parse
from .progress import set_progress_bars


@dataclass
class EvaluateArguments:
    """Arguments of `hf-clipneg evaluate`."""

    model_name_or_path: str = field(metadata={"help": "A trained dual encoder (folder or Hub id)."})
    batch_size: int = field(default=64, metadata={"help": "Images and captions per forward pass when embedding."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


def cmd_evaluate(argv: list[str]) -> int:
    """`hf-clipneg evaluate`: prints retrieval R@K and median rank of a trained model on the evaluation data."""
    from ..metrics import groups_from_captions, retrieval_metrics
    from ..pipeline import ColumnArguments, DataArguments, load_eval_data
    from ..retrieval import ClipNegRetriever

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
