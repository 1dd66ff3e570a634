"""`hf-clipneg demo` and `hf-clipneg train`: run the pipeline on the demo data, or mine and train a dual encoder."""

from __future__ import annotations

from .parsing import parse
from .progress import set_progress_bars


def cmd_demo(argv: list[str]) -> int:
    """`hf-clipneg demo`: the whole pipeline on the embedded synthetic data; prints a results table."""
    from ..demo import DemoArguments, format_table, run_demo

    (args,) = parse([DemoArguments], argv, "hf-clipneg demo")
    set_progress_bars(not args.disable_tqdm)
    rows = run_demo(args)
    print(format_table(rows))
    return 0


def cmd_train(argv: list[str]) -> int:
    """`hf-clipneg train`: mine (if needed) and train a dual encoder; prints the final metrics."""
    from ..pipeline import ColumnArguments, DataArguments, ModelArguments, train
    from ..training import ClipNegTrainingArguments

    data_args, columns, model_args, training_args = parse(
        [DataArguments, ColumnArguments, ModelArguments, ClipNegTrainingArguments], argv, "hf-clipneg train"
    )
    set_progress_bars(not training_args.disable_tqdm)
    _, metrics = train(data_args, model_args, training_args, columns=columns)
    for key, value in sorted(metrics.items()):
        print(f"{key}\t{value:.4f}" if isinstance(value, float) else f"{key}\t{value}")
    return 0
