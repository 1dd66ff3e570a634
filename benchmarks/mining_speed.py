"""Time clustering + negative selection on synthetic clustered 384-d features.

Usage:
    python benchmarks/mining_speed.py [--sizes 10000 100000 1000000] [--smoke] [--dim 384]
        [--assignment exact|ivf] [--extraction-sample 64]

Features are drawn from a mixture of Gaussians on the sphere (`speed.clustered_vectors`). Timed:
`NegativeMiner.fit_arrays` (spherical k-means with the default k, the resolved thresholds, the
statistics) and `select_negatives` for every row (m=4, chunks of 10,000 rows). Text clustering is not
timed (image features only): with text features it costs about the same k-means again.
Peak memory: peak resident set (Linux VmHWM, reset through /proc/self/clear_refs just before mining)
minus the resident set at that moment, in a fresh child process per size that first loads the
features from a .npy file (so the input array, N x d x 4 bytes, is in the baseline and the number is
what mining adds on top, faiss's C++ buffers included).
Also reported: process CPU time (all threads), a measure that does not depend on other load on the
machine, and the 1-minute load average when the run started. With ``--assignment ivf`` the
share of rows assigned to the same centroid as the exact search is measured too (not timed).
Mining time / feature-extraction time: the packaged towers (`hf_clipneg.towers.build_dual_encoder`)
embed ``--extraction-sample`` synthetic 224 px images + captions with `compute_features`; their
measured pairs/s is extrapolated to each size (0 skips it). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import clustered_vectors  # noqa: E402  (the same clustered layout as the retrieval benchmark)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs) and return the current
    RSS in KiB, so that the peak read later is what the run adds on top of the loaded input. Without
    /proc, falls back to ru_maxrss (which can hide a run that stays below an earlier import peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        current = _status_kib("VmRSS")
        if current is not None:
            return current
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kib() -> int:
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _run(path: str, assignment: str, queue) -> None:
    from hf_clipneg.mining import MiningConfig, NegativeMiner

    features = np.load(path)  # the input itself is in the baseline: the delta is what mining adds
    n_rows = features.shape[0]
    before = _reset_peak_rss()
    load = os.getloadavg()[0]
    cpu_started = time.process_time()
    started = time.perf_counter()
    config = MiningConfig(negatives_per_row=4, cluster_text=False, cluster_images=True, kmeans_assignment=assignment)
    miner = NegativeMiner(config).fit_arrays(features)
    fitted = time.perf_counter()
    short = 0
    for start in range(0, n_rows, 10_000):
        chosen, _, _ = miner.select_negatives(np.arange(start, min(start + 10_000, n_rows)))
        short += int(((chosen >= 0).sum(1) < 4).sum())
    done = time.perf_counter()
    cpu = time.process_time() - cpu_started
    peak = _peak_rss_kib() - before
    agreement = None
    if assignment != "exact":
        from hf_clipneg.clustering import assign_to_centroids

        exact = assign_to_centroids(miner.image_features, miner.image.centroids)
        agreement = float((exact == miner.image.labels).mean())
    queue.put((n_rows, miner.config.n_image_clusters, fitted - started, done - fitted, done - started, cpu, load,
               peak / 1024, short, agreement))


def _extraction_pairs_per_second(n_images: int) -> tuple[float, str]:
    """Pairs/s of `compute_features` with the packaged towers on `n_images` synthetic images (CPU/GPU)."""
    import logging

    from datasets import Dataset
    from PIL import Image

    from hf_clipneg.features import compute_features
    from hf_clipneg.towers import build_dual_encoder

    logging.disable(logging.WARNING)
    model, processor = build_dual_encoder()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(n_images)]
    captions = [f"a photo of product number {i} in a box" for i in range(n_images)]
    pairs = Dataset.from_dict({"image": images, "caption": captions})
    compute_features(pairs.select(range(min(8, n_images))), model, processor, batch_size=8)  # warm-up
    started = time.perf_counter()
    compute_features(pairs, model, processor, batch_size=32)
    seconds = time.perf_counter() - started
    name = f"{type(model.vision_model).__name__} + {type(model.text_model).__name__}"
    return n_images / seconds, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--smoke", action="store_true", help="one tiny run (2,000 rows) to check the script works")
    parser.add_argument("--assignment", choices=["exact", "ivf"], default="exact", help="k-means row assignment")
    parser.add_argument("--extraction-sample", type=int, default=64,
                        help="images embedded to measure feature-extraction throughput (0 = skip)")
    args = parser.parse_args()
    sizes = [2_000] if args.smoke else args.sizes
    context = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n_rows in sizes:
            path = os.path.join(folder, f"features_{n_rows}.npy")
            np.save(path, clustered_vectors(n_rows, args.dim))
            queue = context.Queue()
            process = context.Process(target=_run, args=(path, args.assignment, queue))
            process.start()
            result = queue.get()
            process.join()
            rows.append(result)
            os.remove(path)
    extraction = None
    if args.extraction_sample and not args.smoke:
        load = os.getloadavg()[0]
        extraction = _extraction_pairs_per_second(args.extraction_sample)
        print(f"Feature extraction ({extraction[1]}, packaged towers): {extraction[0]:.1f} pairs/s measured on "
              f"{args.extraction_sample} synthetic 224 px images (load avg {load:.1f}); extrapolated below.\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; d={args.dim}, m=4, "
          f"default k, assignment={args.assignment}")
    print("Peak memory = peak RSS during mining minus RSS with the input loaded, in a fresh process per size.\n")
    print("CPU (s) = process CPU time over all threads: less sensitive to other load than wall time (not immune: shared cores and caches slow it too).\n")
    print(
        "| rows | k | clustering + stats (s) | selection (s) | total wall (s) | CPU (s) | rows/s | "
        "load avg at start | peak memory (MiB) | input (MiB) | rows < m | same centroid as exact | "
        "mining / extraction time (extrapolated) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n_rows, k, fit_s, select_s, total_s, cpu_s, load, peak_mib, short, agreement in rows:
        same = "exact" if agreement is None else f"{agreement:.4%}"
        ratio = "n/a" if extraction is None else f"{total_s / (n_rows / extraction[0]):.2%}"
        print(
            f"| {n_rows:,} | {k} | {fit_s:.2f} | {select_s:.2f} | {total_s:.2f} | {cpu_s:.1f} | "
            f"{n_rows / total_s:,.0f} | {load:.1f} | {peak_mib:,.0f} | {n_rows * args.dim * 4 / 2**20:,.0f} | "
            f"{short} | {same} | {ratio} |"
        )


if __name__ == "__main__":
    main()
