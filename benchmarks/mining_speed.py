"""Time clustering + negative selection on synthetic clustered 384-d features.

Usage:
    python benchmarks/mining_speed.py [--sizes 10000 100000 1000000] [--smoke] [--dim 384]

Features are drawn from a mixture of Gaussians on the sphere (a realistic clustered layout). Timed:
`NegativeMiner.fit_arrays` (spherical k-means with the default k, the resolved thresholds, the
statistics) and `select_negatives` for every row (m=4, chunks of 10,000 rows). Text clustering is not
timed (image features only): with text features it costs about the same k-means again.
Peak memory: the ru_maxrss (peak resident set) increase during the run, measured in a fresh child
process per size that first loads the features from a .npy file (so the input array, N x d x 4
bytes, is in the baseline and the number is what mining adds on top).
Also reported: process CPU time (all threads), a measure that does not depend on other load on the
machine, and the 1-minute load average when the run started. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time

import numpy as np


def _mixture(n_rows: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_components = max(4, int(np.sqrt(n_rows)))
    centres = rng.standard_normal((n_components, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    features = np.empty((n_rows, dim), dtype=np.float32)
    for start in range(0, n_rows, 100_000):
        stop = min(start + 100_000, n_rows)
        component = rng.integers(0, n_components, stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * np.float32(0.8 / np.sqrt(dim))
        features[start:stop] = centres[component] + noise
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features


def _run(path: str, queue) -> None:
    from hf_clipneg.mining import MiningConfig, NegativeMiner

    features = np.load(path)  # the input itself is in the baseline: the delta is what mining adds
    n_rows = features.shape[0]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load = os.getloadavg()[0]
    cpu_started = time.process_time()
    started = time.perf_counter()
    miner = NegativeMiner(MiningConfig(negatives_per_row=4, cluster_text=False)).fit_arrays(features)
    fitted = time.perf_counter()
    short = 0
    for start in range(0, n_rows, 10_000):
        chosen, _, _ = miner.select_negatives(np.arange(start, min(start + 10_000, n_rows)))
        short += int(((chosen >= 0).sum(1) < 4).sum())
    done = time.perf_counter()
    cpu = time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    queue.put((n_rows, miner.config.n_image_clusters, fitted - started, done - fitted, done - started, cpu, load, peak / 1024, short))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--smoke", action="store_true", help="one tiny run (2,000 rows) to check the script works")
    args = parser.parse_args()
    sizes = [2_000] if args.smoke else args.sizes
    context = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n_rows in sizes:
            path = os.path.join(folder, f"features_{n_rows}.npy")
            np.save(path, _mixture(n_rows, args.dim))
            queue = context.Queue()
            process = context.Process(target=_run, args=(path, queue))
            process.start()
            result = queue.get()
            process.join()
            rows.append(result)
            os.remove(path)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; d={args.dim}, m=4, default k")
    print("Peak memory = increase of ru_maxrss (peak RSS) over the loaded input, in a fresh process per size.\n")
    print("CPU (s) = process CPU time over all threads: a load-independent measure of the work done.\n")
    print(
        "| rows | k | clustering + stats (s) | selection (s) | total wall (s) | CPU (s) | rows/s | "
        "load avg at start | peak memory (MiB) | rows < m |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n_rows, k, fit_s, select_s, total_s, cpu_s, load, peak_mib, short in rows:
        print(
            f"| {n_rows:,} | {k} | {fit_s:.2f} | {select_s:.2f} | {total_s:.2f} | {cpu_s:.1f} | "
            f"{n_rows / total_s:,.0f} | {load:.1f} | {peak_mib:,.0f} | {short} |"
        )


if __name__ == "__main__":
    main()
