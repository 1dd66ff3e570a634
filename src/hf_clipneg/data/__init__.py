"""Image-caption pairs from any source, as a `datasets.Dataset` with the columns `image`, `caption` (and `group`).

The modules, in the order data flows through them:

- `sources`: which loader reads a source (in-memory, data files, saved folders, imagefolders, Hub ids), UTF-8 checks.
- `image_paths`: the image column cast to `datasets.Image`, relative paths resolved, unreadable paths listed.
- `loading`: `load_pairs` (columns renamed and checked, bad rows reported or skipped) and `check_images`.
- `images`: `to_rgb`, decoding any image value exactly as `datasets` does, with errors that name the row.
- `columns`: the canonical column names; `map_cache`: where a `datasets.map` step caches its result.
- `synthetic`: procedural pairs full of near-duplicates, for demos and tests.

Example:
    >>> from hf_clipneg.data import load_pairs, make_synthetic_pairs
    >>> load_pairs(make_synthetic_pairs(num_rows=8, num_objects=2)).num_rows
    8
"""

from __future__ import annotations

from .columns import CAPTION_COLUMN, GROUP_COLUMN, IMAGE_COLUMN, blank_captions
from .errors import ForeignImagePathError, MissingColumnError, RemoteImageError, SplitNotFoundError
from .images import BadImageError, to_rgb, without_image_decoding
from .loading import check_images, load_pairs
from .map_cache import map_cache_file
from .sources import DataSource
from .synthetic import COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES, make_synthetic_pairs, make_synthetic_splits

__all__ = [
    "IMAGE_COLUMN",
    "CAPTION_COLUMN",
    "GROUP_COLUMN",
    "DataSource",
    "load_pairs",
    "check_images",
    "blank_captions",
    "map_cache_file",
    "to_rgb",
    "without_image_decoding",
    "BadImageError",
    "SplitNotFoundError",
    "MissingColumnError",
    "ForeignImagePathError",
    "RemoteImageError",
    "make_synthetic_pairs",
    "make_synthetic_splits",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "TEXTURES",
]
