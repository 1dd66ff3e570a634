"""Lazy re-exports for package ``__init__`` modules (PEP 562): a name's module is imported on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of `package` for `exports` (``{name: submodule}``).

    A name is imported from ``package.submodule`` on first access and cached in `namespace` (the package's
    ``globals()``); any other name raises AttributeError.

    Example:
        >>> import json.decoder
        >>> namespace = {}
        >>> getattr_, dir_ = lazy_exports("json", {"JSONDecoder": "decoder"}, namespace)
        >>> getattr_("JSONDecoder") is json.decoder.JSONDecoder, list(namespace), dir_()
        (True, ['JSONDecoder'], ['JSONDecoder'])
        >>> getattr_("dumps")
        Traceback (most recent call last):
        ...
        AttributeError: module 'json' has no attribute 'dumps'
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
