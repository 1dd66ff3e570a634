"""Benchmark text-tag self-distillation (TTD) against the plain contrastive loss.

    python benchmarks/ttd.py --smoke            # tiny random towers + synthetic shapes, seconds
    python benchmarks/ttd.py                    # fashion-products (../shared), CPU minutes

Full mode, on ``../shared/data/fashion-products``:

1. The packaged towers (EfficientNet-Lite0 + all-MiniLM-L6-v2) are paired by
   ``hf_clipneg.towers.build_dual_encoder``. The towers stay frozen: their outputs are cached once
   (the vision ``pooler_output`` for the contrastive term, the 7x7 ``last_hidden_state`` map for
   TTD, the text ``pooler_output`` of titles, title tags and attribute prompts), and only
   ``visual_projection``/``text_projection``/``logit_scale`` are trained with symmetric InfoNCE
   (``WeightedContrastiveLoss``) on a subset of the train pairs, with or without
   ``ttd_weight * TagSelfDistillationLoss`` (same seed, batches and epochs).
2. Metrics on the test split:
   - image->tag mAP: every image ranks the vocabulary of catalogue attribute values
     (``base_colour``, ``article_type``, ``gender``, ``usage``) embedded as "a photo of a {value}";
     its relevant tags are its own four values; average precision per image, averaged;
   - text->image R@1 with each distinct title as query (hit = an image with exactly that title);
   - single-tag bias (``single_tag_bias_from_embeddings``): for titles with >= 2 word tags, the share
     of the explainable variance of the title's scores over the test images that its best single tag
     explains (mean ratio, and share of titles with ratio >= 0.9). Lower = less single-tag bias.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hf_clipneg.data import to_rgb
from hf_clipneg.losses import WeightedContrastiveLoss
from hf_clipneg.losses.tag_distillation import (
    TagSelfDistillationLoss,
    dense_image_embeddings,
    single_tag_bias_from_embeddings,
)
from hf_clipneg.tags import extract_tags_batch

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-products"
FASHION_ATTRIBUTES = ["base_colour", "article_type", "gender", "usage"]
SMOKE_ATTRIBUTES = ["colour", "shape", "texture", "size"]


# ----------------------------------------------------------------------------------------- towers


@torch.inference_mode()
def image_tower(model, processor, images, batch_size: int = 32, desc: str = "images") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen vision tower: pooled features (N, C) float32 and spatial last_hidden_state float16."""
    from tqdm.auto import tqdm

    pooled, hidden = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=len(images) < 200):
        batch = [to_rgb(v, row=start + i) for i, v in enumerate(images[start:start + batch_size])]
        pixels = processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
        out = model.vision_model(pixel_values=pixels)
        pooled.append(out.pooler_output.float())
        hidden.append(out.last_hidden_state.half())
    return torch.cat(pooled), torch.cat(hidden)


@torch.inference_mode()
def text_tower(model, processor, texts: list[str], batch_size: int = 128, desc: str = "texts") -> torch.Tensor:
    """Frozen text tower pooler_output (N, H) float32 (what get_text_features projects)."""
    from tqdm.auto import tqdm

    parts = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=len(texts) < 500):
        tokens = processor.tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=64,
                                     return_tensors="pt")
        out = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        parts.append(out.pooler_output.float())
    return torch.cat(parts)


def tag_table(titles: list[str], max_tags: int, phrases: bool) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Distinct tags, and per title the (T,) indices into them with a (N, T) validity mask."""
    tags = extract_tags_batch(titles, max_tags=max_tags, phrases=phrases)
    vocab = sorted({t for row in tags for t in row})
    position = {t: i for i, t in enumerate(vocab)}
    width = max(1, max(len(r) for r in tags))
    index = torch.zeros(len(titles), width, dtype=torch.long)
    mask = torch.zeros(len(titles), width, dtype=torch.bool)
    for i, row in enumerate(tags):
        index[i, :len(row)] = torch.tensor([position[t] for t in row], dtype=torch.long)
        mask[i, :len(row)] = True
    return vocab, index, mask


def prepare(model, processor, train: dict, test: dict, attributes: list[str], max_tags: int, cache: Path | None) -> dict:
    """All frozen tower outputs the runs need, cached as tensors only (safetensors + a JSON sidecar for the
    strings and numbers), so a planted cache file can hold data but never run code."""
    if cache is not None and cache.exists() and cache.with_suffix(".json").exists():
        return _load_cache(cache)
    started = time.time()
    data: dict = {}
    data["train_pooled"], data["train_hidden"] = image_tower(model, processor, train["image"], desc="train images")
    data["test_pooled"], data["test_hidden"] = image_tower(model, processor, test["image"], desc="test images")
    data["train_title"] = text_tower(model, processor, train["title"], desc="train titles")
    test_titles = sorted(set(test["title"]))
    data["test_titles"] = test_titles
    data["test_title_feats"] = text_tower(model, processor, test_titles, desc="test titles")
    vocab, index, mask = tag_table(train["title"], max_tags, phrases=True)
    data["train_tag_feats"] = text_tower(model, processor, vocab, desc="train tags")
    data["train_tag_index"], data["train_tag_mask"] = index, mask
    # bias measure: single-word tags of the test titles
    vocab, index, mask = tag_table(test_titles, max_tags, phrases=False)
    data["test_tag_feats"] = text_tower(model, processor, vocab, desc="test tags")
    data["test_tag_index"], data["test_tag_mask"] = index, mask
    values = sorted({str(v) for name in attributes for v in test[name] if v is not None and str(v) not in ("", "NA")})
    data["values"] = values
    data["value_feats"] = text_tower(model, processor, [f"a photo of a {v.lower()}" for v in values], desc="prompts")
    data["tower_seconds"] = time.time() - started
    if cache is not None:
        _save_cache(data, cache)
    return data


def _save_cache(data: dict, cache: Path) -> None:
    from safetensors.torch import save_file

    cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    save_file({k: v.contiguous() for k, v in data.items() if isinstance(v, torch.Tensor)}, str(cache))
    cache.with_suffix(".json").write_text(json.dumps({k: v for k, v in data.items() if not isinstance(v, torch.Tensor)}))


def _load_cache(cache: Path) -> dict:
    from safetensors.torch import load_file

    return {**load_file(str(cache)), **json.loads(cache.with_suffix(".json").read_text())}


# ----------------------------------------------------------------------------------------- training


def reset_projections(model, seed: int) -> None:
    torch.manual_seed(seed)
    for layer in (model.visual_projection, model.text_projection):
        torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(1 / 0.07)))


def train_projections(model, data: dict, epochs: int, batch_size: int, lr: float, ttd_weight: float,
                      ttd: TagSelfDistillationLoss, seed: int) -> dict:
    """Symmetric InfoNCE on cached features (+ ttd_weight * TTD), training only projections and logit scale."""
    reset_projections(model, seed)
    params = [*model.visual_projection.parameters(), *model.text_projection.parameters(), model.logit_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    contrastive = WeightedContrastiveLoss(gather_across_processes=False, max_logit_scale=100.0)
    pooled, hidden, titles = data["train_pooled"], data["train_hidden"], data["train_title"]
    tag_feats, tag_index, tag_mask = data["train_tag_feats"], data["train_tag_index"], data["train_tag_mask"]
    generator = torch.Generator().manual_seed(seed)
    n = len(pooled)
    log = {"clip": [], "ttd": []}
    started = time.time()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            image_embeds = model.visual_projection(pooled[idx])
            text_embeds = model.text_projection(titles[idx])
            loss = clip = contrastive(image_embeds, text_embeds, model.logit_scale)
            if ttd_weight > 0:
                patches = dense_image_embeddings(model, hidden[idx].float())
                with torch.no_grad():
                    tags = F.normalize(model.text_projection(tag_feats[tag_index[idx]]), dim=-1)
                term = ttd(patches, text_embeds, tags, tag_mask[idx])
                loss = clip + ttd_weight * term
                log["ttd"].append(term.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            log["clip"].append(clip.item())
    log["seconds"] = time.time() - started
    return log


# ----------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def evaluate(model, data: dict, test: dict, attributes: list[str], ttd: TagSelfDistillationLoss) -> dict:
    from sklearn.metrics import average_precision_score

    images = F.normalize(model.visual_projection(data["test_pooled"]), dim=-1)
    prompts = F.normalize(model.text_projection(data["value_feats"]), dim=-1)
    values = data["values"]
    truth = np.zeros((len(images), len(values)), dtype=bool)
    position = {v: i for i, v in enumerate(values)}
    for name in attributes:
        for row, v in enumerate(test[name]):
            if v is not None and str(v) in position:
                truth[row, position[str(v)]] = True
    scores = (images @ prompts.T).numpy()
    aps = [average_precision_score(truth[i], scores[i]) for i in range(len(images)) if truth[i].any()]

    titles = data["test_titles"]
    queries = F.normalize(model.text_projection(data["test_title_feats"]), dim=-1)
    top = (queries @ images.T).argmax(dim=1).tolist()
    hits = [test["title"][j] == q for q, j in zip(titles, top)]

    tags = model.text_projection(data["test_tag_feats"][data["test_tag_index"]])
    bias = single_tag_bias_from_embeddings(images, queries, tags, data["test_tag_mask"])
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


# ----------------------------------------------------------------------------------------- data


def load_fashion(data_dir: Path, split: str, limit: int | None, seed: int) -> dict:
    import pyarrow.parquet as pq

    columns = ["image", "title", *FASHION_ATTRIBUTES]
    table_ = pq.read_table(data_dir / f"{split}.parquet", columns=columns)
    if limit is not None and table_.num_rows > limit:
        rows = np.sort(np.random.default_rng(seed).choice(table_.num_rows, limit, replace=False))
        table_ = table_.take(rows)
    return {name: table_[name].to_pylist() for name in columns}


def load_smoke(num_train: int, num_test: int, seed: int) -> tuple[dict, dict]:
    from hf_clipneg.data import make_synthetic_pairs

    out = []
    for rows, s in ((num_train, seed), (num_test, seed + 1)):
        ds = make_synthetic_pairs(rows, seed=s, image_size=32)
        part = {name: ds[name] for name in ["image", *SMOKE_ATTRIBUTES]}
        part["title"] = ds["caption"]
        out.append(part)
    return out[0], out[1]


def run(args) -> tuple[list[tuple[str, dict]], list[str]]:
    notes = []
    if args.smoke:
        from hf_clipneg.testing import build_tiny_dual_encoder

        model, processor = build_tiny_dual_encoder(projection_dim=16, image_size=32, seed=args.seed)
        train, test = load_smoke(240, 120, args.seed)
        attributes, cache = SMOKE_ATTRIBUTES, None
        notes.append("smoke: tiny random ViT/BERT towers (frozen), procedural shapes (240 train / 120 test)")
    else:
        from hf_clipneg.towers import build_dual_encoder

        model, processor = build_dual_encoder(projection_dim=args.projection_dim, device="cpu")
        train = load_fashion(args.data_dir, "train", args.max_train, args.seed)
        test = load_fashion(args.data_dir, "test", None, args.seed)
        attributes = FASHION_ATTRIBUTES
        key = hashlib.sha1(f"{args.data_dir}|{args.max_train}|{args.seed}|{args.max_tags}|v1".encode()).hexdigest()[:10]
        cache = args.cache_dir / f"ttd_{key}.safetensors"
        notes.append(f"fashion-products: {len(train['title'])} train pairs (subset), {len(test['title'])} test images")
    model.eval().requires_grad_(False)
    for p in [*model.visual_projection.parameters(), *model.text_projection.parameters(), model.logit_scale]:
        p.requires_grad_(True)
    data = prepare(model, processor, train, test, attributes, args.max_tags, cache)
    notes.append(f"frozen tower outputs: {data['tower_seconds']:.0f} s when computed" + (f" (cache {cache})" if cache else ""))
    notes.append(f"vision spatial map {tuple(data['train_hidden'].shape[1:])}; {len(data['values'])} attribute values; "
                 f"{int(data['train_tag_mask'].sum())} train tags over {len(data['train_tag_feats'])} distinct")
    ttd = TagSelfDistillationLoss(temperature=args.temperature, margin=args.margin, detach_image=args.detach_image)
    rows = []
    for name, weight in (("contrastive only", 0.0), (f"contrastive + {args.ttd_weight:g} * TTD", args.ttd_weight)):
        log = train_projections(model, data, args.epochs, args.batch_size, args.lr, weight, ttd, args.seed)
        metrics = evaluate(model, data, test, attributes, ttd)
        rows.append((name, metrics))
        extra = f", final TTD term {np.mean(log['ttd'][-10:]):.4f} (first {np.mean(log['ttd'][:10]):.4f})" if log["ttd"] else ""
        notes.append(f"{name}: {args.epochs} epochs x batch {args.batch_size}, {log['seconds']:.0f} s, final InfoNCE "
                     f"{np.mean(log['clip'][-10:]):.3f}{extra}; bias measured on {metrics['num_captions']} titles "
                     f"({metrics['skipped']} skipped)")
    notes.append(f"TTD loss config: {ttd.get_config_dict()}")
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random towers + synthetic data (seconds)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("HF_CLIPNEG_CACHE", Path.home() / ".cache" / "hf_clipneg")) / "bench")
    parser.add_argument("--max-train", type=int, default=3000, help="train pairs used")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.epochs, args.batch_size = min(args.epochs, 6), min(args.batch_size, 32)
    elif not args.data_dir.is_dir():
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
