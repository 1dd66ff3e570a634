"""Benchmark text-tag self-distillation (TTD) against the plain contrastive loss, trained by the product.

    python benchmarks/ttd.py --smoke                 # tiny random towers + synthetic shapes, seconds
    python benchmarks/ttd.py --max-train 1000        # fashion-products (../shared)

Every run is the library's own path:

    featured = compute_features(split, model, processor, caption_column="title")   # datasets cache
    trainer = ClipNegTrainer(model, ClipNegTrainingArguments(ttd_weight=w, ...), train_dataset=train_subset,
                             eval_dataset=featured_test, processing_class=processor,
                             ttd_loss=TagSelfDistillationLoss(temperature=..., margin=..., detach_image=...))
    trainer.train()

The towers stay frozen (`tower_training="frozen"`), so the trainer trains the projections and the logit scale on cached
tower outputs: the caption features, and for the TTD term the vision tower's last-block output, from which only the
post-block layers (EfficientNet's head convolution, ViT's final norm) run on every step to give the spatial map TTD
reads. The contrastive-only run and the TTD run share the initial projections (`torch.manual_seed(seed)` before
re-initialising them), the seed and the batch order.

Metrics on the test split, from the trained model's own embeddings (`trainer.embed_dataset` for the images,
`hf_clipneg.encoding.encode_texts(..., project=True)` for texts):
- image->tag mAP: every image ranks the vocabulary of catalogue attribute values (``base_colour``,
  ``article_type``, ``gender``, ``usage``) embedded as "a photo of a {value}"; its relevant tags are its own values;
- text->image R@1 with each distinct title as query (hit = an image with exactly that title);
- single-tag bias (``single_tag_bias_from_embeddings``): for titles with >= 2 word tags, the share of the
  explainable variance of the title's scores over the test images that its best single tag explains (mean
  ratio, and share of titles with ratio >= 0.9). Lower = less single-tag bias.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _quality_lib as Q  # noqa: E402

from hf_clipneg.encoding import encode_texts  # noqa: E402
from hf_clipneg.losses.tag_bias import single_tag_bias_from_embeddings  # noqa: E402
from hf_clipneg.losses.tag_distillation import TagSelfDistillationLoss  # noqa: E402
from hf_clipneg.tags import extract_tags_batch  # noqa: E402

FASHION_ATTRIBUTES = ["base_colour", "article_type", "gender", "usage"]
SMOKE_ATTRIBUTES = ["colour", "shape", "texture", "size"]


def tag_table(titles: list[str], max_tags: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Distinct single-word tags of the titles, and per title the (T,) indices into them with a validity mask."""
    tags = extract_tags_batch(titles, max_tags=max_tags, phrases=False)
    vocab = sorted({t for row in tags for t in row})
    position = {t: i for i, t in enumerate(vocab)}
    width = max(1, max(len(r) for r in tags))
    index = torch.zeros(len(titles), width, dtype=torch.long)
    mask = torch.zeros(len(titles), width, dtype=torch.bool)
    for i, row in enumerate(tags):
        index[i, : len(row)] = torch.tensor([position[t] for t in row], dtype=torch.long)
        mask[i, : len(row)] = True
    return vocab, index, mask


def reset_projections(model: Any, seed: int) -> None:
    """The same initial projections and logit scale for every run of a seed."""
    torch.manual_seed(seed)
    model.visual_projection.reset_parameters()
    model.text_projection.reset_parameters()
    with torch.no_grad():
        model.logit_scale.fill_(model.config.logit_scale_init_value)


@torch.no_grad()
def evaluate(trainer: Any, test: Any, attributes: list[str], max_tags: int) -> dict[str, float]:
    from sklearn.metrics import average_precision_score

    model, tokenizer = trainer.model, trainer.processing_class.tokenizer
    images, _, _ = trainer.embed_dataset(trainer.eval_dataset)
    images = images.cpu()
    values = sorted({str(v) for name in attributes for v in test[name] if v is not None and str(v) not in ("", "NA")})
    prompts = encode_texts(model, tokenizer, [f"a photo of a {v.lower()}" for v in values], project=True).cpu()
    position = {v: i for i, v in enumerate(values)}
    truth = np.zeros((len(images), len(values)), dtype=bool)
    for name in attributes:
        for row, v in enumerate(test[name]):
            if v is not None and str(v) in position:
                truth[row, position[str(v)]] = True
    scores = (images @ prompts.T).numpy()
    aps = [average_precision_score(truth[i], scores[i]) for i in range(len(images)) if truth[i].any()]

    captions = test[Q.CAPTION]
    titles = sorted(set(captions))
    queries = encode_texts(model, tokenizer, titles, project=True).cpu()
    top = (queries @ images.T).argmax(dim=1).tolist()
    hits = [captions[j] == q for q, j in zip(titles, top)]

    vocab, index, mask = tag_table(titles, max_tags)
    tags = encode_texts(model, tokenizer, vocab, project=True).cpu()
    bias = single_tag_bias_from_embeddings(images, queries, tags[index], mask)
    return {"map": float(np.mean(aps)), "r1": float(np.mean(hits)), **bias}


def table(rows: list[tuple[str, dict]]) -> str:
    lines = [
        "| method | image->tag mAP | text->image R@1 | single-tag bias (best/all R^2) | share >= 0.9 | best-tag R^2 | all-tags R^2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {100 * m['map']:.1f} | {100 * m['r1']:.1f} | {m['single_tag_bias']:.3f} | "
            f"{100 * m['single_tag_share']:.1f}% | {m['best_tag_r2']:.3f} | {m['all_tags_r2']:.3f} |"
        )
    return "\n".join(lines)


def load_data(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, list[str], str]:
    """(model, processor, featured train subset, featured test, attributes, description); columns image, caption."""
    if args.smoke:
        from hf_clipneg.features import compute_features
        from hf_clipneg.data import make_synthetic_pairs
        from hf_clipneg.testing import build_tiny_dual_encoder

        model, processor = build_tiny_dual_encoder(projection_dim=16, image_size=32, seed=args.seed)
        train, test = (compute_features(make_synthetic_pairs(n, seed=args.seed + i, image_size=32), model, processor)
                       for i, n in enumerate((240, 120)))
        return model, processor, train, test, SMOKE_ATTRIBUTES, "smoke: tiny random ViT/BERT towers, procedural shapes"
    from hf_clipneg.towers import build_dual_encoder

    model, processor = build_dual_encoder(projection_dim=args.projection_dim, device="cpu")
    raw = Q.load_splits(args.data_dir)
    if args.max_train is not None and len(raw["train"]) > args.max_train:
        rows = np.sort(np.random.default_rng(args.seed).choice(len(raw["train"]), args.max_train, replace=False))
        raw["train"] = raw["train"].select(rows.tolist())
    featured = Q.featured_splits({s: raw[s] for s in ("train", "test")}, model, processor, "image", "title")
    train, test = (featured[s].rename_column("title", Q.CAPTION) for s in ("train", "test"))
    described = f"fashion-products: {len(train)} train pairs (random subset, seed {args.seed}), {len(test)} test images"
    return model, processor, train, test, FASHION_ATTRIBUTES, described


def run(args: argparse.Namespace) -> tuple[list[tuple[str, dict]], list[str]]:
    from transformers import PrinterCallback

    from hf_clipneg.training import ClipNegTrainer
    from hf_clipneg.training import ClipNegTrainingArguments

    model, processor, train, test, attributes, described = load_data(args)
    notes = [described]
    rows = []
    for name, weight in (("contrastive only", 0.0), (f"contrastive + {args.ttd_weight:g} * TTD", args.ttd_weight)):
        reset_projections(model, args.seed)
        ttd = TagSelfDistillationLoss(temperature=args.temperature, margin=args.margin, detach_image=args.detach_image)
        with tempfile.TemporaryDirectory() as output_dir:
            targs = ClipNegTrainingArguments(
                output_dir=output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=256, learning_rate=args.lr, weight_decay=1e-4,
                negative_strategy="vanilla", tower_training="frozen", ttd_weight=weight, ttd_max_tags=args.max_tags,
                seed=args.seed,
                report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True, use_cpu=True,
            )
            started = time.perf_counter()
            trainer = ClipNegTrainer(model, targs, train_dataset=train, eval_dataset=test, processing_class=processor,
                                     ttd_loss=ttd if weight > 0 else None)
            trainer.remove_callback(PrinterCallback)
            if not trainer.cached_tower_features:
                raise RuntimeError("ClipNegTrainer did not train on cached tower outputs; see its log for the reason.")
            prepared = time.perf_counter() - started
            output = trainer.train()
            trained = time.perf_counter() - started - prepared
            metrics = evaluate(trainer, test, attributes, args.max_tags)
        rows.append((name, metrics))
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        notes.append(
            f"{name}: {args.epochs} epochs x batch {args.batch_size}, {trainer.state.global_step} steps, trainer "
            f"set-up {prepared:.0f} s (cached tower outputs, read from the datasets cache when computed before), "
            f"training {trained:.0f} s; training loss {output.training_loss:.3f} (last logged {losses[-1]:.3f}); bias "
            f"measured on {metrics['num_captions']} titles ({metrics['skipped']} skipped)"
        )
    notes.append(f"TTD loss config: {ttd.get_config_dict()}")
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random towers + synthetic data (seconds)")
    parser.add_argument("--data-dir", type=Path, default=Q.DEFAULT_DATA)
    parser.add_argument("--max-train", type=int, default=2000, help="train pairs used (a random subset)")
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ttd-weight", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--detach-image", action="store_true", help="TTD trains only the text side")
    parser.add_argument("--max-tags", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a loaded machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.epochs, args.batch_size = min(args.epochs, 6), min(args.batch_size, 32)
    elif not Path(args.data_dir).is_dir():
        print(f"No data at {args.data_dir}; run with --smoke or pass --data-dir.", file=sys.stderr)
        return 1
    start = time.time()
    rows, notes = run(args)
    print(table(rows))
    print()
    for note in notes:
        print(f"- {note}")
    print(f"- total {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
