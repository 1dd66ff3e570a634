"""Compare spherical k-means and rate-reduction (CPP) clustering of frozen tower features.

Usage:
    python benchmarks/clustering.py [--split validation] [--ks article_types 128] [--modality image text]
    python benchmarks/clustering.py --smoke          # synthetic blobs, a few seconds

Data: ../shared/data/fashion-products (see shared/README.md), embedded once with the packaged
frozen towers (EfficientNet-Lite0 pooled 1280-d image features, all-MiniLM-L6-v2 mean-pooled 384-d
text features, via `hf_clipneg.features.compute_features`) and cached as .npy files under
`$HF_CLIPNEG_CACHE/benchmark-features` (default ~/.cache/hf_clipneg/benchmark-features); the first
run spends several minutes embedding (about 10 min for the 1,000 validation rows on 2 busy cores;
the 7,583 train rows take about an hour there), later runs only cluster.

Metrics against `article_type` (and `master_category`): clustering accuracy (best one-to-one
cluster/class matching, Hungarian), NMI and ARI. Duplicate signal: "duplicate" pairs are the pairs of
rows that share article_type + base_colour + gender (near-identical products that must not become
negatives of each other); precision = share of same-cluster pairs that are duplicate pairs, recall =
share of duplicate pairs that fall into one cluster. Time = wall-clock seconds of the clustering call.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-products"
LABEL_COLUMNS = ("article_type", "master_category", "base_colour", "gender", "title")


def cache_dir() -> Path:
    from hf_clipneg.towers import default_cache_dir

    return default_cache_dir() / "benchmark-features"


def load_labels(split: str) -> dict[str, np.ndarray]:
    """The catalogue attributes of a split (no images), as object arrays."""
    import pyarrow.parquet as pq

    table = pq.read_table(DATA_DIR / f"{split}.parquet", columns=list(LABEL_COLUMNS))
    return {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in LABEL_COLUMNS}


def load_or_compute_features(split: str) -> dict[str, np.ndarray]:
    """``{"image": (N, 1280), "text": (N, 384)}`` float32 frozen-tower features of a split, cached as .npy."""
    directory = cache_dir()
    paths = {m: directory / f"fashion-{split}-{m}.npy" for m in ("image", "text")}
    if all(p.is_file() for p in paths.values()):
        return {m: np.load(p) for m, p in paths.items()}
    from datasets import load_dataset

    from hf_clipneg.features import IMAGE_FEATURES, TEXT_FEATURES, compute_features

    started = time.perf_counter()
    dataset = load_dataset("parquet", data_files={split: str(DATA_DIR / f"{split}.parquet")}, split=split)
    embedded = compute_features(dataset, caption_column="title", batch_size=64)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "image": np.asarray(embedded[IMAGE_FEATURES], dtype=np.float32),
        "text": np.asarray(embedded[TEXT_FEATURES], dtype=np.float32),
    }
    for modality, array in arrays.items():
        tmp = paths[modality].with_suffix(".tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, paths[modality])
    logging.getLogger(__name__).info("Embedded %s (%d rows) in %.0fs", split, len(dataset), time.perf_counter() - started)
    return arrays


def clustering_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Share of rows whose cluster is matched to their class by the best one-to-one matching."""
    from scipy.optimize import linear_sum_assignment

    _, truth_ids = np.unique(truth, return_inverse=True)
    _, pred_ids = np.unique(predicted, return_inverse=True)
    table = np.zeros((pred_ids.max() + 1, truth_ids.max() + 1), dtype=np.int64)
    np.add.at(table, (pred_ids, truth_ids), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / truth.size)


def _pair_count(counts: np.ndarray) -> int:
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def duplicate_pair_scores(duplicate_key: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of "same cluster" as a detector of pairs sharing `duplicate_key`."""
    _, key_ids = np.unique(duplicate_key, return_inverse=True)
    joint = predicted.astype(np.int64) * (key_ids.max() + 1) + key_ids
    same_both = _pair_count(np.unique(joint, return_counts=True)[1])
    same_cluster = _pair_count(np.bincount(predicted))
    same_key = _pair_count(np.bincount(key_ids))
    return same_both / max(same_cluster, 1), same_both / max(same_key, 1)


def evaluate(labels: dict[str, np.ndarray], predicted: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    scores = {}
    for column, short in (("article_type", "type"), ("master_category", "master")):
        truth = labels[column]
        scores[f"acc_{short}"] = clustering_accuracy(truth, predicted)
        scores[f"nmi_{short}"] = float(normalized_mutual_info_score(truth, predicted))
        scores[f"ari_{short}"] = float(adjusted_rand_score(truth, predicted))
    key = np.array(
        [f"{a}|{c}|{g}" for a, c, g in zip(labels["article_type"], labels["base_colour"], labels["gender"])],
        dtype=object,
    )
    scores["dup_precision"], scores["dup_recall"] = duplicate_pair_scores(key, predicted)
    return scores


def run_backend(backend: str, features: np.ndarray, k: int, seed: int, cpp_kwargs: dict) -> tuple[np.ndarray, float]:
    from hf_clipneg.clustering.kmeans import spherical_kmeans
    from hf_clipneg.clustering.rate_reduction import cpp_cluster

    started = time.perf_counter()
    if backend == "kmeans":
        assignments, _ = spherical_kmeans(features, k, seed=seed)
    else:
        assignments, _ = cpp_cluster(features, k, seed=seed, **cpp_kwargs)
    return assignments, time.perf_counter() - started


def synthetic_blobs(n_rows: int = 1200, dim: int = 32, n_blobs: int = 8, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Gaussian blobs on the sphere with fake catalogue labels (type = blob, colour/gender random)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim))
    blob = rng.integers(0, n_blobs, n_rows)
    features = centres[blob] / np.sqrt(dim) + 0.12 * rng.standard_normal((n_rows, dim))
    labels = {
        "article_type": np.array([f"type{b}" for b in blob], dtype=object),
        "master_category": np.array([f"master{b % 3}" for b in blob], dtype=object),
        "base_colour": np.array(["red", "blue"], dtype=object)[rng.integers(0, 2, n_rows)],
        "gender": np.array(["Men", "Women"], dtype=object)[rng.integers(0, 2, n_rows)],
    }
    return features.astype(np.float32), labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    parser.add_argument("--ks", nargs="+", default=["article_types", "128"],
                        help="cluster counts; 'article_types' = number of article types in the split")
    parser.add_argument("--modality", nargs="+", default=["image", "text"], choices=("image", "text"))
    parser.add_argument("--backends", nargs="+", default=["kmeans", "cpp"], choices=("kmeans", "cpp"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="CPP epochs (default: cpp_cluster's)")
    parser.add_argument("--smoke", action="store_true", help="synthetic blobs only, a few seconds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a busy 2-core machine 1 thread was ~3x faster than 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cpp_kwargs = {} if args.epochs is None else {"epochs": args.epochs}

    if args.smoke:
        features, labels = synthetic_blobs()
        datasets = {"blobs": features}
        ks = [8, 16]
        cpp_kwargs = {"epochs": 5, "batch_size": 400, "feature_dim": 32, "hidden_dim": 64, **cpp_kwargs}
        source = "synthetic blobs (1,200 x 32, 8 blobs)"
    else:
        if not DATA_DIR.is_dir():
            sys.exit(f"{DATA_DIR} not found: the full benchmark needs ../shared beside the checkout (or use --smoke).")
        labels = load_labels(args.split)
        arrays = load_or_compute_features(args.split)
        datasets = {m: arrays[m] for m in args.modality}
        n_types = len(set(labels["article_type"]))
        ks = [n_types if k == "article_types" else int(k) for k in args.ks]
        source = f"fashion-products/{args.split} ({len(labels['article_type'])} rows, {n_types} article types)"

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Clustering benchmark: {source}; {platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}, seed {args.seed}\n")
    header = ("| features | k | backend | acc type | NMI type | ARI type | acc master | NMI master | ARI master "
              "| dup precision | dup recall | seconds |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for modality, features in datasets.items():
        for k in ks:
            for backend in args.backends:
                assignments, seconds = run_backend(backend, features, k, args.seed, cpp_kwargs)
                s = evaluate(labels, assignments)
                print(f"| {modality} | {k} | {backend} | {s['acc_type']:.3f} | {s['nmi_type']:.3f} | "
                      f"{s['ari_type']:.3f} | {s['acc_master']:.3f} | {s['nmi_master']:.3f} | {s['ari_master']:.3f} | "
                      f"{s['dup_precision']:.3f} | {s['dup_recall']:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
