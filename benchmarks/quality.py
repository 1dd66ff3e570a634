"""Retrieval quality of hf_clipneg's negative strategies on real product data, trained by the product itself.

    python benchmarks/quality.py --smoke          # tiny random towers, synthetic data, seconds (CI)
    python benchmarks/quality.py                  # fashion-products (../shared), ~40 min on 2 busy CPU cores
    python benchmarks/quality.py --data user/ds --image-column img --caption-column text --category-columns ""

Every run is the library's own path, nothing else:

    model, processor = build_dual_encoder()                                  # after torch.manual_seed(seed)
    featured = compute_features(split, model, processor, caption_column=...) # datasets cache, once per machine
    mined, stats = mine_negatives(featured, MiningConfig(...))                # one per rule and training set
    trainer = ClipNegTrainer(model, ClipNegTrainingArguments(...), train_dataset=mined,
                             eval_dataset={"validation": ..., "test": ...}, processing_class=processor)
    trainer.train(); trainer.evaluate(...)                                   # both relevance protocols

In the frozen regimes (`tower_training="frozen"`, given explicitly) the trainer trains the projections and the
logit scale on the cached tower features by itself. A row of the tables is reproduced by those calls with the
settings below (the benchmark renames the caption column to `caption` and adds an int `category` column after
`compute_features`; nothing else touches the data).

Settings (all through public options): packaged EfficientNet-Lite0 + all-MiniLM-L6-v2 towers, text mean-pooled
(`config.text_pooling="mean"`), captions cut at 64 tokens; projections 256-d initialised by
`torch.manual_seed(seed); build_dual_encoder()`; `ClipNegTrainingArguments` defaults except learning_rate 1e-3,
weight_decay 0.01, per_device_train_batch_size 256, max_steps (chosen below), seed; so AdamW, linear decay to 0,
no warm-up, `max_logit_scale` 100, `mined_negatives_per_row` 0. One torch thread per process; `--workers`
processes run in parallel.

Steps:

1. Features: `compute_features` on each raw split (exactly the call above, so its datasets cache is hit).
2. Regimes: `single` (one caption per image, shuffled batches), `crowdedNN` (the same rows with
   `train_sampler="crowded"`, `crowded_share` NN/100, groups = image k-means k=32 via
   `hf_clipneg.clustering.cluster_features` in the `crowd_group` column: batches crowded with similar products,
   like a one-category shop or category-sorted shards) and `many` (the caption plus one row per attribute-built
   description of the product, same image: many texts per image, like reviews; the new rows get their features
   from `compute_features(rows, ..., known=featured_train)`). The in-batch false-negative rate of each regime is
   measured on the batches the trainer trains on: its samplers are reproduced with the same seed
   (`_quality_lib.sampler_batches`; tests/test_benchmark_batches.py checks them against the trainer's batches),
   over every step of every seed.
3. Rules, mined once per training set: the paper's `MiningConfig(strategy="cluster", evidence="image_cluster",
   n_image_clusters=128)` (serves `vanilla`, `random` (the paper's control: drops the share of pairs the cluster
   rule flags), `cluster` and `cluster_weighted` through `ClipNegTrainingArguments(negative_strategy=...)`, the
   trainer's documented override), the library default `MiningConfig()` (`default`) and the oracle
   `MiningConfig(evidence="group", group_column="category")` on the true category codes (`oracle`). The share of
   each strategy's masked in-batch pairs, their precision (same category) and recall (share of the same-category
   pairs masked) are measured with `hf_clipneg.mining.pair_weights` on the first 40 training batches of seed 0.
4. Steps: per regime, vanilla trains for each of --step-candidates steps (separate runs: the linear schedule
   depends on max_steps) with the first --selection-seeds seeds (default 1, for the time budget), and the count with the
   best mean validation category t->i R@1 (instance R@1 without categories) is every strategy's budget in that
   regime. The runs at that count are vanilla's rows of the tables for those seeds.
5. Test: every strategy, --seeds seeds (same initialisation and batch order per seed for every strategy);
   mean +- std over seeds and deltas paired with vanilla; "share" = share of the oracle's gain, printed only where
   the oracle's gain exceeds its own std. Relevance: `category` = an image with the query product's
   article_type, base_colour and gender (`retrieval_group_column="category"`); `instance` = an image with exactly
   the query's caption (the trainer's default).
6. Text embedding: vanilla in the `single` regime at its chosen steps with every other --text-pooling
   (`build_dual_encoder(text_pooling="pooler")`: BERT's CLS pooler, what a plain VisionTextDualEncoderModel
   uses), on validation. Its image features come from the mean-pooled run through `compute_features(...,
   known=...)` (same vision tower and processor, so the same image features; `known` must carry the pooler
   model's provenance, copied from a one-row `compute_features` call, and placeholder captions, so that only the
   texts are embedded: a user simply runs `compute_features` with the pooler model, same numbers, ~30 min longer).

Losses and batches: `--losses infonce,sigmoid --batch-sizes 1024,4096` adds, for each regime of
`--sweep-regimes` (default `single`), `<regime>-sigmoid` (`contrastive_loss="sigmoid"`: SigLIP's loss with the
rule's weights) and `<regime>-b1024`... regimes (`per_device_train_batch_size`; `all` = the whole training set in
one batch, `<regime>-ball`); steps are chosen per regime as above, among the candidates scaled to the same training
rows (`--step-scaling rows`) or the same step counts (`steps`: bigger batches see more rows), and each regime's
default rule is chosen on validation by `choose_default` (robust to ties and noise). Then per data regime the
setting (loss, batch, depth, with its chosen rule) is chosen the same way against the base setting's vanilla
(InfoNCE, --batch-size, frozen towers; `choose_settings`), and its test R@1 is reported as a ratio to the base.

Depths: `--depths frozen,partial` adds, for each regime in `--partial-regimes`, a `<regime>-partial` regime
trained with `tower_training="partial", trainable_blocks=--trainable-blocks` (the last blocks of both towers
train). The trainer then caches the input of each tower's first trainable block once
(`hf_clipneg.block_features.compute_block_inputs`, content-addressed, so all rules of a split share it; the
benchmark computes it in the parent before the workers start) and runs only the trainable blocks on every step.
Tower weights are reset to the pretrained ones before each run. The frozen prefix runs once over every image of
train/validation/test: on 2 CPU cores that alone is about as long as the feature extraction (~1 h for
fashion-products); later runs read it from the datasets cache.

Outputs in --output-dir (default benchmarks/results): quality_results.json (per-seed numbers, settings, mining
statistics, timings), quality_tables.md (the tables the README shows), quality_gain_vs_fn.png (gain over vanilla
against the in-batch false-negative rate), quality.log. `--tables-from results.json` only re-renders the tables
and the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _quality_lib as Q  # noqa: E402

logger = logging.getLogger("quality")
REPO = Q.REPO
DEFAULT_DATA = Q.DEFAULT_DATA

#: strategy -> (mined rule it trains on, ClipNegTrainingArguments.negative_strategy; None = the rule's own)
STRATEGIES = {
    "vanilla": (None, "vanilla"),  # no mining needed: the featured training set
    "random": ("paper", "random"),
    "cluster": ("paper", "cluster"),
    "cluster_weighted": ("paper", "cluster_weighted"),
    "default": ("default", None),
    "oracle": ("oracle", None),
    "guided": (None, "vanilla"),  # vanilla's batches, plus guided_negative_margin=--guided-margin
}
LABELS = {
    "vanilla": "vanilla",
    "random": "random (paper's control)",
    "cluster": "cluster (paper, image k-means k={k})",
    "cluster_weighted": "cluster_weighted (paper's full rule)",
    "default": "**default** (`MiningConfig()`)",
    "oracle": "oracle (mask same category)",
    "guided": "guided (mask what the model scores above the positive − margin)",
}
PROTOCOLS = {"cat": Q.CATEGORY, "inst": None}  # name -> retrieval_group_column
#: The label-free rules the default is chosen among, simplest (vanilla-equivalent) first: not `random` (the paper's
#: control) nor `oracle` (it reads the labels).
DEFAULT_CANDIDATES = ("vanilla", "default", "guided", "cluster", "cluster_weighted")
MEASURE_BATCHES = 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Hub id, folder of <split>.parquet, or save_to_disk dir")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="title")
    p.add_argument("--category-columns", default="article_type,base_colour,gender",
                   help="comma-separated columns defining the category protocol and the oracle ('' = none)")
    p.add_argument("--description-templates", default="|".join(Q.DESCRIPTION_TEMPLATES),
                   help="'|'-separated templates over columns for the many-texts regime")
    p.add_argument("--regimes", default="single,crowded50,crowded100,many",
                   help="single, crowdedNN (NN%% of each batch from the group-sorted stream), many")
    p.add_argument("--strategies", default=",".join(s for s in STRATEGIES if s != "guided"),
                   help="any of " + ", ".join(STRATEGIES))
    p.add_argument("--guided-margin", type=float, default=0.0,
                   help="the `guided` strategy's guided_negative_margin (cosine units)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--step-candidates", default="120,240,360",
                   help="max_steps vanilla tries per regime; the best on validation is every strategy's budget")
    p.add_argument("--selection-seeds", type=int, default=1,
                   help="seeds of the vanilla runs that choose the steps (the first seeds of --seeds)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--paper-clusters", type=int, default=128, help="k of the paper rule's image k-means")
    p.add_argument("--crowding-groups", type=int, default=32, help="k of the image k-means groups of crowded batches")
    p.add_argument("--text-pooling", default="mean,pooler",
                   help="first: the text pooling of every run; the others: vanilla on validation for comparison")
    p.add_argument("--depths", default="frozen", help="frozen[,partial]: partial adds <regime>-partial regimes")
    p.add_argument("--losses", default="infonce",
                   help="infonce[,sigmoid]: each other loss adds <regime>-<loss> regimes (contrastive_loss=...)")
    p.add_argument("--batch-sizes", default="",
                   help="contrastive batches besides --batch-size: each adds <regime>-b<N> regimes; 'all' = the "
                        "whole training set in one batch (<regime>-ball) ('' = none)")
    p.add_argument("--step-scaling", choices=("rows", "steps"), default="rows",
                   help="rows: step candidates scaled so every batch size sees the same training rows; steps: the "
                        "same step counts at every batch size (bigger batches see more rows)")
    p.add_argument("--sweep-regimes", default="single",
                   help="the regimes (and their -partial variants) that --losses and --batch-sizes multiply")
    p.add_argument("--partial-regimes", default="single", help="the regimes that get a -partial variant")
    p.add_argument("--trainable-blocks", type=int, default=1, help="last blocks of each tower trained at partial depth")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes (1 torch thread each)")
    p.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny random towers + synthetic data, seconds")
    p.add_argument("--tables-from", default=None, metavar="JSON",
                   help="only re-render quality_tables.md and the plot from an existing quality_results.json")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Preparation: towers, features, regimes, mined rules
# --------------------------------------------------------------------------------------------------


def build_towers(smoke: bool, pooling: str) -> tuple[Any, Any]:
    if smoke:
        from hf_clipneg.testing import build_tiny_dual_encoder

        model, processor = build_tiny_dual_encoder()
        model.config.text_pooling = pooling
        return model, processor
    from hf_clipneg.towers import build_dual_encoder

    return build_dual_encoder(device="cpu", text_pooling=pooling)


PROJECTION_STATE = ("visual_projection.weight", "text_projection.weight", "logit_scale")


def initial_state(seed: int, pooling: str, smoke: bool, base: Any) -> dict[str, torch.Tensor]:
    """The projections and logit scale of `torch.manual_seed(seed); build_dual_encoder(text_pooling=pooling)`
    (`--smoke`: the tiny towers' projections re-initialised after `torch.manual_seed(seed)`)."""
    if smoke:
        torch.manual_seed(seed)
        model = base
        model.visual_projection.reset_parameters()
        model.text_projection.reset_parameters()
        with torch.no_grad():
            model.logit_scale.fill_(model.config.logit_scale_init_value)
    else:
        from hf_clipneg.towers import build_dual_encoder

        torch.manual_seed(seed)
        model, _ = build_dual_encoder(device="cpu", text_pooling=pooling)
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in PROJECTION_STATE}


def other_pooling_features(raw: dict, featured: dict, model: Any, processor: Any, image_column: str,
                           caption_column: str, splits=("train", "validation")) -> dict:
    """`compute_features` of `raw` splits for `model` (same towers, other text pooling), reusing the image
    features of `featured` (the vision tower and processor are the same, so the image features are too).

    `compute_features(known=...)` accepts only a dataset with the same stored provenance, and the text pooling is
    part of it; so `known` is `featured` with the provenance `compute_features` writes for `model` (taken from a
    one-row call) and placeholder captions, so that no text feature is reused. Only the texts are embedded."""
    from hf_clipneg.features import compute_features

    probe = compute_features(raw["validation"].select([0]), model, processor, image_column=image_column,
                             caption_column=caption_column)
    out = {}
    for split in splits:
        n = len(featured[split])
        known = featured[split].remove_columns([caption_column]).add_column(
            caption_column, [f"\u0000placeholder {i}" for i in range(n)])
        known.info.description = probe.info.description
        out[split] = compute_features(raw[split], model, processor, image_column=image_column,
                                      caption_column=caption_column, known=known)
    return out


def regime_spec(name: str) -> dict[str, Any]:
    if name == "single":
        return {"train_key": "train", "sampler": "random", "share": None}
    if name == "many":
        return {"train_key": "many", "sampler": "random", "share": None}
    if name.startswith("crowded") and name[7:].isdigit() and 0 < int(name[7:]) <= 100:
        return {"train_key": "train", "sampler": "crowded", "share": int(name[7:]) / 100}
    raise ValueError(f"Unknown regime {name!r}: use single, many or crowdedNN with NN in 1..100.")


def expand_regimes(regimes: dict[str, dict], args: argparse.Namespace) -> dict[str, dict]:
    """Each regime of `--sweep-regimes` once per contrastive loss (`--losses`) and batch size (`--batch-sizes`);
    the defaults (InfoNCE, `--batch-size`) keep the regime's own name."""
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    batches = [args.batch_size] + [x if x == "all" else int(x) for x in (y.strip() for y in args.batch_sizes.split(","))
                                   if x and x != str(args.batch_size)]
    swept = {r.strip() for r in args.sweep_regimes.split(",") if r.strip()}
    out = {}
    for name, spec in regimes.items():
        sweep = name.removesuffix("-partial") in swept
        for loss in losses if sweep else ["infonce"]:
            for batch in batches if sweep else [args.batch_size]:
                suffix = ("" if loss == "infonce" else f"-{loss}") + ("" if batch == args.batch_size else f"-b{batch}")
                out[name + suffix] = {**spec, "loss": loss, "batch": batch}
    return out


def regime_steps(regime: dict, candidates: list[int], base_batch: int, scaling: str = "rows") -> list[int]:
    """The step candidates of a regime: `--step-candidates` at `--batch-size`, scaled to the same number of training
    rows (epochs) at the regime's own batch size (`scaling="rows"`) or kept as they are (`"steps"`)."""
    if scaling == "steps":
        return sorted(set(candidates))
    return sorted({max(1, round(n * base_batch / regime["batch"])) for n in candidates})


def rule_configs(paper_clusters: int, has_category: bool) -> dict[str, Any]:
    from hf_clipneg.mining import MiningConfig

    rules = {
        "paper": MiningConfig(strategy="cluster", evidence="image_cluster", n_image_clusters=paper_clusters),
        "default": MiningConfig(),
    }
    if has_category:
        rules["oracle"] = MiningConfig(evidence="group", group_column=Q.CATEGORY)
    return rules


def prepare(args: argparse.Namespace, poolings: list[str]) -> dict[str, Any]:
    """Features, benchmark columns, regimes' training sets and mined datasets (everything the runs read)."""
    from hf_clipneg.clustering import cluster_features
    from hf_clipneg.features import IMAGE_FEATURES, compute_features
    from hf_clipneg.mining import mine_negatives

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    raw = Q.smoke_splits() if args.smoke else Q.load_splits(args.data)
    main_pooling = poolings[0]
    models, processor = {}, None
    models[main_pooling], processor = build_towers(args.smoke, main_pooling)
    featured = Q.featured_splits(raw, models[main_pooling], processor, args.image_column, args.caption_column)
    timings["features_s"] = time.perf_counter() - t0
    logger.info("tower features of %s ready in %.1fs", {k: len(v) for k, v in featured.items()}, timings["features_s"])

    category_columns = [c.strip() for c in args.category_columns.split(",") if c.strip()]
    has_category = bool(category_columns)
    table: dict = {}
    categories = {s: Q.codes(Q.category_keys(featured[s], category_columns), table) if has_category else None
                  for s in Q.SPLITS}
    data = {s: Q.benchmark_columns(featured[s], args.image_column, args.caption_column, categories[s]) for s in Q.SPLITS}
    regimes = {name: {**regime_spec(name), "depth": "frozen"} for name in args.regimes.split(",") if name.strip()}
    if "partial" in args.depth_list:
        for name in [r.strip() for r in args.partial_regimes.split(",") if r.strip()]:
            regimes[f"{name}-partial"] = {**regime_spec(name), "depth": "partial"}
    regimes = expand_regimes(regimes, args)
    if any(r["sampler"] == "crowded" for r in regimes.values()):
        feats = np.asarray(data["train"].with_format("numpy")[IMAGE_FEATURES], dtype=np.float32)
        groups, _ = cluster_features(feats, min(args.crowding_groups, len(feats)), seed=0)
        data["train"] = data["train"].add_column(Q.CROWD_GROUP, np.asarray(groups, dtype=np.int64).tolist())
    train_sets = {"train": data["train"]}
    info: dict[str, Any] = {"category_columns": category_columns, "n_categories": len(table)}
    if any(r["train_key"] == "many" for r in regimes.values()):
        t1 = time.perf_counter()
        templates = [t for t in args.description_templates.split("|") if t.strip()]
        rows = Q.many_rows(data["train"], templates)
        many = compute_features(rows, models[main_pooling], processor, known=data["train"])
        train_sets["many"] = many
        info["many"] = {"rows": len(many), "templates": templates,
                        "skipped_descriptions": int(np.sum(many["description_skipped"])),
                        "distinct_texts": len(set(many[Q.CAPTION]))}
        timings["many_features_s"] = time.perf_counter() - t1
        logger.info("many-texts rows: %s (%.1fs)", info["many"], timings["many_features_s"])
    for spec in regimes.values():
        if spec["batch"] == "all":
            spec["batch"] = len(train_sets[spec["train_key"]])

    # other text poolings: vanilla on validation, single regime
    pooled: dict[str, dict] = {}
    for pooling in poolings[1:]:
        t1 = time.perf_counter()
        models[pooling], _ = build_towers(args.smoke, pooling)
        other = other_pooling_features(raw, featured, models[pooling], processor, args.image_column, args.caption_column)
        pooled[pooling] = {s: Q.benchmark_columns(other[s], args.image_column, args.caption_column, categories[s])
                           for s in other}
        timings[f"{pooling}_features_s"] = time.perf_counter() - t1
        logger.info("%s-pooled text features ready in %.1fs", pooling, timings[f"{pooling}_features_s"])

    # mining: one dataset per (training set, rule)
    rules = rule_configs(args.paper_clusters, has_category)
    needed = {STRATEGIES[s][0] for s in args.strategy_list} - {None}
    mined, mining_stats = {}, {}
    t1 = time.perf_counter()
    for key in sorted({r["train_key"] for r in regimes.values()}):
        for rule in sorted(needed):
            t2 = time.perf_counter()
            mined[(key, rule)], stats = mine_negatives(train_sets[key], rules[rule])
            from hf_clipneg.mining import MiningConfig

            mining_stats[f"{key}/{rule}"] = {**stats.to_dict(), "config": MiningConfig.from_dataset(mined[(key, rule)]).to_dict(),
                                             "seconds": time.perf_counter() - t2}
            logger.info("mined %s/%s in %.1fs: flagged %.4f%% of random in-batch pairs", key, rule,
                        time.perf_counter() - t2, 100 * stats.evidence_flagged_fraction)
    timings["mining_s"] = time.perf_counter() - t1
    if any(r["depth"] == "partial" for r in regimes.values()):
        t1 = time.perf_counter()
        precompute_block_inputs(args, regimes, models[main_pooling], processor, train_sets, mined, data)
        timings["block_inputs_s"] = time.perf_counter() - t1
    evals = {pooling: {"validation": data["validation"], "test": data["test"]} for pooling in poolings[:1]}
    for pooling, splits in pooled.items():
        evals[pooling] = {"validation": splits["validation"]}
    trains = {(key, poolings[0]): ds for key, ds in train_sets.items()}
    for pooling, splits in pooled.items():
        trains[("train", pooling)] = splits["train"]
    info["rows"] = {k: len(v) for k, v in train_sets.items()}
    return {"models": models, "processor": processor, "trains": trains, "mined": mined, "evals": evals,
            "regimes": regimes, "has_category": has_category, "info": info, "mining": mining_stats,
            "timings": timings, "train_sets": train_sets}


def tail_starts(model: Any, trainable_blocks: int) -> tuple[int, int]:
    from hf_clipneg.tower_tails import tail_start

    starts = (tail_start(model.vision_model, trainable_blocks), tail_start(model.text_model, trainable_blocks))
    if None in starts:
        raise SystemExit(f"--trainable-blocks {trainable_blocks}: these towers cannot be cut there.")
    return starts


def precompute_block_inputs(args, regimes, model, processor, train_sets, mined, data) -> None:
    """The trainer's `compute_block_inputs` calls, made once in the parent so that the workers read the cache."""
    from hf_clipneg.block_features import compute_block_inputs

    starts = tail_starts(model, args.trainable_blocks)
    keys = {r["train_key"] for r in regimes.values() if r["depth"] == "partial"}
    datasets = [train_sets[k] for k in keys] + [data["validation"], data["test"]]
    datasets += [ds for (key, _), ds in mined.items() if key in keys]  # same rows: read from the cache
    for dataset in datasets:
        compute_block_inputs(dataset, model, processor, starts)


# --------------------------------------------------------------------------------------------------
# One run: ClipNegTrainer on the cached tower features, then its evaluate()
# --------------------------------------------------------------------------------------------------

_CTX: dict[str, Any] = {}  # set in the parent before the worker pool forks (copy-on-write)


def training_arguments(args: argparse.Namespace, regime: dict, strategy: str, seed: int, steps: int, output_dir: str):
    from hf_clipneg.training import ClipNegTrainingArguments

    sampler = {"train_sampler": regime["sampler"]}
    if regime["sampler"] == "crowded":
        sampler.update(crowded_share=regime["share"], sampler_group_column=Q.CROWD_GROUP)
    return ClipNegTrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=regime["batch"],
        contrastive_loss=regime["loss"],
        per_device_eval_batch_size=1024, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        negative_strategy=STRATEGIES[strategy][1], seed=seed, report_to="none", save_strategy="no",
        guided_negative_margin=args.guided_margin if strategy == "guided" else None,
        logging_strategy="no", disable_tqdm=True, use_cpu=True, tower_training=regime["depth"],
        trainable_blocks=args.trainable_blocks, **sampler,
    )


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one (regime, strategy, seed, steps, text pooling) with ClipNegTrainer and evaluate it."""
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging

    from hf_clipneg.training import ClipNegTrainer

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    ctx, args = _CTX, _CTX["args"]
    started = time.perf_counter()
    regime = ctx["regimes"][spec["regime"]]
    rule = STRATEGIES[spec["strategy"]][0]
    train = ctx["trains"][(regime["train_key"], spec["pooling"])] if rule is None else ctx["mined"][(regime["train_key"], rule)]
    model = ctx["models"][spec["pooling"]]
    if ctx["towers"]:  # a partial-depth run in this process may have trained the towers' last blocks
        model.load_state_dict(ctx["towers"][spec["pooling"]], strict=False)
    missing, unexpected = model.load_state_dict(ctx["init"][(spec["pooling"], spec["seed"])], strict=False)
    assert not unexpected, unexpected
    out_dir = tempfile.mkdtemp(prefix="quality-run-")
    try:
        targs = training_arguments(args, regime, spec["strategy"], spec["seed"], spec["steps"], out_dir)
        trainer = ClipNegTrainer(model, targs, train_dataset=train, eval_dataset=ctx["evals"][spec["pooling"]],
                                 processing_class=ctx["processor"])
        trainer.remove_callback(PrinterCallback)
        if not trainer.cached_tower_features:
            raise RuntimeError("ClipNegTrainer did not train on cached tower features; the benchmark would run the "
                               "towers every step. Check the feature provenance of the training set.")
        init_s = time.perf_counter() - started
        t0 = time.perf_counter()
        output = trainer.train()
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        evals: dict[str, dict] = {}
        for split, dataset in trainer.eval_dataset.items():
            for proto, column in PROTOCOLS.items():
                if proto == "cat" and not ctx["has_category"]:
                    continue
                trainer.args.retrieval_group_column = column
                metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix="m")
                evals.setdefault(split, {})[proto] = {
                    k[2:]: float(v) for k, v in metrics.items() if ("R@" in k or "rank" in k or k == "m_loss")}
        eval_s = time.perf_counter() - t0
        result = {**spec, "evals": evals, "train_loss": float(output.training_loss),
                  "logit_scale": float(model.logit_scale.detach().exp()), "init_s": init_s, "train_s": train_s,
                  "eval_s": eval_s, "seconds": time.perf_counter() - started}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


def run_specs(specs: list[dict[str, Any]], desc: str) -> list[dict[str, Any]]:
    """Run specs on the worker pool (or inline), in order; logs one line per finished run."""
    from tqdm.auto import tqdm

    pool = _CTX.get("pool")
    results: list[Any] = [None] * len(specs)
    iterator = (pool.imap_unordered(_indexed_run, list(enumerate(specs))) if pool is not None
                else (_indexed_run(item) for item in enumerate(specs)))
    for index, result in tqdm(iterator, total=len(specs), desc=desc, file=sys.stderr, mininterval=10):
        results[index] = result
        e = result["evals"]
        parts = [f"{split[:4]} " + " ".join(f"{p} {m['t2i_R@1']:.2f}" for p, m in protos.items()) for split, protos in e.items()]
        logger.info("[%s] %-16s seed %d %4d steps %-6s %s | %.1fs (train %.1fs = %.3fs/step)", result["regime"],
                    result["strategy"], result["seed"], result["steps"], result["pooling"], "  ".join(parts),
                    result["seconds"], result["train_s"], result["train_s"] / max(result["steps"], 1))
    return results


def _indexed_run(item: tuple[int, dict]) -> tuple[int, dict]:
    index, spec = item
    return index, run_one(spec)


# --------------------------------------------------------------------------------------------------
# Measurements on the training batches (no training)
# --------------------------------------------------------------------------------------------------


def regime_batches(ctx: dict, name: str, steps: int, seed: int) -> list[np.ndarray]:
    regime = ctx["regimes"][name]
    train = ctx["train_sets"][regime["train_key"]]
    groups = np.asarray(train[Q.CROWD_GROUP]) if regime["sampler"] == "crowded" else None
    return Q.sampler_batches(len(train), regime["batch"], steps, seed, regime["sampler"], groups,
                             regime["share"] or 0.5)


def row_keys(ctx: dict, train_key: str) -> dict[str, np.ndarray | None]:
    """Per training row: category code, image identity (hf_clipneg.features.image_keys) and caption identity."""
    from hf_clipneg.features import image_keys
    from hf_clipneg.metrics import groups_from_captions

    train = ctx["train_sets"][train_key]
    return {
        "category": np.asarray(train[Q.CATEGORY]) if ctx["has_category"] else None,
        "image": Q.codes(image_keys(train, Q.IMAGE)),
        "text": groups_from_captions(train[Q.CAPTION]),
    }


def masked_pairs(ctx: dict, regime: str, strategy: str, batches: list[np.ndarray], category: np.ndarray | None) -> dict:
    """Share of in-batch negative pairs `strategy` masks (weight 0, or < 1 when down-weighting) on `batches`, their
    precision (share in the same category), recall (share of the same-category pairs masked) and the mean weight of
    the negatives: `pair_weights` on the mined columns, as the trainer computes them (step = the batch's global
    step)."""
    from hf_clipneg.training.collator import META_COLUMNS, ClipNegCollator
    from hf_clipneg.mining import DuplicateAction, MiningConfig, pair_weights

    rule, override = STRATEGIES[strategy]
    if strategy == "guided":  # masks depend on the model during training: not measured on the mined columns
        return {"masked_fraction": None, "precision": None, "recall": None, "mean_weight": None}
    if rule is None:
        return {"masked_fraction": 0.0, "precision": None, "recall": 0.0 if category is not None else None,
                "mean_weight": 1.0}
    mined = ctx["mined"][(ctx["regimes"][regime]["train_key"], rule)]
    config = MiningConfig.from_dataset(mined)
    if override is not None:
        config = dataclasses.replace(config, strategy=override)
    table = mined.select_columns([c for c in META_COLUMNS if c in mined.column_names]).with_format("numpy")
    collate = ClipNegCollator(ctx["processor"], cached_features=True)
    masked = hits = pairs = same = 0
    weight_sum = 0.0
    for step, index in enumerate(batches):
        columns = table[index.tolist()]
        rows = [{name: values[i] for name, values in columns.items()} for i in range(len(index))]
        meta = {k: v for k, v in collate(rows).items() if k in META_COLUMNS}
        weights, _ = pair_weights(meta, config, step=step)
        off = ~torch.eye(len(index), dtype=torch.bool)
        flagged = ((weights < 1.0 - 1e-6) if config.duplicate_action == DuplicateAction.DOWNWEIGHT else (weights < 1e-6)) & off
        masked += int(flagged.sum())
        weight_sum += float(weights[off].sum())
        pairs += int(off.sum())
        if category is not None:
            cat = torch.as_tensor(category[index])
            same_category = (cat[:, None] == cat[None, :]) & off
            hits += int((flagged & same_category).sum())
            same += int(same_category.sum())
    return {"masked_fraction": masked / pairs, "precision": hits / masked if masked and category is not None else None,
            "recall": hits / same if same else None, "mean_weight": weight_sum / pairs}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tables_from:
        report = json.loads(Path(args.tables_from).read_text())
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        has_category = bool(report["data"]["category_columns"])
        tables = render_tables(report, args, has_category)
        (out_dir / "quality_tables.md").write_text(tables)
        plot(report, out_dir / "quality_gain_vs_fn.png", has_category)
        print(tables)
        return 0
    out_dir = Path(args.output_dir)
    if args.smoke:
        out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "hf_clipneg_quality_smoke" / "results"
        args.caption_column, args.image_column = "caption", "image"
        args.category_columns = "shape,colour"
        args.description_templates = "{colour} {shape}|a {size} {colour} {shape}"
        args.seeds, args.step_candidates, args.batch_size = min(args.seeds, 2), "2,4", 32
        args.paper_clusters, args.crowding_groups = 8, 4
        if args.regimes == parse_args([]).regimes:  # keep CI fast: one crowded regime exercises the sampler
            args.regimes = "single,crowded50,many"
        if args.depths == parse_args([]).depths:  # and the partial-depth path runs too
            args.depths = "frozen,partial"
        if args.losses == parse_args([]).losses and not args.batch_sizes:  # and the sigmoid loss, a second batch
            args.losses, args.batch_sizes = "infonce,sigmoid", "64"
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True,
                        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(out_dir / "quality.log", mode="w")])
    for noisy in ("transformers", "datasets", "hf_clipneg", "faiss", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    args.depth_list = [d.strip() for d in args.depths.split(",") if d.strip()]
    if "frozen" not in args.depth_list or not set(args.depth_list) <= {"frozen", "partial"}:
        raise SystemExit(f"--depths {args.depths}: use 'frozen' or 'frozen,partial'.")
    args.strategy_list = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(args.strategy_list) - set(STRATEGIES))
    if unknown or "vanilla" not in args.strategy_list:
        raise SystemExit(f"--strategies must include vanilla and be among {list(STRATEGIES)} (unknown: {unknown}).")
    poolings = [p.strip() for p in args.text_pooling.split(",") if p.strip()]
    candidates = sorted({int(s) for s in args.step_candidates.split(",") if s.strip()})
    from hf_clipneg._faiss import import_faiss

    started = time.perf_counter()
    ctx = prepare(args, poolings)  # alone on the machine (the workers have not started): every core
    # One torch/faiss thread per process from here on: with OpenMP spin-waits, 2 threads on 2 busy cores ran
    # several times slower than 1 here; parallelism comes from --workers processes instead.
    torch.set_num_threads(1)
    import_faiss().omp_set_num_threads(1)
    if "oracle" in args.strategy_list and not ctx["has_category"]:
        args.strategy_list.remove("oracle")
    has_category = ctx["has_category"]
    metric = "cat" if has_category else "inst"
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    ctx["init"] = {(p, s): initial_state(s, p, args.smoke, ctx["models"][p]) for p in poolings for s in seeds}
    ctx["towers"] = {p: {k: v.detach().clone() for k, v in m.state_dict().items() if k.split(".")[0] in
                         ("vision_model", "text_model")} for p, m in ctx["models"].items()
                     } if "partial" in args.depth_list else {}
    ctx["timings"]["init_states_s"] = time.perf_counter() - t0
    ctx["args"] = args
    _CTX.update(ctx)
    prep_s = time.perf_counter() - started
    logger.info("prepared in %.1fs; regimes %s, strategies %s, seeds %s, step candidates %s, %d worker(s)",
                prep_s, list(ctx["regimes"]), args.strategy_list, seeds, candidates, args.workers)
    # Everything prepared so far lives for the whole run: keep it out of the garbage collector, which
    # accelerate runs at the end of every train() (halves a smoke run) and which would otherwise touch (and
    # un-share) every forked page.
    gc.collect()
    gc.freeze()
    if args.workers > 1:
        import multiprocessing as mp

        _CTX["pool"] = mp.get_context("fork").Pool(args.workers)

    report: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items()}, "data": ctx["info"],
                              "mining": ctx["mining"],
                              "select_metric": ("category" if metric == "cat" else "instance") + " t→i R@1",
                              "regimes": {}, "runs": [], "timings": ctx["timings"]}
    report["settings"]["poolings"] = poolings
    report["environment"] = _environment()

    # 1. steps: vanilla at every candidate budget on the selection seeds, on validation (and test: the runs at the
    # chosen budget are vanilla's rows of the tables)
    t0 = time.perf_counter()
    selection_seeds = seeds[: max(1, min(args.selection_seeds, len(seeds)))]
    steps_of = {r: regime_steps(spec, candidates, args.batch_size, args.step_scaling) for r, spec in ctx["regimes"].items()}
    specs = [{"kind": "select", "regime": r, "strategy": "vanilla", "seed": s, "steps": n, "pooling": poolings[0]}
             for r in ctx["regimes"] for n in steps_of[r] for s in selection_seeds]
    selection = run_specs(specs, "vanilla step selection")
    report["timings"]["selection_s"] = time.perf_counter() - t0
    chosen: dict[str, int] = {}
    for r in ctx["regimes"]:
        curve = {}
        for n in steps_of[r]:
            values = [x["evals"]["validation"][metric]["t2i_R@1"] for x in selection if x["regime"] == r and x["steps"] == n]
            curve[n] = Q.mean_std(values)
        chosen[r] = max(steps_of[r], key=lambda n: (round(curve[n][0], 6), -n))
        report["regimes"][r] = {**ctx["regimes"][r], "step_curve": {str(n): v for n, v in curve.items()}, "steps": chosen[r]}
        logger.info("[%s] vanilla validation %s t2i R@1 by steps: %s -> %d steps", r, metric,
                    {n: round(v[0], 2) for n, v in curve.items()}, chosen[r])
    runs = [x for x in selection if x["steps"] == chosen[x["regime"]]]

    # 2. every strategy at the chosen budget (vanilla: the seeds the selection did not run); other text poolings
    # (vanilla, single regime, validation)
    t0 = time.perf_counter()
    specs = [{"kind": "final", "regime": r, "strategy": st, "seed": s, "steps": chosen[r], "pooling": poolings[0]}
             for r in ctx["regimes"] for st in args.strategy_list for s in seeds
             if st != "vanilla" or s not in selection_seeds]
    pool_regime = "single" if "single" in ctx["regimes"] else None
    if pool_regime is None and len(poolings) > 1:
        logger.warning("text pooling comparison skipped: it runs in the single regime, which --regimes leaves out")
    if pool_regime is not None:
        specs += [{"kind": "pooling", "regime": pool_regime, "strategy": "vanilla", "seed": s, "steps": chosen[pool_regime],
                   "pooling": p} for p in poolings[1:] for s in seeds]
    finals = run_specs(specs, "strategies")
    report["timings"]["final_s"] = time.perf_counter() - t0
    if _CTX.get("pool") is not None:
        _CTX["pool"].close()
    runs += [x for x in finals if x["kind"] == "final"]
    pooling_runs = [x for x in finals if x["kind"] == "pooling"]
    report["runs"] = selection + finals

    # 3. in-batch false negatives (every step of every seed) and masked pairs (first batches of seed 0)
    t0 = time.perf_counter()
    keys = {k: row_keys(ctx, k) for k in {spec["train_key"] for spec in ctx["regimes"].values()}}
    for r, spec in ctx["regimes"].items():
        k = keys[spec["train_key"]]
        per_seed = [Q.in_batch_false_negatives(regime_batches(ctx, r, chosen[r], s), k["category"], k["image"], k["text"])
                    for s in seeds]
        fn = {name: float(np.mean([p[name] for p in per_seed])) if per_seed[0][name] is not None else None
              for name in per_seed[0]}
        report["regimes"][r]["false_negatives"] = fn
        report["regimes"][r]["rows"] = len(ctx["train_sets"][spec["train_key"]])
        batches = regime_batches(ctx, r, min(MEASURE_BATCHES, chosen[r]), 0)
        report["regimes"][r]["masked"] = {st: masked_pairs(ctx, r, st, batches, k["category"]) for st in args.strategy_list}
        logger.info("[%s] in-batch false negatives %s; masked %s", r, {a: round(b, 5) for a, b in fn.items() if b is not None},
                    {st: m["masked_fraction"] and round(m["masked_fraction"], 5)
                     for st, m in report["regimes"][r]["masked"].items()})
    report["timings"]["measure_s"] = time.perf_counter() - t0

    report["summary"] = summarise(runs, list(ctx["regimes"]), args.strategy_list, has_category)
    report["default_choice"] = choose_defaults(report["summary"], has_category)
    report["setting_choice"] = choose_settings(report, report["default_choice"], has_category)
    if pooling_runs:
        base = [x for x in runs if x["regime"] == pool_regime and x["strategy"] == "vanilla"]
        report["pooling"] = {poolings[0]: summarise_split(base, "validation")}
        for p in poolings[1:]:
            mine = sorted([x for x in pooling_runs if x["pooling"] == p], key=lambda x: x["seed"])
            report["pooling"][p] = summarise_split(mine, "validation")
            report["pooling"][p]["delta"] = {
                proto: Q.paired_delta([x["evals"]["validation"][proto]["t2i_R@1"] for x in mine],
                                      [x["evals"]["validation"][proto]["t2i_R@1"] for x in sorted(base, key=lambda x: x["seed"])])
                for proto in mine[0]["evals"]["validation"]}
    timed = [x for x in report["runs"]]
    report["timings"].update({
        "prepare_s": prep_s,
        "runs": len(timed),
        "run_s_mean": float(np.mean([x["seconds"] for x in timed])),
        "run_s_median": float(np.median([x["seconds"] for x in timed])),
        "step_s_mean": float(np.sum([x["train_s"] for x in timed]) / np.sum([x["steps"] for x in timed])),
        "run_s_sum": float(np.sum([x["seconds"] for x in timed])),
        "total_s": time.perf_counter() - started,
    })
    report["environment"]["load_average_end"] = os.getloadavg()
    tables = render_tables(report, args, has_category)
    (out_dir / "quality_tables.md").write_text(tables)
    (out_dir / "quality_results.json").write_text(json.dumps(report, indent=1, default=_json_default))
    plot(report, out_dir / "quality_gain_vs_fn.png", has_category)
    print(tables)
    logger.info("total %.1f min (%d runs, mean %.1fs per run, %.3fs per step)", report["timings"]["total_s"] / 60,
                len(timed), report["timings"]["run_s_mean"], report["timings"]["step_s_mean"])
    return 0


# --------------------------------------------------------------------------------------------------
# Summaries, tables, plot
# --------------------------------------------------------------------------------------------------

KEYS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "t2i_median_rank", "i2t_R@1")


def summarise_split(runs: list[dict], split: str) -> dict[str, Any]:
    protos = runs[0]["evals"][split]
    return {proto: {key: Q.mean_std([x["evals"][split][proto][key] for x in runs]) for key in KEYS} for proto in protos}


def summarise(runs: list[dict], regimes: list[str], strategies: list[str], has_category: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in regimes:
        by = {st: sorted([x for x in runs if x["regime"] == r and x["strategy"] == st], key=lambda x: x["seed"])
              for st in strategies}
        base = by["vanilla"]
        out[r] = {}
        for st, mine in by.items():
            if not mine:
                continue
            entry = {"seeds": [x["seed"] for x in mine], "steps": mine[0]["steps"],
                     "test": summarise_split(mine, "test"), "validation": summarise_split(mine, "validation"),
                     "seconds": float(np.sum([x["seconds"] for x in mine]))}
            for split, key in (("test", "delta"), ("validation", "validation_delta")):
                entry[key] = {proto: Q.paired_delta([x["evals"][split][proto]["t2i_R@1"] for x in mine],
                                                    [x["evals"][split][proto]["t2i_R@1"] for x in base])
                              for proto in mine[0]["evals"][split]}
            out[r][st] = entry
        if "oracle" in out[r] and has_category:
            oracle = out[r]["oracle"]["delta"]["cat"]
            for st, entry in out[r].items():
                entry["oracle_share"] = Q.oracle_share(entry["delta"]["cat"][0], oracle)
    return out


def choose_defaults(summary: dict[str, Any], has_category: bool) -> dict[str, dict[str, str]]:
    """Per regime, the label-free rule `Q.choose_default` picks from the validation R@1 deltas (category protocol,
    or instance without categories); regimes summarised before validation deltas were stored are left out."""
    proto = "cat" if has_category else "inst"
    out = {}
    for r, entries in summary.items():
        deltas = {st: tuple(entries[st]["validation_delta"][proto]) for st in DEFAULT_CANDIDATES[1:]
                  if "validation_delta" in entries.get(st, {})}
        if any("validation_delta" in entry for entry in entries.values()):
            rule, reason = Q.choose_default(deltas, DEFAULT_CANDIDATES)
            out[r] = {"rule": rule, "reason": reason}
    return out


def choose_settings(report: dict, choices: dict[str, dict[str, str]], has_category: bool) -> dict[str, dict[str, Any]]:
    """Per data regime (same rows and sampler), the setting (loss, batch, depth + its default rule in `choices`, from
    `choose_defaults`) `Q.choose_default` picks on validation against the base setting's vanilla (InfoNCE,
    --batch-size, frozen towers), cheapest first, with its test R@1 next to the base's (the ratio is the issue's
    ≥ 1.10× target)."""
    proto = "cat" if has_category else "inst"
    s, regimes, summary = report["settings"], report["regimes"], report["summary"]
    out = {}
    for base, g in regimes.items():
        if (g["loss"], g["batch"], g["depth"]) != ("infonce", s["batch_size"], "frozen") or "validation" not in summary[base]["vanilla"]:
            continue
        family = [r for r, h in regimes.items() if r != base and (h["train_key"], h["sampler"], h["share"])
                  == (g["train_key"], g["sampler"], g["share"]) and r in choices]
        if not family:
            continue
        base_runs = {x["seed"]: x for x in report["runs"] if x["regime"] == base and x["strategy"] == "vanilla"
                     and x["steps"] == g["steps"] and x["kind"] in ("select", "final")}
        rule_of = {base: "vanilla", **{r: choices[r]["rule"] for r in family}}

        def values(r: str, split: str, protocol: str) -> tuple[list[float], list[float]]:
            mine = {x["seed"]: x for x in report["runs"] if x["regime"] == r and x["strategy"] == rule_of[r]
                    and x["steps"] == regimes[r]["steps"] and x["kind"] in ("select", "final")}
            seeds = sorted(set(mine) & set(base_runs))
            return ([mine[k]["evals"][split][protocol]["t2i_R@1"] for k in seeds],
                    [base_runs[k]["evals"][split][protocol]["t2i_R@1"] for k in seeds])

        deltas = {r: Q.paired_delta(*values(r, "validation", proto)) for r in family}
        setting, reason = Q.choose_default(deltas, [base] + family, what="setting")
        test = {pr: Q.paired_delta(*values(setting, "test", pr)) if setting != base else (0.0, 0.0)
                for pr in (("cat", "inst") if has_category else ("inst",))}
        base_test = summary[base]["vanilla"]["test"][proto]["t2i_R@1"][0]
        out[base] = {"setting": setting, "rule": rule_of[setting], "reason": reason, "test_delta": test,
                     "ratio": (base_test + test[proto][0]) / base_test if base_test else None,
                     "validation_deltas": {r: list(d) for r, d in deltas.items()}}
    return out


def _environment() -> dict[str, Any]:
    import importlib.metadata as md
    import platform

    versions = {}
    for name in ("hf_clipneg", "transformers", "datasets", "torch", "accelerate"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"versions": versions, "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_start": os.getloadavg()}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _pm(pair) -> str:
    return f"{pair[0]:.2f} ± {pair[1]:.2f}"


def _share(share: float) -> str:
    return f"{'−' if share < 0 else ''}{abs(100 * share):.0f} %"


def _percent(fraction: float | None) -> str:
    """Percent with 2 decimals, 3 significant digits below 0.1 % (a rule that masks almost nothing stays visible);
    "-" where not measured."""
    if fraction is None:
        return "-"
    value = 100 * fraction
    return f"{value:.2f}%" if value == 0 or value >= 0.1 else f"{value:.3g}%"


def _delta(pair) -> str:
    sign = "+" if pair[0] >= 0.005 else ("−" if pair[0] <= -0.005 else "")
    return f"{sign}{abs(pair[0]):.2f} ± {pair[1]:.2f}"


def render_tables(report: dict, args: argparse.Namespace, has_category: bool) -> str:
    s, t = report["settings"], report["timings"]
    regimes = list(report["regimes"])
    strategies = [st for st in s["strategy_list"]]
    data = "synthetic (`--smoke`)" if s["smoke"] else f"`{s['data']}`"
    label = {k: v.format(k=s["paper_clusters"]) for k, v in LABELS.items()}
    lines = [
        "# hf_clipneg retrieval quality",
        "",
        f"`python benchmarks/quality.py{' --smoke' if s['smoke'] else ''}`: data {data} (train → every choice on "
        f"validation → test reported). Every run is `compute_features` → `mine_negatives` → `ClipNegTrainer` (frozen "
        f"towers: projections + logit scale trained on the cached tower features; `-partial` regimes also train the last "
        f"{s.get('trainable_blocks', 1)} block(s) of each tower on cached block inputs) → `trainer.evaluate()`. "
        f"Towers {'tiny random (smoke)' if s['smoke'] else 'packaged EfficientNet-Lite0 + all-MiniLM-L6-v2'}, text "
        f"pooling `{s['poolings'][0]}`; AdamW lr {s['learning_rate']:g}, weight decay {s['weight_decay']:g}, linear "
        f"decay, batch {s['batch_size']}, {s['seeds']} seeds (same initialisation and batch order for every strategy), "
        f"steps per regime chosen by vanilla on validation ({report['select_metric']}) among {s['step_candidates']}"
        f"{' (the same counts at every batch size)' if s.get('step_scaling') == 'steps' else ''}. "
        f"Relevance: category = an image of the query product's {', '.join(report['data']['category_columns']) or '-'}; "
        f"instance = an image with exactly the query's caption.",
        "",
        f"Time: {t['total_s'] / 60:.1f} min in all on {s['workers']} worker process(es) x 1 torch thread: "
        f"preparation {t['prepare_s'] / 60:.1f} min (features from the datasets cache, mining), {t['runs']} training runs "
        f"of {t['run_s_mean']:.1f} s on average ({t['step_s_mean']:.3f} s per step of {s['batch_size']} rows, "
        f"trainer set-up and 4 evaluations included in the run time); {report['environment']['cpus']} cores, load average "
        f"{report['environment']['load_average_start'][1]:.1f} at the start, {report['environment']['load_average_end'][1]:.1f} "
        f"at the end (5-min, other jobs included).",
        "",
        "## In-batch false negatives of each regime",
        "",
        "Measured on the trainer's own batch order (its samplers reproduced with the same seeds; every step of every "
        "seed at the chosen budget). Exact = same image or identical caption; category = same "
        f"{', '.join(report['data']['category_columns']) or '(no categories)'}.",
        "",
        "| regime | rows | sampler | steps | exact FN pairs | per row | same-category pairs | per row |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in regimes:
        g = report["regimes"][r]
        fn = g["false_negatives"]
        sampler = g["sampler"] + (f" (share {g['share']:g}, image k-means k={s['crowding_groups']})" if g["sampler"] == "crowded" else "")
        cat = (f"{100 * fn['category_pair_rate']:.3f}% | {fn['category_per_row']:.2f}" if fn["category_pair_rate"] is not None
               else "- | -")
        lines.append(f"| {r} | {g['rows']:,} | {sampler} | {g['steps']} | {100 * fn['exact_pair_rate']:.3f}% | "
                     f"{fn['exact_per_row']:.2f} | {cat} |")
    n_sel = max(1, min(s["selection_seeds"], s["seeds"]))
    width = max(len(report["regimes"][r]["step_curve"]) for r in regimes)
    lines += ["", "## Steps chosen by vanilla on validation", "",
              f"Vanilla's validation {report['select_metric']} after training for each candidate budget (separate "
              f"runs, linear decay over each; seed{'s' if n_sel > 1 else ''} {', '.join(map(str, range(n_sel)))}).", "",
              "| regime | " + " | ".join(f"candidate {i + 1}" for i in range(width)) + " | chosen |",
              "|---|" + "---|" * (width + 1)]
    for r in regimes:
        curve = report["regimes"][r]["step_curve"]
        cells = [f"{n} steps: " + (_pm(v) if n_sel > 1 else f"{v[0]:.2f}") for n, v in curve.items()]
        lines.append(f"| {r} | " + " | ".join(cells + [""] * (width - len(cells))) + f" | {report['regimes'][r]['steps']} |")
    capped = [r for r in regimes if report["regimes"][r]["steps"] == max(int(n) for n in report["regimes"][r]["step_curve"])]
    if capped:
        lines += ["", f"The largest candidate won in {', '.join(f'`{r}`' for r in capped)}: there the budget is the "
                  "grid's cap, not a validation optimum (a wider --step-candidates grid costs more time)."]
    summary = report["summary"]
    for proto, title in (("cat", "Category"), ("inst", "Instance")):
        if proto == "cat" and not has_category:
            continue
        lines += ["", f"## {title} text→image R@1 on test", "",
                  "Mean ± std over seeds; Δ paired with vanilla (same seed)"
                  + ("; share = share of the oracle's gain, only where the oracle's gain exceeds its std." if proto == "cat" else "."),
                  "",
                  "| strategy | " + " | ".join(f"{r} ({report['regimes'][r]['steps']} steps) | Δ" for r in regimes) + " |",
                  "|---|" + "---|---|" * len(regimes)]
        for st in strategies:
            cells = []
            for r in regimes:
                e = summary[r].get(st)
                if e is None:
                    cells += ["", ""]
                    continue
                share = e.get("oracle_share") if proto == "cat" and st not in ("oracle", "vanilla") else None
                d = "" if st == "vanilla" else _delta(e["delta"][proto]) + (f" ({_share(share)})" if share is not None else "")
                cells += [_pm(e["test"][proto]["t2i_R@1"]), d]
            lines.append(f"| {label[st]} | " + " | ".join(cells) + " |")
    choices = choose_defaults(summary, has_category)
    if choices:
        lines += ["", "## Default chosen on validation", "",
                  f"Among the label-free rules {', '.join(DEFAULT_CANDIDATES)} (simplest first), on the validation "
                  f"{'category' if has_category else 'instance'} t→i R@1 Δ paired with vanilla: a rule must beat vanilla "
                  "by more than its paired std; ties within std or float noise go to the simpler rule.", ""]
        lines += [f"- `{r}`: default chosen on validation: {c['rule']} ({c['reason']})" for r, c in choices.items()]
    settings = choose_settings(report, choices, has_category) if "runs" in report else {}
    if settings:
        lines += ["", "## Setting chosen on validation (loss, batch, depth, rule)", "",
                  "Each setting with its own default rule, against the base setting's vanilla (InfoNCE, batch "
                  f"{s['batch_size']}, frozen towers) on the same seeds; listed cheapest first, the same robust rule as "
                  "above (a setting must beat the base by more than its paired std). Test Δ paired with the base.", ""]
        for base, c in settings.items():
            gains = " / ".join(f"{proto} {_delta(d)}" for proto, d in c["test_delta"].items())
            lines.append(f"- `{base}` family: **{c['setting']}** with rule {c['rule']} ({c['reason']}); test Δ {gains}"
                         + (f"; {c['ratio']:.3f}× the base's vanilla" if c["ratio"] is not None else ""))
    for r in regimes:
        g = report["regimes"][r]
        lines += ["", f"### Regime `{r}`: test, {g['steps']} steps, {s['seeds']} seeds", "",
                  f"Masked = share of in-batch negative pairs the strategy masks on the first {MEASURE_BATCHES} training "
                  "batches of seed 0 (`pair_weights` on the mined columns); precision = share of them in the same category; "
                  "recall = share of the same-category pairs masked.",
                  ""]
        head = "| strategy | masked | precision | recall | "
        for proto in (("cat", "inst") if has_category else ("inst",)):
            head += f"{proto} t→i R@1 | R@5 | R@10 | median rank | {proto} i→t R@1 | "
        lines += [head.rstrip() , "|" + "---|" * (head.count("|") - 1)]
        for st in strategies:
            e = summary[r].get(st)
            if e is None:
                continue
            m = g["masked"][st]
            precision = "-" if m["precision"] is None else f"{100 * m['precision']:.1f}%"
            recall = "-" if m.get("recall") is None else f"{100 * m['recall']:.1f}%"
            row = f"| {st} | {_percent(m['masked_fraction'])} | {precision} | {recall} | "
            for proto in (("cat", "inst") if has_category else ("inst",)):
                x = e["test"][proto]
                row += (f"{_pm(x['t2i_R@1'])} | {_pm(x['t2i_R@5'])} | {_pm(x['t2i_R@10'])} | "
                        f"{x['t2i_median_rank'][0]:.1f} | {_pm(x['i2t_R@1'])} | ")
            lines.append(row.rstrip())
    if report.get("pooling"):
        first = s["poolings"][0]
        single = report["regimes"].get("single", {}).get("steps")
        lines += ["", "## Text embedding: mean pooling vs BERT's CLS pooler (vanilla, single regime, validation)", "",
                  f"`build_dual_encoder(text_pooling=...)`, vanilla, {single} steps, {s['seeds']} seeds; Δ paired with `{first}`.",
                  "", "| text pooling | " + ("category t→i R@1 | Δ | " if has_category else "") + "instance t→i R@1 | Δ |",
                  "|---|" + ("---|---|" if has_category else "") + "---|---|"]
        for p, e in report["pooling"].items():
            cells = []
            for proto in (("cat", "inst") if has_category else ("inst",)):
                cells += [_pm(e[proto]["t2i_R@1"]), _delta(e["delta"][proto]) if "delta" in e else ""]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path, has_category: bool) -> None:
    """Test R@1 gain over vanilla (paired std as error bar) against each regime's measured in-batch false-negative
    rate: colour = strategy, marker = regime (points of one regime are spread a little sideways to stay legible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    proto = "cat" if has_category else "inst"
    rate_key = "category_pair_rate" if has_category else "exact_pair_rate"
    regimes = list(report["summary"])
    strategies = [st for st in report["settings"]["strategy_list"] if st != "vanilla"]
    markers = {r: "osD^vP*Xhp<>"[i % 12] for i, r in enumerate(regimes)}
    colours = {st: f"C{i}" for i, st in enumerate(strategies)}
    rates = [100 * report["regimes"][r]["false_negatives"][rate_key] for r in regimes]
    spread = 0.012 * (max(rates) - min(rates) or 1.0)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r, rate in zip(regimes, rates):
        for i, st in enumerate(strategies):
            e = report["summary"][r].get(st)
            if e is None:
                continue
            gain, std = e["delta"][proto]
            x = rate + (i - (len(strategies) - 1) / 2) * spread + (regimes.index(r) % 2) * spread * 0.5
            ax.errorbar(x, gain, yerr=std, fmt=markers[r], color=colours[st], capsize=3, alpha=0.85, ms=6)
    ax.axhline(0, color="grey", lw=0.8)
    handles = [Line2D([], [], color=c, marker="o", ls="", label=st) for st, c in colours.items()]
    handles += [Line2D([], [], color="grey", marker=m, ls="", label=f"{r} ({rate:.2f} %)")
                for (r, m), rate in zip(markers.items(), rates)]
    ax.legend(handles=handles, fontsize=8, ncol=2, loc="best")
    ax.set_xlabel("measured in-batch false-negative rate of the regime, % of pairs ("
                  + ("same category)" if has_category else "same image or identical caption)"))
    ax.set_ylabel(f"test {'category' if has_category else 'instance'} t→i R@1 gain over vanilla (points)")
    ax.set_title("Gain over vanilla vs in-batch false negatives (ClipNegTrainer, frozen towers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
