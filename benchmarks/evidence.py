"""How precise is label-free duplicate evidence? Precision and recall of every pair rule against true categories.

    python benchmarks/evidence.py            # fashion-products train split (../shared), cached tower features
    python benchmarks/evidence.py --smoke    # synthetic data, tiny random towers, seconds (CI)

Over all pairs of distinct training rows: `flagged` = share of pairs a rule flags as duplicates, `precision` =
share of flagged pairs whose products share the category (`--category-columns`, default article_type +
base_colour + gender), `recall` = share of same-category pairs flagged. Masking a flagged pair helps only if it
is a real duplicate; `benchmarks/quality.py` measures what masking does to retrieval. Features: the packaged
frozen towers through `hf_clipneg.features.compute_features` (its datasets cache, shared with quality.py), plus a colour histogram of each image (8 hues x 3 saturations x 3
values over non-white pixels, square-rooted) as a cheap colour-aware image signal, and TF-IDF vectors of the
caption's tags (`hf_clipneg.tags.extract_tags`).
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _quality_lib as Q  # noqa: E402

logger = logging.getLogger("evidence")


def colour_histograms(images) -> torch.Tensor:
    """(N, 72) L2-normalised square-rooted HSV histograms of the non-white pixels of each image."""
    from hf_clipneg.data import to_rgb

    out = []
    for image in images:
        rgb = to_rgb(image)
        rgb.draft("RGB", (64, 64))
        small = rgb.resize((32, 32))
        pixels = np.asarray(small).reshape(-1, 3) / 255.0
        hsv = np.asarray(small.convert("HSV")).reshape(-1, 3) / 255.0
        keep = pixels.min(1) <= 0.9  # drop the white studio background
        hsv = hsv[keep] if keep.sum() >= 10 else hsv
        bins = np.minimum((hsv * [8, 3, 3]).astype(int), [7, 2, 2])
        hist = np.bincount(bins[:, 0] * 9 + bins[:, 1] * 3 + bins[:, 2], minlength=72).astype(np.float32)
        out.append(np.sqrt(hist / hist.sum()))
    return F.normalize(torch.from_numpy(np.stack(out)), dim=-1)


def tag_tfidf(captions: list[str]) -> torch.Tensor:
    from hf_clipneg.tags import extract_tags

    tags = [set(extract_tags(c, phrases=False, max_tags=32)) for c in captions]
    df = collections.Counter(t for s in tags for t in s)
    vocab = {t: i for i, t in enumerate(df)}
    x = torch.zeros(len(captions), len(vocab))
    for row, s in enumerate(tags):
        for t in s:
            x[row, vocab[t]] = float(np.log(len(captions) / df[t]))
    return F.normalize(x, dim=-1)


def mutual_nn(similarity: torch.Tensor, k: int) -> torch.Tensor:
    s = similarity.clone()
    s.fill_diagonal_(-float("inf"))
    top = torch.zeros_like(s, dtype=torch.bool)
    top.scatter_(1, s.topk(k, dim=1).indices, True)
    return top & top.T


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Q.DEFAULT_DATA))
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="title")
    p.add_argument("--category-columns", default="article_type,base_colour,gender")
    p.add_argument("--k", type=int, default=128, help="k of the image k-means (the paper's clusters)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "datasets", "hf_clipneg", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from hf_clipneg.clustering import cluster_features
    from hf_clipneg.features import IMAGE_FEATURES, TEXT_FEATURES
    from hf_clipneg.metrics import groups_from_captions

    started = time.perf_counter()
    if args.smoke:
        from hf_clipneg.testing import build_tiny_dual_encoder

        raw = Q.smoke_splits()
        args.image_column, args.caption_column, args.category_columns = "image", "caption", "shape,colour"
        model, processor = build_tiny_dual_encoder()
    else:
        from hf_clipneg.towers import build_dual_encoder

        raw = Q.load_splits(args.data)
        model, processor = build_dual_encoder(device="cpu")
    # the exact call quality.py and a user make, so the datasets cache of the features is shared
    train = Q.featured_splits({"train": raw["train"]}, model, processor, args.image_column, args.caption_column)["train"]
    category_columns = [c.strip() for c in args.category_columns.split(",") if c.strip()]
    if not category_columns:
        raise ValueError("Every training row needs a category (--category-columns) to measure precision.")
    category = torch.as_tensor(Q.codes(Q.category_keys(train, category_columns)))
    n = len(train)
    columns = train.select_columns([IMAGE_FEATURES, TEXT_FEATURES]).with_format("numpy")[:]
    image = F.normalize(torch.as_tensor(np.asarray(columns[IMAGE_FEATURES], dtype=np.float32)), dim=-1)
    text = F.normalize(torch.as_tensor(np.asarray(columns[TEXT_FEATURES], dtype=np.float32)), dim=-1)
    source = raw["train"]
    colour = colour_histograms(source[i][args.image_column] for i in range(n))
    captions = list(train[args.caption_column])
    tfidf = tag_tfidf(captions)
    k = min(args.k, max(2, n // 20)) if args.smoke else args.k
    labels, _ = cluster_features(image.numpy(), k, seed=0)
    cluster = torch.as_tensor(labels)
    caption_code = torch.as_tensor(groups_from_captions(captions))

    off = ~torch.eye(n, dtype=torch.bool)
    same = (category[:, None] == category[None, :]) & off
    n_pairs, n_same = int(off.sum()), int(same.sum())
    s_img, s_txt, s_col, s_tag = image @ image.T, text @ text.T, colour @ colour.T, tfidf @ tfidf.T
    same_cluster = cluster[:, None] == cluster[None, :]
    rules = {
        f"same image cluster (k-means k={k}, the paper)": same_cluster,
        "identical caption": caption_code[:, None] == caption_code[None, :],
        "image cosine > 0.97 (library default)": s_img > 0.97,
        "image cosine > 0.9": s_img > 0.9,
        "image cosine > 0.8": s_img > 0.8,
        "text cosine > 0.95": s_txt > 0.95,
        "text cosine > 0.9": s_txt > 0.9,
        "text cosine > 0.8": s_txt > 0.8,
        "image > 0.9 and text > 0.9": (s_img > 0.9) & (s_txt > 0.9),
        "image > 0.7 and text > 0.8": (s_img > 0.7) & (s_txt > 0.8),
        "mutual nearest neighbours (image + text), k=1": mutual_nn(s_img + s_txt, 1),
        "mutual nearest neighbours (image + text), k=5": mutual_nn(s_img + s_txt, 5),
        "caption tag TF-IDF cosine > 0.8": s_tag > 0.8,
        "caption tag TF-IDF cosine > 0.5": s_tag > 0.5,
        "colour histogram cosine > 0.9": s_col > 0.9,
        "same image cluster and colour > 0.8": same_cluster & (s_col > 0.8),
        "image > 0.7, text > 0.6 and colour > 0.85": (s_img > 0.7) & (s_txt > 0.6) & (s_col > 0.85),
        "same image cluster, text > 0.8 and colour > 0.9": same_cluster & (s_txt > 0.8) & (s_col > 0.9),
    }
    lines = [
        f"Label-free duplicate evidence on `{'synthetic (--smoke)' if args.smoke else args.data}` train: {n} rows, "
        f"{n_pairs:,} ordered pairs, same-category base rate {100 * n_same / n_pairs:.3f}% "
        f"(category = {args.category_columns}); {time.perf_counter() - started:.0f} s.",
        "",
        "| rule | flagged | precision | recall |",
        "|---|---|---|---|",
    ]
    for name, flags in rules.items():
        flags = flags & off
        flagged = int(flags.sum())
        hits = int((flags & same).sum())
        precision = f"{100 * hits / flagged:.1f}%" if flagged else "-"
        lines.append(f"| {name} | {100 * flagged / n_pairs:.3f}% | {precision} | {100 * hits / max(n_same, 1):.1f}% |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
