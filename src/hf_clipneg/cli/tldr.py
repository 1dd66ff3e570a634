"""`hf-clipneg tldr`: train a text-only classifier head (TLDR) for a trained dual encoder and write it, with the
descriptions it was trained on and the modality gap measured on image-text pairs.

Everything the user gives (class names, descriptions, a saved projector's folder, the pairs' columns, the output
folder) is checked before the model loads; the head is written to a temporary sibling and swapped in.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tldr import (
    DEFAULT_CLASS_PROMPT,
    Balance,
    Description,
    ImageSpaceProjector,
    TextTrainedHead,
    build_descriptions,
    check_class_names,
    encode_images,
    encode_texts,
    fit_text_head,
    modality_gap,
    read_descriptions,
)
from .parsing import parse

logger = logging.getLogger(__name__)


@dataclass
class TldrArguments:
    """Arguments of ``hf-clipneg tldr`` (train a text-only classifier head for a dual encoder)."""

    model_name_or_path: str = field(metadata={"help": "Directory of a VisionTextDualEncoderModel and its processor."})
    class_names: str = field(metadata={"help": "Comma-separated class names, or a file with one class name per line."})
    output_dir: str = field(metadata={"help": "Where the head (config.json + model.safetensors) is written."})
    attributes: str | None = field(default=None, metadata={
        "help": "Group attributes as 'name:value,value;name:value,...', e.g. \"gender:men's,women's\"."})
    templates: str | None = field(default=None, metadata={
        "help": "'|'-separated templates with {class}, {attr}, {<attribute>}, or a file with one per line."})
    per_class: int | None = field(default=None, metadata={"help": "Descriptions per class (multiple of the group count)."})
    descriptions_file: str | None = field(default=None, metadata={
        "help": "CSV (text,label[,group]) or TSV file of descriptions, used instead of templates."})
    class_prompt: str = field(default=DEFAULT_CLASS_PROMPT, metadata={"help": "Prompt for the class embeddings used in filtering."})
    filter_descriptions: bool = field(default=True, metadata={"help": "Drop descriptions closer to another class's prompt."})
    balance: Balance = field(default=Balance.AUTO, metadata={"help": "Loss weighting: none, class, group or auto."})
    paired_data: str | None = field(default=None, metadata={
        "help": "Image-text pairs (parquet/csv/json file or a save_to_disk directory) to measure the modality gap."})
    image_column: str = field(default="image", metadata={"help": "Image column of --paired_data."})
    text_column: str = field(default="caption", metadata={
        "help": "Caption column of --paired_data (the name every other hf-clipneg command uses).", "aliases": ["--caption_column"]})
    max_pairs: int = field(default=2000, metadata={"help": "At most this many pairs are encoded."})
    fit_projector: bool = field(default=False, metadata={
        "help": "Also fit an ImageSpaceProjector into the vision tower's pooled features (needs --paired_data)."})
    projector_alpha: float = field(default=1e-2, metadata={"help": "Ridge strength of the projector."})
    projector_path: str | None = field(default=None, metadata={"help": "A saved ImageSpaceProjector to use."})
    l2: float = field(default=1e-4, metadata={"help": "L2 penalty of the head."})
    max_iter: int = field(default=500, metadata={"help": "L-BFGS iterations."})
    batch_size: int = field(default=64, metadata={"help": "Encoding batch size."})
    seed: int = field(default=0, metadata={"help": "Random seed."})

    def __post_init__(self) -> None:
        self.balance = Balance(self.balance)
        if self.fit_projector and not self.paired_data:
            raise ValueError("--fit_projector needs --paired_data (images to fit it on).")
        if self.fit_projector and self.projector_path:
            raise ValueError("Give either --fit_projector or --projector_path, not both.")
        if self.max_pairs < 2:
            raise ValueError("--max_pairs must be at least 2.")


def split_list(value: str, sep: str) -> list[str]:
    """The non-blank lines of the file `value`, or else the non-blank `sep`-separated parts of `value`, stripped.

    Example:
        >>> split_list("shirt, shoe,,watch", ",")
        ['shirt', 'shoe', 'watch']
    """
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [part.strip() for part in value.split(sep) if part.strip()]


def parse_attributes(spec: str | None) -> dict[str, list[str]] | None:
    """Parse ``"gender:men,women;usage:casual,formal"``.

    Example:
        >>> parse_attributes("gender:men,women")
        {'gender': ['men', 'women']}
    """
    if not spec:
        return None
    attributes = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        name, sep, values = part.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"Attribute spec {part!r} must look like 'name:value,value'.")
        attributes[name.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return attributes


def load_paired_data(args: TldrArguments) -> Any:
    """The `--paired_data` pairs through `hf_clipneg.data.load_pairs` (columns renamed to ``image`` and
    ``caption``), at most `--max_pairs` of them (a random sample seeded by `--seed`).

    Raises:
        ValueError: a column is missing; the message names it and the columns there are.
    """
    from ..data import MissingColumnError, load_pairs

    try:
        pairs = load_pairs(args.paired_data, image_column=args.image_column, caption_column=args.text_column)
    except MissingColumnError as err:
        # load_pairs names its keyword arguments (caption_column=...); say it in this command's terms.
        raise ValueError(
            f"--paired_data has no column {err.column!r}; columns are {err.available}. Name the columns with "
            "--image_column and --caption_column."
        ) from err
    if len(pairs) > args.max_pairs:
        pairs = pairs.shuffle(seed=args.seed).select(range(args.max_pairs))
    return pairs


def _descriptions(args: TldrArguments, class_names: list[str]) -> list[Description]:
    if args.descriptions_file:
        return read_descriptions(args.descriptions_file, class_names)
    templates = split_list(args.templates, "|") if args.templates else None
    return build_descriptions(class_names, parse_attributes(args.attributes), templates, args.per_class, args.seed)


def train_head(args: TldrArguments, class_names: list[str], descriptions: list[Description], pairs: Any,
               output: Path) -> TextTrainedHead:
    """Load the dual encoder, measure the modality gap on `pairs` (optional; also fit a projector with
    `--fit_projector`), train the head on `descriptions` and write into `output`: the head (``config.json``,
    ``model.safetensors``), ``descriptions.csv`` (with a ``kept`` column) and ``modality_gap.json``."""
    import torch
    from transformers import VisionTextDualEncoderProcessor

    from ..modeling import ClipNegDualEncoderModel

    torch.manual_seed(args.seed)
    model = ClipNegDualEncoderModel.from_pretrained(args.model_name_or_path)
    processor = VisionTextDualEncoderProcessor.from_pretrained(args.model_name_or_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    logger.info("%d descriptions for %d classes", len(descriptions), len(class_names))

    projector = ImageSpaceProjector.from_pretrained(args.projector_path) if args.projector_path else None
    gap = None
    if pairs is not None:
        images, tower = encode_images(model, processor, pairs["image"], batch_size=args.batch_size, return_tower_features=True)
        texts = encode_texts(model, processor, pairs["caption"], batch_size=args.batch_size)
        gap = modality_gap(images, texts)
        logger.info("Modality gap on %d pairs: norm %.4f, explained variance %.3f", len(pairs), gap.norm, gap.explained_variance)
        if args.fit_projector:
            projector = ImageSpaceProjector().fit(images, tower, gap.vector, alpha=args.projector_alpha)

    head = fit_text_head(model, processor, class_names, descriptions, projector=projector,
                         gap_vector=gap.vector if gap is not None else None, filter=args.filter_descriptions,
                         class_prompt=args.class_prompt, balance=args.balance, l2=args.l2, max_iter=args.max_iter,
                         batch_size=args.batch_size, device=device)
    head.save_pretrained(output)
    dropped = {(d["text"], d["label"], d["group"]) for d in head.training_summary.get("dropped", [])}
    with (output / "descriptions.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "group", "kept"])
        for d in descriptions:
            writer.writerow([d.text, d.label, d.group or "", int((d.text, d.label, d.group) not in dropped)])
    if gap is not None:
        (output / "modality_gap.json").write_text(json.dumps(gap.to_dict()))
    logger.info("Wrote the head to %s (%d descriptions kept, %d dropped)", args.output_dir,
                len(descriptions) - len(dropped), len(dropped))
    return head


def tldr_main(argv: list[str] | None = None) -> int:
    """Entry point of ``hf-clipneg tldr`` (`argv`: its options, or one JSON/YAML file); returns the exit status.

    Example:
        >>> tldr_main(["--help"])  # doctest: +SKIP
    """
    from .._atomic import atomic_directory, check_output_path

    (args,) = parse([TldrArguments], list(sys.argv[1:] if argv is None else argv), "hf-clipneg tldr")
    # Everything the user gave is checked before the model loads (~12 s).
    class_names = check_class_names(split_list(args.class_names, ","))
    descriptions = _descriptions(args, class_names)
    if args.projector_path and not os.path.exists(args.projector_path):
        raise FileNotFoundError(f"--projector_path {args.projector_path!r} does not exist.")
    pairs = load_paired_data(args) if args.paired_data else None
    check_output_path(args.output_dir, [args.model_name_or_path, args.paired_data, args.descriptions_file, args.projector_path],
                      "--output_dir", replace_markers=("config.json",))
    with atomic_directory(args.output_dir) as tmp:  # the last --output_dir wins; a failed run leaves the old head
        train_head(args, class_names, descriptions, pairs, Path(tmp))
    return 0
