"""Benchmark text-only last-layer retraining (TLDR) against zero-shot prompts and a linear probe.

    python benchmarks/tldr.py --smoke            # synthetic embeddings, a few seconds
    python benchmarks/tldr.py                    # fashion-products test split (../shared), CPU minutes

Full mode, on ``../shared/data/fashion-products``:

1. The packaged towers (EfficientNet-Lite0 + all-MiniLM-L6-v2) are paired by
   ``hf_clipneg.towers.build_dual_encoder``. Its projections are random, so there is no image-text
   alignment yet: the towers' pooled features of the training pairs are cached once (frozen
   towers) and only ``visual_projection``/``text_projection``/``logit_scale`` are trained for a
   few epochs of symmetric InfoNCE in plain torch. This is a quick stand-in for a trained
   hf_clipneg model, documented as such in the output.
2. Task A: ``article_type`` among the most frequent types. Task B: ``article_type`` among types
   sold to both men and women, with ``gender`` as the group (average and worst-group accuracy).
3. Methods: zero-shot prompts ("a photo of a {class}."); TLDR heads trained only on templated,
   filtered, group-balanced descriptions (in the joint space with the gap direction removed, and
   in the vision tower's own feature space through an ``ImageSpaceProjector``, i.e. a retrained
   last layer); linear probes on labelled training images (upper bound).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_clipneg.text_heads import (
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


def load_split(data_dir: Path, split: str, types: list[str] | None = None):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table_ = pq.read_table(data_dir / f"{split}.parquet", columns=["image", "title", "article_type", "gender"])
    if types is not None:
        table_ = table_.filter(pc.is_in(table_["article_type"], value_set=__import__("pyarrow").array(types)))
    return table_


@torch.inference_mode()
def tower_features(model, processor, table_, cache: Path, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Frozen tower features: vision pooler_output and text pooler_output (what get_*_features project)."""
    if cache.exists():
        data = np.load(cache)
        return data["image"], data["text"]
    from tqdm.auto import tqdm

    from hf_clipneg.images import to_rgb

    device = next(model.parameters()).device
    images, texts = [], []
    titles = table_["title"].to_pylist()
    column = table_["image"]
    for start in tqdm(range(0, table_.num_rows, batch_size), desc=f"towers -> {cache.name}"):
        batch = [to_rgb(v, row=start + i) for i, v in enumerate(column.slice(start, batch_size).to_pylist())]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        images.append(model.vision_model(pixel_values=pixel_values).pooler_output.float().cpu())
        tokens = processor(text=titles[start:start + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        tokens = {k: v.to(device) for k, v in tokens.items()}
        texts.append(model.text_model(**tokens).pooler_output.float().cpu())
    image, text = torch.cat(images).numpy(), torch.cat(texts).numpy()
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, image=image, text=text)
    return image, text


def align_projections(model, image_feats: np.ndarray, text_feats: np.ndarray, epochs: int, seed: int) -> float:
    """Symmetric InfoNCE on cached tower features, training only the projections and logit scale."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    params = [*model.visual_projection.parameters(), *model.text_projection.parameters(), model.logit_scale]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    img, txt = torch.from_numpy(image_feats).to(device), torch.from_numpy(text_feats).to(device)
    n, batch = len(img), 256
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n)
            for start in range(0, n - batch + 1, batch):
                idx = order[start:start + batch]
                a = torch.nn.functional.normalize(model.visual_projection(img[idx]), dim=1)
                b = torch.nn.functional.normalize(model.text_projection(txt[idx]), dim=1)
                logits = model.logit_scale.exp().clamp(max=100) * a @ b.T
                target = torch.arange(len(idx), device=device)
                loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return float(loss.detach())


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
    train_all = load_split(args.data_dir, "train")
    counts = pc.value_counts(train_all["article_type"]).to_pylist()
    top = [c["values"] for c in sorted(counts, key=lambda c: -c["counts"])[: args.top_types]]
    train = load_split(args.data_dir, "train", top)
    test = load_split(args.data_dir, "test", top)
    if train.num_rows > args.max_train:
        rows = np.sort(np.random.default_rng(args.seed).choice(train.num_rows, args.max_train, replace=False))
        train = train.take(rows)
    notes.append(f"article types: {top}; {train.num_rows} train / {test.num_rows} test images")

    model, processor = build_dual_encoder(projection_dim=args.projection_dim)
    key = hashlib.sha1(f"{args.data_dir}|{top}|{args.max_train}|{args.seed}".encode()).hexdigest()[:10]
    t0 = time.time()
    tr_img, tr_txt = tower_features(model, processor, train, args.cache_dir / f"tldr_train_{key}.npz")
    te_img, _ = tower_features(model, processor, test, args.cache_dir / f"tldr_test_{key}.npz")
    notes.append(f"tower features: {time.time() - t0:.0f} s (cached in {args.cache_dir})")
    t0 = time.time()
    final = align_projections(model, tr_img, tr_txt, args.epochs, args.seed)
    notes.append(f"projection alignment: {args.epochs} epochs InfoNCE on cached features, {time.time() - t0:.0f} s, final loss {final:.3f}")
    model.eval()

    train_joint, test_joint = joint(model, tr_img), joint(model, te_img)
    title_joint = encode_texts(model, processor, train["title"].to_pylist(), batch_size=128).numpy()
    gap = modality_gap(train_joint, title_joint)
    notes.append(f"modality gap on train pairs: norm {gap.norm:.3f}, explained variance {gap.explained_variance:.3f}")
    projector = ImageSpaceProjector().fit(train_joint, tr_img, gap.vector, alpha=args.alpha)
    notes.append(f"projector joint({args.projection_dim}) -> tower({tr_img.shape[1]}) R^2 train {projector.score(train_joint, tr_img):.3f}, test {projector.score(test_joint, te_img):.3f}")

    rows = []
    tasks = {"A: article type": (top, None)}
    train_types, test_types = train["article_type"].to_pylist(), test["article_type"].to_pylist()
    train_gender, test_gender = train["gender"].to_pylist(), test["gender"].to_pylist()
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
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("HF_CLIPNEG_CACHE", Path.home() / ".cache" / "hf_clipneg")) / "bench")
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
