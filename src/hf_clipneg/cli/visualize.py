"""`hf-clipneg inspect`: PNGs of a mined dataset (clusters, the in-batch masked fraction, flagged pairs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .mine import load_mined
from .parsing import parse


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


def cmd_inspect(argv: list[str]) -> int:
    """`hf-clipneg inspect`: write clusters.png, negative_weights.png and flagged_pairs.png; print the summary."""
    import json
    import os

    from ..visualize import cluster_montage, flagged_pairs_grid, in_batch_summary, in_batch_weights_plot

    (args,) = parse([InspectArguments], argv, "hf-clipneg inspect")
    mined = load_mined(args.mined_dataset)
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
