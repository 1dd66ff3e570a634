"""Strict type checks of configuration values read from JSON/YAML files against dataclass field types.

`HfArgumentParser.parse_dict` passes the values straight to the dataclasses, so `"false"` becomes a truthy
bool and `"sixty"` a batch size that fails much later with an error naming no key. `check_config_types`
checks every value against the annotated type of its field (including those of transformers'
`TrainingArguments`) and raises one `ConfigTypeError` naming each bad key and the type it expects.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

_NoneType = type(None)


class ConfigTypeError(ValueError):
    """A configuration value does not have the type of its field; the message names the key(s)."""


@functools.lru_cache(maxsize=None)
def _field_types(dataclass_type: type) -> dict[str, tuple[Any, tuple | None]]:
    hints = typing.get_type_hints(dataclass_type)
    return {
        f.name: (hints.get(f.name, Any), tuple(f.metadata["choices"]) if "choices" in f.metadata else None)
        for f in dataclasses.fields(dataclass_type)
        if f.init
    }


def check_config_types(dataclass_types: Sequence[type], values: Mapping[str, Any], source: str = "the config") -> None:
    """Raise `ConfigTypeError` when a value of `values` does not match the type of its dataclass field.

    Keys that belong to none of `dataclass_types` are left to the parser (which refuses them). Enum fields
    accept their members' values; fields with `choices` metadata accept only those.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Args:
        ...     batch_size: int = 8
        ...     private: bool = False
        >>> check_config_types([Args], {"batch_size": 16, "private": True})
        >>> check_config_types([Args], {"private": "false"})
        Traceback (most recent call last):
        ...
        hf_clipneg._config.ConfigTypeError: the config: key 'private' must be a bool (true/false), got the str 'false'.
    """
    fields: dict[str, tuple[Any, tuple | None]] = {}
    for dataclass_type in dataclass_types:
        for name, spec in _field_types(dataclass_type).items():
            fields.setdefault(name, spec)
    problems = []
    for key, value in values.items():
        if key not in fields:
            continue
        annotation, choices = fields[key]
        if not _matches(value, annotation):
            problems.append(f"key {key!r} must be {_describe(annotation)}, got {_show(value)}")
        elif choices is not None and value not in choices and not (value is None and _allows_none(annotation)):
            problems.append(f"key {key!r} must be one of {list(choices)}, got {_show(value)}")
    if problems:
        raise ConfigTypeError(f"{source}: " + "; ".join(problems) + ".")


def _show(value: Any) -> str:
    return "null" if value is None else f"the {type(value).__name__} {value!r}"


def _allows_none(annotation: Any) -> bool:
    return annotation is Any or annotation is _NoneType or (
        _is_union(annotation) and any(_allows_none(arg) for arg in typing.get_args(annotation))
    )


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is Any or annotation is object:
        return True
    if annotation is _NoneType or annotation is None:
        return value is None
    if _is_union(annotation):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        args = typing.get_args(annotation)
        if origin in (list, Sequence, tuple, set, frozenset) or (isinstance(origin, type) and issubclass(origin, (list, tuple))):
            if not isinstance(value, (list, tuple)):
                return False
            if origin is tuple and args and args[-1] is not Ellipsis:
                return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
            item = args[0] if args else Any
            return all(_matches(v, item) for v in value)
        if origin in (dict, Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping)):
            if not isinstance(value, Mapping):
                return False
            key_type, value_type = args if len(args) == 2 else (Any, Any)
            return all(_matches(k, key_type) and _matches(v, value_type) for k, v in value.items())
        return True  # another generic: nothing checkable
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or any(value == member.value for member in annotation)
    if annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if annotation is dict:
        return isinstance(value, Mapping)
    if isinstance(annotation, type):
        # Structured options (e.g. an accelerate config object) are written as mappings in a file.
        return isinstance(value, annotation) or (dataclasses.is_dataclass(annotation) and isinstance(value, Mapping))
    return True  # a string annotation or type variable we cannot resolve


def _describe(annotation: Any) -> str:
    if annotation is _NoneType or annotation is None:
        return "null"
    if _is_union(annotation):
        parts = list(dict.fromkeys(_describe(arg) for arg in typing.get_args(annotation)))
        return " or ".join(parts)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        args = typing.get_args(annotation)
        name = getattr(origin, "__name__", str(origin))
        if name in ("list", "Sequence", "tuple", "set"):
            return f"a list of {_plural(args[0])}" if args else "a list"
        if name in ("dict", "Mapping"):
            return "a mapping"
        return str(annotation)
    if annotation is bool:
        return "a bool (true/false)"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _plural(annotation: Any) -> str:
    text = _describe(annotation)
    for article in ("a ", "an "):
        if text.startswith(article):
            return text[len(article):] + "s"
    return text
