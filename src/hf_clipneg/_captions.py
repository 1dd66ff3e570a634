"""The one caption normaliser: what "the same caption" means everywhere (mining statistics, retrieval groups)."""

from __future__ import annotations

import re
from typing import Any

_WHITESPACE = re.compile(r"\s+")


def normalise_caption(caption: Any) -> str:
    """`caption` as text, case-folded, with every run of whitespace collapsed to one space and none at the ends.

    Two captions that normalise alike count as the same caption (an exact-caption duplicate). Case folding
    is `str.casefold` (so "STRASSE" and "straße" agree), not just lower-casing.

    Example:
        >>> normalise_caption("  A red\\n circle ")
        'a red circle'
    """
    return _WHITESPACE.sub(" ", str(caption)).strip().casefold()
