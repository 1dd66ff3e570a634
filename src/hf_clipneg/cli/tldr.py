"""`hf-clipneg tldr`: train a text-only classifier head (TLDR) for a trained dual encoder."""

from __future__ import annotations

import os
from typing import Any

from .parsing import parse


def _check_tldr_inputs(args: Any) -> None:
    """Fail on bad `tldr` inputs before any model loads: the class names, the descriptions file, a saved
    projector's folder, and the image/caption columns of --paired_data."""
    from ..text_heads import _check_class_names, _load_pairs, _split_list, read_descriptions

    class_names = _check_class_names(_split_list(args.class_names, ","))
    if args.descriptions_file:
        read_descriptions(args.descriptions_file, class_names)
    if args.projector_path and not os.path.exists(args.projector_path):
        raise FileNotFoundError(f"--projector_path {args.projector_path!r} does not exist.")
    if args.paired_data:
        _load_pairs(args)  # names a missing --image_column / --caption_column and the columns that exist


def tldr_main(argv: list[str]) -> int:
    """Entry point of `hf-clipneg tldr`; returns the exit status."""
    from .._atomic import atomic_directory, check_output_path
    from ..text_heads import TldrArguments
    from ..text_heads import tldr_main as run_tldr

    if any(arg in ("-h", "--help") for arg in argv) or (len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml"))):
        return run_tldr(argv)
    (args,) = parse([TldrArguments], argv, "hf-clipneg tldr")
    _check_tldr_inputs(args)  # the data's columns, class names and files, before the model loads (~12 s)
    check_output_path(args.output_dir, [args.model_name_or_path, args.paired_data, args.descriptions_file, args.projector_path],
                      "--output_dir", replace_markers=("config.json",))
    # The head is written to a temporary sibling first (the last --output_dir wins), then swapped in.
    with atomic_directory(args.output_dir) as tmp:
        code = run_tldr([*argv, "--output_dir", tmp])
        if code != 0:
            raise SystemExit(code)
    return code
