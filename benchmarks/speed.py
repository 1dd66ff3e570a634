"""Speed of the hf_clipneg building blocks: mining, feature extraction, training step, retrieval.

Usage:
    python benchmarks/speed.py                      # full mode: packaged towers, up to 1M rows/vectors
    python benchmarks/speed.py --max-rows 100000    # skip the 1M mining and retrieval rows
    python benchmarks/speed.py --sections trainer   # one section (mining features trainer epoch partial gradcache retrieval)
    python benchmarks/speed.py --smoke              # tiny random towers and sizes, a few seconds (CI)

These machines are noisy (shared cores, other jobs), so every figure is either a ratio or a pair
measured side by side in the same run, interleaved so that drift in the background load hits both
sides alike; each table header gives the load average (1/5/15 min) when it was measured.

Sections:
  mining     `benchmarks/mining_speed.py` in a subprocess (clustering + negative selection on given
             384-d features: rows/s and peak memory per size), its table passed through.
  features   `compute_features` rows/s end to end (one image and one caption per row) and, split,
             images/s (decode + preprocess + vision tower) and texts/s (tokenise + text tower), fp32
             and bf16 autocast side by side, rounds interleaved (fp32, bf16, fp32, bf16, ...).
  trainer    Step time (next batch from the Trainer's dataloader + `training_step` (forward, loss,
             backward) + optimizer and scheduler step) of `ClipNegTrainer` with
             negative_strategy="cluster_weighted" (with and without mined negative texts) against a
             plain symmetric InfoNCE `transformers.Trainer` (`PlainClipTrainer` below) on the same model
             (frozen towers) and the same batches; steps run in rotating order A, B, C / B, C, A / ...
             Then a breakdown of where ClipNegTrainer's extra time goes (collation, `pair_weights`,
             the loss), and with `--profile` or a ratio above the 1.03 target a cProfile listing.
  epoch      One training epoch with frozen towers on fashion-products train (../shared; synthetic rows in
             --smoke): ClipNegTrainer on cached tower features (the default) against running the towers
             every step (`cached_tower_features=False`, --tower-steps steps timed, the epoch extrapolated),
             and mining + 10 epochs end to end, before vs after.
  retrieval  `ClipNegRetriever.index_embeddings` build time, `search_embeddings(k=10)` queries/s for
             the flat (exact) and IVF faiss indexes on clustered L2-normalised 256-d vectors, and
             recall@10 of IVF against exact.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
FASHION = HERE.parents[1] / "shared" / "data" / "fashion-products"
TARGET_RATIO = 1.03


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load avg {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} CPUs"


def header(title: str) -> None:
    print(f"\n### {title} ({load_average()})\n", flush=True)


def table(columns: list[str], rows: list[list[Any]]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print(flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def precision_context(precision: str):
    """Force the library's inference precision (`HF_CLIPNEG_PRECISION`, read by `encoding.autocast_dtype`)."""
    previous = os.environ.get("HF_CLIPNEG_PRECISION")
    os.environ["HF_CLIPNEG_PRECISION"] = precision
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_CLIPNEG_PRECISION", None)
        else:
            os.environ["HF_CLIPNEG_PRECISION"] = previous


# --------------------------------------------------------------------------------------------------
# Shared state: the towers and a synthetic dataset, built once
# --------------------------------------------------------------------------------------------------


class Setup:
    """The dual encoder, its processor and the synthetic rows every section shares."""

    def __init__(self, args: argparse.Namespace):
        from hf_clipneg.data import make_synthetic_pairs

        self.args = args
        if args.smoke:
            from hf_clipneg.testing import build_tiny_dual_encoder

            self.model, self.processor = build_tiny_dual_encoder(projection_dim=16, image_size=32)
            self.model.to(device_name())
            self.towers = "tiny random ViT + BERT (smoke)"
        else:
            from hf_clipneg.towers import build_dual_encoder

            self.model, self.processor = build_dual_encoder(device=device_name())
            self.towers = "EfficientNet-Lite0 + all-MiniLM-L6-v2 (packaged)"
        self.dataset = make_synthetic_pairs(num_rows=args.rows, seed=0, image_size=64)
        self._features = None

    def features(self):
        """The dataset with fp32 `image_features` / `text_features` columns (computed once)."""
        if self._features is None:
            from hf_clipneg.features import compute_features

            self._features = compute_features(
                self.dataset, self.model, self.processor, batch_size=self.args.batch_size, device=device_name()
            )
        return self._features


# --------------------------------------------------------------------------------------------------
# Mining: delegate to benchmarks/mining_speed.py
# --------------------------------------------------------------------------------------------------


def bench_mining(args: argparse.Namespace) -> None:
    header("Mining: clustering + negative selection on given features (benchmarks/mining_speed.py)")
    command = [sys.executable, str(HERE / "mining_speed.py")]
    if args.smoke:
        command.append("--smoke")
    else:
        sizes = [n for n in (10_000, 100_000, 1_000_000) if n <= args.max_rows]
        command += ["--sizes", *map(str, sizes)]
    print(f"`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(command))}`\n", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout, flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"mining_speed.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


# --------------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------------


def _image_pass(setup: Setup, values: list[Any], batch_size: int):
    import torch

    from hf_clipneg.encoding import encode_images
    from hf_clipneg.data import to_rgb

    out = []
    for start in range(0, len(values), batch_size):
        images = [to_rgb(v, row=start + i) for i, v in enumerate(values[start : start + batch_size])]
        out.append(encode_images(setup.model, setup.processor.image_processor, images).cpu())
    return torch.cat(out)


def _text_pass(setup: Setup, captions: list[str], batch_size: int):
    import torch

    from hf_clipneg.encoding import encode_texts

    return torch.cat([
        encode_texts(setup.model, setup.processor.tokenizer, captions[start : start + batch_size]).cpu()
        for start in range(0, len(captions), batch_size)
    ])


def bench_features(args: argparse.Namespace, setup: Setup) -> None:
    from datasets import Image as ImageFeature

    from hf_clipneg.features import compute_features

    n, batch_size = len(setup.dataset), args.batch_size
    raw = setup.dataset.cast_column("image", ImageFeature(decode=False))
    values, captions = raw["image"], raw["caption"]
    precisions = ["fp32", "bf16"]
    warm = min(n, batch_size)
    for precision in precisions:  # warm-up: first calls pick kernels and allocate
        with precision_context(precision):
            _image_pass(setup, values[:warm], batch_size)
            _text_pass(setup, captions[:warm], batch_size)
    times: dict[tuple[str, str], list[float]] = {}
    outputs: dict[tuple[str, str], Any] = {}
    for _ in range(args.rounds):
        for precision in precisions:
            with precision_context(precision):
                seconds, out = timed(
                    lambda: compute_features(setup.dataset, setup.model, setup.processor, batch_size=batch_size,
                                             device=device_name())
                )
                times.setdefault(("e2e", precision), []).append(seconds)
                outputs[("e2e", precision)] = out
                seconds, out = timed(lambda: _image_pass(setup, values, batch_size))
                times.setdefault(("image", precision), []).append(seconds)
                seconds, _ = timed(lambda: _text_pass(setup, captions, batch_size))
                times.setdefault(("text", precision), []).append(seconds)
    header(f"Feature extraction: {setup.towers}, {n} synthetic 64x64 rows, batch {batch_size}, "
           f"device {device_name()}, mean of {args.rounds} interleaved round(s)")
    rows, rates = [], {}
    for precision in precisions:
        rates[precision] = [n / statistics.mean(times[(part, precision)]) for part in ("e2e", "image", "text")]
        rows.append([precision] + [f"{r:,.1f}" for r in rates[precision]])
    rows.append(["bf16 / fp32 speed"] + [f"{b / f:.2f}x" for b, f in zip(rates["bf16"], rates["fp32"])])
    table(["precision", "compute_features rows/s (1 image + 1 caption)", "images/s", "texts/s"], rows)
    fp32 = {c: np.asarray(outputs[("e2e", "fp32")][c]) for c in ("image_features", "text_features")}
    bf16 = {c: np.asarray(outputs[("e2e", "bf16")][c]) for c in ("image_features", "text_features")}
    agreement = ", ".join(
        f"{c}: min {float((fp32[c] * bf16[c]).sum(1).min()):.4f}, mean {float((fp32[c] * bf16[c]).sum(1).mean()):.4f}"
        for c in fp32
    )
    print(f"Cosine between bf16-autocast and fp32 features of the same rows: {agreement}.")
    print("images/s = to_rgb decode + image processor + vision tower; texts/s = tokeniser + text tower + mean "
          "pool (the two halves of compute_features, through hf_clipneg.encoding, timed apart).", flush=True)
    from hf_clipneg.encoding import autocast_dtype

    chosen = "bf16" if autocast_dtype(device_name()) is not None else "fp32"
    faster = max(precisions, key=lambda p: rates[p][1])
    print(f"The library's own choice on this machine (no HF_CLIPNEG_PRECISION): {chosen}; measured faster for "
          f"images here: {faster}.\n", flush=True)


# --------------------------------------------------------------------------------------------------
# Trainer step
# --------------------------------------------------------------------------------------------------


def _plain_trainer_class():
    from transformers import Trainer

    from hf_clipneg.training import set_tower_training

    class PlainClipTrainer(Trainer):
        """The baseline: symmetric InfoNCE from the model's own `return_loss=True`, towers frozen the same way."""

        loss_is_scaled_for_ga = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._frozen_modules = set_tower_training(self.model, "frozen")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            for module in self._frozen_modules:
                module.eval()  # as ClipNegTrainer does: frozen batch-norm statistics / dropout stay fixed
            outputs = model(**inputs, return_loss=True, return_dict=True)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return PlainClipTrainer


class Stepper:
    """Drive one trainer step by step, the way Trainer's inner loop does, timing each phase."""

    def __init__(self, name: str, trainer: Any, total_steps: int):
        self.name, self.trainer = name, trainer
        trainer.create_optimizer_and_scheduler(num_training_steps=total_steps)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, which we do not run
        self.loader = trainer.get_train_dataloader()
        self.iterator = iter(self.loader)
        self.phases: dict[str, list[float]] = {"data": [], "forward + loss + backward": [], "optimizer": []}

    def _next_batch(self) -> dict[str, Any]:
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)

    def step(self, record: bool) -> None:
        trainer = self.trainer
        t0 = time.perf_counter()
        batch = self._next_batch()
        t1 = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        t2 = time.perf_counter()
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)
        trainer.state.global_step += 1
        t3 = time.perf_counter()
        if record:
            for phase, seconds in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2)):
                self.phases[phase].append(seconds)

    def totals(self) -> list[float]:
        return [sum(parts) for parts in zip(*self.phases.values())]


def _build_trainers(args: argparse.Namespace, setup: Setup, output_dir: str):
    from transformers import TrainingArguments

    from hf_clipneg.training.collator import ClipNegCollator
    from hf_clipneg.data import without_image_decoding
    from hf_clipneg.mining import MiningConfig, mine_negatives
    from hf_clipneg.training import ClipNegTrainer
    from hf_clipneg.training import ClipNegTrainingArguments

    mined, stats = mine_negatives(setup.features(), MiningConfig(negatives_per_row=4, seed=0))
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        seed=0,
        report_to="none",
        use_cpu=device_name() == "cpu",
        dataloader_num_workers=0,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    clipneg = {
        label: ClipNegTrainer(
            model=setup.model,
            args=ClipNegTrainingArguments(
                negative_strategy="cluster_weighted", tower_training="frozen", mined_negatives_per_row=m,
                cached_tower_features=False, **common
            ),
            train_dataset=mined,
            processing_class=setup.processor,
        )
        for label, m in (("ClipNeg cluster_weighted", None), ("ClipNeg cluster_weighted, no mined texts", 0))
    }
    plain_rows = without_image_decoding(mined.select_columns(["image", "caption"]))
    plain = _plain_trainer_class()(
        model=setup.model,
        args=TrainingArguments(remove_unused_columns=False, **common),
        train_dataset=plain_rows,
        data_collator=ClipNegCollator(setup.processor, max_length=64, mined_negatives_per_row=0),
        processing_class=setup.processor,
    )
    return {"Plain InfoNCE Trainer": plain, **clipneg}, mined, stats


def _breakdown(args: argparse.Namespace, trainers: dict[str, Any], mined: Any) -> list[list[str]]:
    """Micro-timings of the parts ClipNegTrainer adds, on one batch of the same rows."""
    import torch

    from hf_clipneg.training.collator import META_COLUMNS
    from hf_clipneg.mining import pair_weights

    plain = trainers["Plain InfoNCE Trainer"]
    clipneg = trainers["ClipNeg cluster_weighted"]
    no_mined = trainers["ClipNeg cluster_weighted, no mined texts"]
    rows_neg = [dict(r) for r in clipneg.train_dataset.select(range(min(args.batch_size, len(mined))))]
    rows_plain = [dict(r) for r in plain.train_dataset.select(range(len(rows_neg)))]
    reps = args.micro_reps

    def mean_time(fn: Callable[[], Any]) -> float:
        fn()
        return min(timed(fn)[0] for _ in range(reps))

    out = []
    collate = {
        "plain collator": lambda: plain.data_collator(rows_plain),
        "ClipNeg collator, no mined texts": lambda: no_mined.data_collator(rows_neg),
        "ClipNeg collator, mined texts": lambda: clipneg.data_collator(rows_neg),
    }
    base = None
    for label, fn in collate.items():
        seconds = mean_time(fn)
        base = seconds if base is None else base
        out.append([f"collate {len(rows_neg)} rows: {label}", f"{seconds * 1e3:.2f}", f"{(seconds - base) * 1e3:+.2f}"])
    batch = clipneg.data_collator(rows_neg)
    meta = {name: batch[name] for name in META_COLUMNS if name in batch}
    seconds = mean_time(lambda: pair_weights(meta, clipneg.mining_config, step=0))
    out.append([f"pair_weights (cluster_weighted, B={len(rows_neg)})", f"{seconds * 1e3:.2f}", f"{seconds * 1e3:+.2f}"])
    # The two losses on the same embeddings (what compute_loss does after the forward pass).
    dim = clipneg.model.config.projection_dim
    generator = torch.Generator().manual_seed(0)
    b = len(rows_neg)
    image = torch.nn.functional.normalize(torch.randn(b, dim, generator=generator), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(b, dim, generator=generator), dim=-1).requires_grad_()
    m = int(batch.get("num_mined", 0))
    mined_text = torch.nn.functional.normalize(torch.randn(b, max(m, 1), dim, generator=generator), dim=-1)
    scale = torch.tensor(2.6592).exp()
    weights, positives = pair_weights(meta, clipneg.mining_config, step=0)

    def clip_loss():
        logits = text @ image.T * scale
        labels = torch.arange(b)
        loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        loss.backward()

    def weighted(mined_on: bool):
        def run():
            loss = clipneg.loss_fn(
                image, text, torch.tensor(2.6592),
                negative_weights=weights, positive_weights=positives,
                mined_text_embeds=mined_text if (mined_on and m) else None,
                mined_text_weights=batch.get("negative_weights") if (mined_on and m) else None,
            )
            loss.backward()
        return run

    base = mean_time(clip_loss)
    out.append([f"loss + backward on given embeddings: plain symmetric InfoNCE (B={b}, d={dim})", f"{base * 1e3:.2f}", "+0.00"])
    for label, fn in (("WeightedContrastiveLoss, no mined", weighted(False)), (f"WeightedContrastiveLoss, {m} mined", weighted(True))):
        seconds = mean_time(fn)
        out.append([f"loss + backward: {label}", f"{seconds * 1e3:.2f}", f"{(seconds - base) * 1e3:+.2f}"])
    return out


def _profile(stepper: Stepper, steps: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        stepper.step(record=False)
    profiler.disable()
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer).sort_stats("cumulative")
    stats.print_stats(r"hf_clipneg|collator|trainer\.py.*(training_step|compute_loss)|torch/(nn/modules/module|autograd)", 25)
    return buffer.getvalue()


def bench_trainer(args: argparse.Namespace, setup: Setup) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as output_dir:
        trainers, mined, stats = _build_trainers(args, setup, output_dir)
        total = args.warmup_steps + args.steps + (args.profile_steps if args.profile else 0) + 10
        steppers = [Stepper(name, trainer, total) for name, trainer in trainers.items()]
        for i in range(args.warmup_steps + args.steps):
            shift = i % len(steppers)  # rotate the order each step: A B C, B C A, C A B, ...
            for stepper in steppers[shift:] + steppers[:shift]:
                stepper.step(record=i >= args.warmup_steps)
        header(
            f"Trainer step: {setup.towers}, frozen towers, batch {args.batch_size}, {args.steps} timed steps after "
            f"{args.warmup_steps} warm-up, rotating order, device {device_name()}"
        )
        print(f"Mined dataset: {len(mined)} rows, {stats.n_image_clusters} image clusters, "
              f"{len(mined[0]['negative_indices'])} mined texts per row.\n")
        plain = steppers[0]
        base = statistics.mean(plain.totals())
        rows = []
        for stepper in steppers:
            totals = stepper.totals()
            mean = statistics.mean(totals)
            # The per-step ratio (same step index, run back to back) is robust to drift; its median is reported.
            paired = [t / p for t, p in zip(totals, plain.totals())]
            phases = " / ".join(f"{statistics.mean(v) * 1e3:,.0f}" for v in stepper.phases.values())
            rows.append([
                stepper.name, f"{mean * 1e3:,.0f}", f"{statistics.median(totals) * 1e3:,.0f}", phases,
                f"{mean / base:.3f}", f"{statistics.median(paired):.3f}",
            ])
        table(["trainer", "mean step (ms)", "median step (ms)", "data / forward+loss+backward / optimizer (ms)",
               "ratio of means vs plain", "median per-step ratio vs plain"], rows)
        worst = max(statistics.mean(s.totals()) / base for s in steppers[1:])
        no_mined_ratio = statistics.mean(steppers[2].totals()) / base
        verdict = "meets" if no_mined_ratio <= TARGET_RATIO else "misses"
        print(f"Target: ClipNegTrainer cluster_weighted <= {TARGET_RATIO}x plain. Without mined texts (same text-tower "
              f"work as plain): {no_mined_ratio:.3f}x ({verdict} the target). With mined texts the text tower "
              f"also embeds B*m extra captions by design.\n")

        header(f"Where ClipNegTrainer's extra time goes (best of {args.micro_reps} runs each, one batch)")
        table(["part", "time (ms)", "extra vs plain (ms)"], _breakdown(args, trainers, mined))
        if args.profile or worst > TARGET_RATIO:
            header(f"cProfile of {args.profile_steps} ClipNegTrainer (cluster_weighted, mined texts) steps, by cumulative time")
            print("```\n" + _profile(steppers[1], args.profile_steps).strip() + "\n```\n", flush=True)


# --------------------------------------------------------------------------------------------------
# Training epoch: cached tower features vs running the frozen towers
# --------------------------------------------------------------------------------------------------


def _epoch_data(args: argparse.Namespace, setup: Setup) -> tuple[Any, str, str]:
    if args.smoke or not FASHION.is_dir():
        return setup.dataset, "caption", f"{len(setup.dataset)} synthetic rows"
    from datasets import load_dataset

    splits = load_dataset("parquet", data_files={s: str(FASHION / f"{s}.parquet") for s in ("train", "validation", "test")})
    return splits["train"], "title", f"fashion-products train ({len(splits['train'])} rows)"


def bench_epoch(args: argparse.Namespace, setup: Setup) -> None:
    from transformers.utils import logging as hf_logging

    from hf_clipneg.features import compute_features
    from hf_clipneg.mining import MiningConfig, mine_negatives
    from hf_clipneg.training import ClipNegTrainer
    from hf_clipneg.training import ClipNegTrainingArguments

    hf_logging.set_verbosity_error()
    rows, caption_column, described = _epoch_data(args, setup)
    batch = min(args.epoch_batch_size, len(rows))
    sample = rows.select(range(min(args.extraction_sample, len(rows))))
    sample_seconds, _ = timed(lambda: compute_features(sample.flatten_indices(keep_in_memory=True), setup.model,
                                                       setup.processor, caption_column=caption_column))
    extraction = sample_seconds / len(sample) * len(rows)
    features_seconds, featured = timed(lambda: compute_features(rows, setup.model, setup.processor,
                                                                caption_column=caption_column))
    mining_seconds, (mined, _) = timed(lambda: mine_negatives(featured, MiningConfig(caption_column=caption_column)))
    steps_per_epoch = len(mined) // batch + (len(mined) % batch > 0)
    times = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for label, cached, steps in (("cached tower features", True, steps_per_epoch), ("towers run every step", False, args.tower_steps)):
            trainer = ClipNegTrainer(
                model=setup.model,
                args=ClipNegTrainingArguments(
                    output_dir=output_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
                    tower_training="frozen", cached_tower_features=cached, report_to="none", save_strategy="no",
                    logging_strategy="no", disable_tqdm=True, use_cpu=device_name() == "cpu", seed=0,
                ),
                train_dataset=mined,
                processing_class=setup.processor,
            )
            seconds, _ = timed(trainer.train)
            times[label] = seconds / steps
    cached_epoch = times["cached tower features"] * steps_per_epoch
    tower_epoch = times["towers run every step"] * steps_per_epoch
    header(f"Training epoch: {described}, {setup.towers}, frozen towers, batch {batch}, device {device_name()}")
    table(["path", "step (ms)", "epoch (s)", "measured steps"], [
        ["cached tower features (the default for frozen towers)", f"{times['cached tower features'] * 1e3:,.0f}",
         f"{cached_epoch:,.1f}", steps_per_epoch],
        ["towers run every step (before; cached_tower_features=False)", f"{times['towers run every step'] * 1e3:,.0f}",
         f"{tower_epoch:,.1f}", f"{args.tower_steps} (epoch extrapolated)"],
        ["cached speed-up", "", f"{tower_epoch / cached_epoch:,.1f}x", ""],
    ])
    before = extraction + mining_seconds + 10 * tower_epoch
    after = extraction + mining_seconds + 10 * cached_epoch
    print(f"Feature extraction {extraction:,.0f} s (measured on {len(sample)} rows, fp32/bf16 as the library "
          f"chooses; this run's full call took {features_seconds:,.1f} s, i.e. served from the datasets cache when "
          f"short), mining {mining_seconds:,.1f} s.")
    table(["mine + 10 epochs, end to end", "seconds"], [
        ["before (features + mining + 10 tower-path epochs)", f"{before:,.0f}"],
        ["after (features + mining + 10 cached epochs)", f"{after:,.0f}"],
        ["speed-up", f"{before / after:,.1f}x"],
    ])


def bench_partial(args: argparse.Namespace, setup: Setup) -> None:
    """Partial depth (the last block of each tower trains): cached block inputs vs running the towers, per step."""
    from transformers.utils import logging as hf_logging

    from hf_clipneg.block_features import compute_block_inputs
    from hf_clipneg.training import ClipNegTrainer
    from hf_clipneg.tower_tails import tail_start
    from hf_clipneg.training import ClipNegTrainingArguments

    hf_logging.set_verbosity_error()
    rows, caption_column, described = _epoch_data(args, setup)
    epoch_rows = len(rows)
    rows = rows.select(range(min(args.partial_rows, len(rows)))).flatten_indices(keep_in_memory=True)
    if caption_column != "caption":
        rows = rows.rename_column(caption_column, "caption")
    batch = min(args.epoch_batch_size, len(rows))
    starts = (tail_start(setup.model.vision_model, 1), tail_start(setup.model.text_model, 1))
    cache_seconds, _ = timed(lambda: compute_block_inputs(rows, setup.model, setup.processor, starts))
    times = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for label, cached, steps in (("cached", True, args.partial_steps), ("towers", False, args.partial_steps)):
            state = {k: v.clone() for k, v in setup.model.state_dict().items()}
            trainer = ClipNegTrainer(
                model=setup.model,
                args=ClipNegTrainingArguments(
                    output_dir=output_dir, per_device_train_batch_size=batch, max_steps=steps + 1, learning_rate=1e-4,
                    tower_training="partial", trainable_blocks=1, cached_tower_features=cached,
                    negative_strategy="vanilla", report_to="none", save_strategy="no",
                    logging_strategy="no", disable_tqdm=True, use_cpu=device_name() == "cpu", seed=0,
                ),
                train_dataset=rows,
                processing_class=setup.processor,
            )
            stepper = Stepper(label, trainer, steps + 1)
            stepper.step(record=False)  # warm-up
            for _ in range(steps):
                stepper.step(record=True)
            times[label] = float(np.mean(stepper.totals()))
            setup.model.load_state_dict(state)
    steps_per_epoch = epoch_rows // batch + (epoch_rows % batch > 0)
    per_row_cache = cache_seconds / len(rows)
    header(f"Partial depth (last block of each tower trains): {described}, {setup.towers}, batch {batch}, "
           f"device {device_name()}")
    table(["path", "step (ms)", "epoch (s)", "one-off cost (s)"], [
        ["cached block inputs (the default at partial depth)", f"{times['cached'] * 1e3:,.0f}",
         f"{times['cached'] * steps_per_epoch:,.1f}", f"{per_row_cache * epoch_rows:,.0f} (prefix once per row)"],
        ["towers run every step (cached_tower_features=False)", f"{times['towers'] * 1e3:,.0f}",
         f"{times['towers'] * steps_per_epoch:,.1f}", "0"],
        ["speed-up per epoch", "", f"{times['towers'] / times['cached']:,.1f}x", ""],
    ])
    print(f"Steps timed: {args.partial_steps} per path after one warm-up step, on the first {len(rows)} rows; epoch = "
          f"{steps_per_epoch} steps over {epoch_rows} rows (extrapolated); block inputs measured on those rows "
          f"({cache_seconds:,.1f} s, fp32/bf16 as the library chooses).")


def bench_gradcache(args: argparse.Namespace, setup: Setup) -> None:
    """A GradCache step (`mini_batch_size`) against the plain step at the same batch, last blocks trained on cached
    block inputs (the setting where the towers' activations fill memory), interleaved step by step."""
    from transformers.utils import logging as hf_logging

    from hf_clipneg.training import ClipNegTrainer, ClipNegTrainingArguments

    hf_logging.set_verbosity_error()
    rows, caption_column, described = _epoch_data(args, setup)
    rows = rows.select(range(min(args.gradcache_rows, len(rows)))).flatten_indices(keep_in_memory=True)
    if caption_column != "caption":
        rows = rows.rename_column(caption_column, "caption")
    batch = min(args.gradcache_batch, len(rows))
    state = {k: v.clone() for k, v in setup.model.state_dict().items()}
    steppers = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for label, chunk in (("plain step", None), (f"GradCache, chunks of {args.gradcache_chunk}", args.gradcache_chunk)):
            trainer = ClipNegTrainer(
                model=setup.model,
                args=ClipNegTrainingArguments(
                    output_dir=f"{output_dir}/{chunk}", per_device_train_batch_size=batch,
                    max_steps=args.partial_steps + 1, learning_rate=0.0, tower_training="partial", trainable_blocks=1,
                    mini_batch_size=chunk, negative_strategy="vanilla", report_to="none", save_strategy="no",
                    logging_strategy="no", disable_tqdm=True, use_cpu=device_name() == "cpu", seed=0,
                ),
                train_dataset=rows,
                processing_class=setup.processor,
            )
            steppers[label] = Stepper(label, trainer, args.partial_steps + 1)
            steppers[label].step(record=False)  # warm-up
        for _ in range(args.partial_steps):  # interleaved, so load drift hits both alike
            for stepper in steppers.values():
                stepper.step(record=True)
    setup.model.load_state_dict(state)
    times = {label: float(np.mean(stepper.totals())) for label, stepper in steppers.items()}
    plain, cached = times.values()
    header(f"GradCache: {described} (first {len(rows)} rows), {setup.towers}, last block of each tower trained on "
           f"cached block inputs, batch {batch}, device {device_name()}")
    table(["step", "time (ms)", "vs plain"], [
        *[[label, f"{t * 1e3:,.0f}", f"{t / plain:.2f}x"] for label, t in times.items()],
    ])
    print(f"{args.partial_steps} steps per variant after a warm-up, interleaved; the same gradients (tests/test_gradcache.py). "
          f"Target: GradCache at most 1.3x the plain step ({cached / plain:.2f}x here).")


# --------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------


def clustered_vectors(n_rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """L2-normalised float32 vectors around sqrt(n) random centres (a clustered embedding layout)."""
    rng = np.random.default_rng(seed)
    n_centres = max(4, int(math.sqrt(n_rows)))
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n_rows, dim), dtype=np.float32)
    for start in range(0, n_rows, 100_000):
        stop = min(start + 100_000, n_rows)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * np.float32(0.8 / math.sqrt(dim))
        out[start:stop] = centres[rng.integers(0, n_centres, stop - start)] + noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def bench_retrieval(args: argparse.Namespace) -> None:
    from hf_clipneg.retrieval import ClipNegRetriever
    from hf_clipneg.testing import build_tiny_dual_encoder

    dim, k = 256, 10
    retriever = ClipNegRetriever(*build_tiny_dual_encoder(projection_dim=dim), device="cpu")
    sizes = [2_000] if args.smoke else [n for n in (10_000, 1_000_000) if n <= args.max_rows]
    n_queries = 100 if args.smoke else args.queries
    rows = []
    loads = []
    for n in sizes:
        vectors = clustered_vectors(n + n_queries, dim)
        queries, vectors = vectors[:n_queries].copy(), vectors[n_queries:]
        results: dict[str, Any] = {}
        for index_type in ("flat", "ivf"):
            loads.append(os.getloadavg()[0])
            extra = {"nlist": _nlist(args.ivf_nlist, n)} if (index_type == "ivf" and args.ivf_nlist != "default") else {}
            build, _ = timed(lambda: retriever.index_embeddings(vectors, target="images", index_type=index_type, **extra))
            collection = retriever._collections["images"]  # noqa: SLF001 (for nlist / nprobe in the table only)
            search_embeddings = retriever.search_embeddings
            search_embeddings(queries[:10], k=k)  # warm-up
            search, hits = timed(lambda: search_embeddings(queries, k=k))
            results[index_type] = (build, search, hits, collection.nlist, collection.nprobe)
        exact = [{h.id for h in row} for row in results["flat"][2]]
        approx = [{h.id for h in row} for row in results["ivf"][2]]
        recall = statistics.mean(len(e & a) / len(e) for e, a in zip(exact, approx))
        flat_qps = n_queries / results["flat"][1]
        for index_type, (build, search, _, nlist, nprobe) in results.items():
            qps = n_queries / search
            setting = "exact" if index_type == "flat" else f"nlist {nlist}, nprobe {nprobe}"
            rows.append([
                f"{n:,}", index_type, setting, f"{build:.2f}", f"{qps:,.0f}", f"{qps / flat_qps:.1f}x",
                "1.000" if index_type == "flat" else f"{recall:.3f}",
            ])
        del vectors, results
        retriever._collections["images"] = None  # noqa: SLF001 (free the index before the next size)
    header(f"Retrieval: {dim}-d clustered L2-normalised float32 vectors, {n_queries} held-out queries, k={k}, "
           f"{'GPU' if _faiss_gpu() else 'CPU'} faiss (1-min load during the runs: "
           f"{min(loads):.1f}..{max(loads):.1f})")
    table(["vectors", "index", "setting", "build (s)", "queries/s (search_embeddings)", "speed vs flat",
           f"recall@{k} vs exact"], rows)


def _nlist(rule: str, n: int) -> int:
    return max(1, int(round(math.sqrt(n)))) if rule == "sqrt" else int(rule)


def _faiss_gpu() -> bool:
    from hf_clipneg._faiss import faiss_gpu_count

    return faiss_gpu_count() > 0


# --------------------------------------------------------------------------------------------------


SECTIONS = ("mining", "features", "trainer", "epoch", "partial", "gradcache", "retrieval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny towers and sizes: a few seconds, for CI")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--max-rows", type=int, default=1_000_000, help="skip mining / retrieval sizes above this")
    parser.add_argument("--rows", type=int, default=256, help="synthetic rows for feature extraction and training")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved fp32/bf16 rounds of feature extraction")
    parser.add_argument("--steps", type=int, default=10, help="timed trainer steps (each trainer)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--micro-reps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="always print the cProfile listing of ClipNeg steps")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; smoke: 1)")
    parser.add_argument("--queries", type=int, default=1000, help="retrieval queries")
    parser.add_argument("--epoch-batch-size", type=int, default=256, help="epoch section: training batch")
    parser.add_argument("--tower-steps", type=int, default=3, help="epoch section: timed steps of the tower path")
    parser.add_argument("--extraction-sample", type=int, default=128, help="epoch section: rows timed for extraction")
    parser.add_argument("--partial-rows", type=int, default=512, help="partial section: rows it trains on")
    parser.add_argument("--partial-steps", type=int, default=2, help="partial and gradcache sections: timed steps")
    parser.add_argument("--gradcache-rows", type=int, default=256, help="gradcache section: rows it trains on")
    parser.add_argument("--gradcache-batch", type=int, default=128, help="gradcache section: contrastive batch")
    parser.add_argument("--gradcache-chunk", type=int, default=32, help="gradcache section: mini_batch_size")
    parser.add_argument(
        "--ivf-nlist", default="default",
        help="IVF lists: 'default' (the library's 4*sqrt(N), trained on all N vectors: slow at 1M on few cores), "
        "'sqrt' (sqrt(N): faiss then trains on a 256*nlist sample), or a number",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.batch_size, args.rounds = 24, 8, 1
        args.steps, args.warmup_steps, args.micro_reps, args.profile_steps = 3, 1, 2, 1
        args.epoch_batch_size, args.tower_steps, args.extraction_sample = 8, 2, 8
        args.partial_rows, args.partial_steps = 16, 1
        args.gradcache_rows, args.gradcache_batch, args.gradcache_chunk = 16, 8, 3
        # One thread: on a busy CI runner, tiny multi-threaded ops mostly wait on descheduled peer threads.
        args.threads = args.threads or 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import datasets
    import torch

    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# hf_clipneg speed{' (smoke)' if args.smoke else ''}\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {device_name()}; {load_average()} at start.")
    failures = []
    setup = None
    for section in args.sections:
        started = time.perf_counter()
        try:
            if section in ("features", "trainer", "epoch", "partial", "gradcache") and setup is None:
                setup = Setup(args)
            if section == "mining":
                bench_mining(args)
            elif section == "features":
                bench_features(args, setup)
            elif section == "trainer":
                bench_trainer(args, setup)
            elif section == "epoch":
                bench_epoch(args, setup)
            elif section == "partial":
                bench_partial(args, setup)
            elif section == "gradcache":
                bench_gradcache(args, setup)
            else:
                bench_retrieval(args)
        except Exception:  # report every section even if one breaks; exit non-zero at the end
            failures.append(section)
            print(f"\n**{section} failed:**\n```\n{traceback.format_exc()}```\n", flush=True)
        print(f"_{section}: {time.perf_counter() - started:.0f} s wall_\n", flush=True)
    if failures:
        print(f"Failed sections: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
