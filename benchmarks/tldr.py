"""Benchmark text-only last-layer retraining (TLDR) against zero-shot prompts and a linear probe.

    python benchmarks/tldr.py --smoke            # synthetic embeddings, a few seconds
    python benchmarks/tldr.py                    # fashion-products test split (../shared), CPU minutes

Full mode, on ``../shared/data/fashion-products``:

1. The packaged towers (EfficientNet-Lite0 + all-MiniLM-L6-v2) are paired by
   ``hf_clipneg.towers.build_dual_encoder``. Its projections are random, so they are trained first with
   the product itself: ``ClipNegTrainer`` (vanilla InfoNCE, frozen towers, i.e. on the cached tower
   features of ``compute_features``) on the labelled training pairs.
2. Task A: ``article_type`` among the most frequent types. Task B: ``article_type`` among types
   sold to both men and women, with ``gender`` as the group (average and worst-group accuracy).
3. Methods: zero-shot prompts ("a photo of a {class}."); TLDR heads trained only on templated,
   filtered, group-balanced descriptions (in the joint space with the gap direction removed, and
   in the vision tower's own feature space through an ``ImageSpaceProjector``, i.e. a retrained
   last layer); linear probes on labelled training images (upper bound).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hf_clipneg.tldr import (
    ImageSpaceProjector,
    TextTrainedHead,
    build_descriptions,
    encode_texts,
    filter_descriptions,
    fit_text_head,
    group_accuracy,
    modality_gap,
    zero_shot_classify,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-products"
PRETTY = {
    "Tshirts": "t-shirt", "Casual Shoes": "casual shoe", "Sports Shoes": "sports shoe", "Formal Shoes": "formal shoe",
    "Handbags": "handbag", "Watches": "watch", "Shirts": "shirt", "Kurtas": "kurta", "Tops": "top", "Heels": "heel",
    "Sunglasses": "sunglasses", "Wallets": "wallet", "Belts": "belt", "Flip Flops": "flip flops", "Sandals": "sandal",
    "Jeans": "jeans", "Socks": "socks", "Briefs": "briefs", "Backpacks": "backpack", "Flats": "flat",
    "Perfume and Body Mist": "perfume", "Trousers": "trousers", "Shorts": "shorts", "Caps": "cap",
    "Earrings": "earrings", "Dresses": "dress", "Sweatshirts": "sweatshirt", "Jackets": "jacket",
    "Track Pants": "track pants", "Bracelet": "bracelet", "Clutches": "clutch", "Ties": "tie",
}
GROUP_WORDS = {"Men": "men's", "Women": "women's"}


def pretty(name: str) -> str:
    return PRETTY.get(name, name.lower())


def table(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["| task | method | average acc. | worst-group acc. |", "|---|---|---|---|"]
    for task, method, report in rows:
        lines.append(f"| {task} | {method} | {100 * report['average']:.1f} | {100 * report['worst_group']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- smoke


def run_smoke(seed: int = 0) -> list[tuple[str, str, dict]]:
    """Synthetic joint space: classes share structure across modalities, images carry a gap offset,
    and a spurious 'group' direction is correlated with the class in the labelled training images."""
    rng = np.random.default_rng(seed)
    dim, num_classes = 32, 4
    means = rng.normal(size=(num_classes, dim)) / np.sqrt(dim) * 1.2
    group_dir = rng.normal(size=(2, dim)) / np.sqrt(dim) * 1.5
    offset = rng.normal(size=dim) / np.sqrt(dim) * 2.0

    def sample(labels, groups, image):
        x = means[labels] + group_dir[groups] + 0.35 * rng.normal(size=(len(labels), dim)) / np.sqrt(dim) * 4
        return x + offset if image else x

    # labelled training images: group 0 mostly with even classes (spurious correlation)
    train_labels = rng.integers(0, num_classes, 2000)
    train_groups = np.where(rng.random(2000) < 0.9, train_labels % 2, 1 - train_labels % 2)
    train_images = sample(train_labels, train_groups, True)
    test_labels = np.repeat(np.arange(num_classes), 200)
    test_groups = np.tile([0, 1], 400)
    test_images = sample(test_labels, test_groups, True)
    # the "text encoder" of a description: class structure + group words, no gap offset
    pair_texts = sample(train_labels, train_groups, False) + 0.1 * rng.normal(size=(2000, dim))
    gap = modality_gap(train_images, pair_texts)
    target_map = rng.normal(size=(dim, 48))
    target = lambda x: np.tanh((x / np.linalg.norm(x, axis=1, keepdims=True)) @ target_map)  # noqa: E731
    projector = ImageSpaceProjector().fit(train_images, target(train_images), gap.vector)
    desc_labels = np.repeat(np.arange(num_classes), 40)
    desc_groups = np.tile([0, 1], num_classes * 20)
    desc = sample(desc_labels, desc_groups, False)
    names = [f"class{i}" for i in range(num_classes)]
    prompts = means  # the class prompt embeddings: class structure only

    rows = []
    zs = zero_shot_classify(test_images, prompts)
    rows.append(("synthetic", "zero-shot prompts", group_accuracy(zs, test_labels, test_groups)))
    plain = TextTrainedHead(names, dim).fit(desc, desc_labels, desc_groups.tolist())
    rows.append(("synthetic", "text head, gap not handled", group_accuracy(plain.predict(test_images), test_labels, test_groups)))
    tldr = TextTrainedHead(names, dim, gap_vector=gap.vector).fit(desc, desc_labels, desc_groups.tolist())
    rows.append(("synthetic", "TLDR (joint, gap removed)", group_accuracy(tldr.predict(test_images), test_labels, test_groups)))
    tldr_p = TextTrainedHead(names, dim, projector=projector).fit(desc, desc_labels, desc_groups.tolist())
    rows.append(("synthetic", "TLDR (target space)", group_accuracy(tldr_p.predict(target(test_images), space="target"), test_labels, test_groups)))
    probe = TextTrainedHead(names, dim).fit(train_images, train_labels, balance="class")
    rows.append(("synthetic", "linear probe on images (ERM)", group_accuracy(probe.predict(test_images), test_labels, test_groups)))
    return rows


# ---------------------------------------------------------------------------------------------- full


def load_splits(data_dir: Path, model, processor) -> dict:
    """The train and test splits with the library's tower features (`compute_features`, cached by datasets)."""
    from datasets import load_dataset

    from hf_clipneg.features import compute_features

    splits = load_dataset("parquet", data_files={s: str(data_dir / f"{s}.parquet") for s in ("train", "validation", "test")})
    return {name: compute_features(splits[name], model, processor, caption_column="title") for name in ("train", "test")}


def align_projections(model, processor, train, epochs: int, seed: int, output_dir: str) -> float:
    """Train the projections and logit scale with the product: `ClipNegTrainer`, vanilla InfoNCE, frozen towers
    (so on the cached tower features of `train`)."""
    from hf_clipneg import ClipNegTrainer, ClipNegTrainingArguments

    args = ClipNegTrainingArguments(
        output_dir=output_dir, negative_strategy="vanilla", tower_training="frozen", num_train_epochs=epochs,
        per_device_train_batch_size=256,
        learning_rate=2e-3, weight_decay=1e-4, seed=seed, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = ClipNegTrainer(model=model, args=args, train_dataset=train.rename_column("title", "caption"),
                             processing_class=processor)
    return float(trainer.train().training_loss)


@torch.inference_mode()
def joint(model, image_feats: np.ndarray) -> np.ndarray:
    device = next(model.parameters()).device
    out = model.visual_projection(torch.from_numpy(image_feats).to(device))
    return torch.nn.functional.normalize(out, dim=1).cpu().numpy()


def run_full(args) -> tuple[list[tuple[str, str, dict]], list[str]]:
    import pyarrow.compute as pc

    from hf_clipneg.towers import build_dual_encoder

    notes = []
    torch.manual_seed(args.seed)
    model, processor = build_dual_encoder(projection_dim=args.projection_dim)
    t0 = time.time()
    splits = load_splits(args.data_dir, model, processor)
    notes.append(f"tower features: {time.time() - t0:.0f} s (hf_clipneg.features.compute_features, datasets cache)")
    counts = pc.value_counts(splits["train"].data.column("article_type")).to_pylist()
    top = [c["values"] for c in sorted(counts, key=lambda c: -c["counts"])[: args.top_types]]
    keep = set(top)
    train = splits["train"].filter(lambda t: t in keep, input_columns="article_type")
    test = splits["test"].filter(lambda t: t in keep, input_columns="article_type")
    if len(train) > args.max_train:
        train = train.select(np.sort(np.random.default_rng(args.seed).choice(len(train), args.max_train, replace=False)))
    notes.append(f"article types: {top}; {len(train)} train / {len(test)} test images")
    tr_img = np.asarray(train.with_format("numpy")["image_features"], dtype=np.float32)
    te_img = np.asarray(test.with_format("numpy")["image_features"], dtype=np.float32)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as output_dir:
        final = align_projections(model, processor, train, args.epochs, args.seed, output_dir)
    notes.append(f"projection alignment: ClipNegTrainer, vanilla, {args.epochs} epochs on cached tower features, "
                 f"{time.time() - t0:.0f} s, mean training loss {final:.3f}")
    model.eval()

    train_joint, test_joint = joint(model, tr_img), joint(model, te_img)
    title_joint = encode_texts(model, processor, list(train["title"]), batch_size=128).numpy()
    gap = modality_gap(train_joint, title_joint)
    notes.append(f"modality gap on train pairs: norm {gap.norm:.3f}, explained variance {gap.explained_variance:.3f}")
    projector = ImageSpaceProjector().fit(train_joint, tr_img, gap.vector, alpha=args.alpha)
    notes.append(f"projector joint({args.projection_dim}) -> tower({tr_img.shape[1]}) R^2 train {projector.score(train_joint, tr_img):.3f}, test {projector.score(test_joint, te_img):.3f}")

    rows = []
    tasks = {"A: article type": (top, None)}
    train_types, test_types = list(train["article_type"]), list(test["article_type"])
    train_gender, test_gender = list(train["gender"]), list(test["gender"])
    both = [t for t in top if sum(1 for a, g in zip(test_types, test_gender) if a == t and g == "Men") >= 5
            and sum(1 for a, g in zip(test_types, test_gender) if a == t and g == "Women") >= 5]
    if len(both) >= 2:
        tasks["B: type, gender groups"] = (both, "gender")
    for task, (types, group_attr) in tasks.items():
        names = [pretty(t) for t in types]
        te_mask = np.array([a in types and (group_attr is None or g in GROUP_WORDS) for a, g in zip(test_types, test_gender)])
        tr_mask = np.array([a in types and (group_attr is None or g in GROUP_WORDS) for a, g in zip(train_types, train_gender)])
        y_test = np.array([types.index(a) for a, m in zip(test_types, te_mask) if m])
        y_train = np.array([types.index(a) for a, m in zip(train_types, tr_mask) if m])
        g_test = [g for g, m in zip(test_gender, te_mask) if m] if group_attr else None
        g_train = [g for g, m in zip(train_gender, tr_mask) if m] if group_attr else None
        label = f"{task} ({len(types)} classes, {int(te_mask.sum())} test)"

        prompts = encode_texts(model, processor, [f"a photo of a {n}." for n in names]).numpy()
        rows.append((label, "zero-shot prompts", group_accuracy(zero_shot_classify(test_joint[te_mask], prompts), y_test, g_test)))

        attributes = {"gender": list(GROUP_WORDS.values())} if group_attr else None
        descriptions = build_descriptions(names, attributes)
        desc_embeds = encode_texts(model, processor, [d.text for d in descriptions]).numpy()
        kept, dropped = filter_descriptions(descriptions, desc_embeds, prompts, class_names=names)
        notes.append(f"{task}: {len(descriptions)} descriptions, {len(dropped)} dropped by the class-prompt filter")
        for variant, kwargs, space, feats in (
            ("TLDR text head (joint, gap removed)", {"gap_vector": gap.vector}, "joint", test_joint),
            ("TLDR text head (tower space = retrained last layer)", {"projector": projector}, "target", te_img),
        ):
            head = fit_text_head(model, processor, names, descriptions, l2=args.l2, **kwargs)
            rows.append((label, variant, group_accuracy(head.predict(feats[te_mask], space=space), y_test, g_test)))
        plain = fit_text_head(model, processor, names, descriptions, l2=args.l2)
        rows.append((label, "text head, gap not handled", group_accuracy(plain.predict(test_joint[te_mask]), y_test, g_test)))

        probe = TextTrainedHead(names, train_joint.shape[1]).fit(train_joint[tr_mask], y_train, balance="class", l2=args.l2)
        rows.append((label, "linear probe, train images (joint)", group_accuracy(probe.predict(test_joint[te_mask]), y_test, g_test)))
        probe_t = TextTrainedHead(names, train_joint.shape[1], projector=projector).fit(tr_img[tr_mask], y_train, space="target", balance="class", l2=args.l2)
        rows.append((label, "linear probe, train images (tower)", group_accuracy(probe_t.predict(te_img[te_mask], space="target"), y_test, g_test)))
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="synthetic embeddings only (seconds)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--top-types", type=int, default=12)
    parser.add_argument("--max-train", type=int, default=3000, help="labelled train pairs used (alignment + probe)")
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=1e-2, help="projector ridge strength")
    parser.add_argument("--l2", type=float, default=1e-3, help="head L2 penalty")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    if args.smoke:
        rows, notes = run_smoke(args.seed), ["synthetic joint space (smoke mode)"]
    else:
        if not args.data_dir.is_dir():
            print(f"No data at {args.data_dir}; run with --smoke or pass --data-dir.", file=sys.stderr)
            return 1
        rows, notes = run_full(args)
    print(table(rows))
    print()
    for note in notes:
        print(f"- {note}")
    print(f"- total {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
