"""Typed configs from settings: the command layer builds each part's small dataclass config from the settings'
fields of the same names, so that no part of the library needs the settings (pydantic) models. Torch-free."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def config_of(cls: type[T], source: Any, **overrides: Any) -> T:
    """A `cls` dataclass whose fields are the same-named attributes of `source` (a settings model, another config or
    a dict), where `source` has them and they are not None, then `overrides`; the rest keep `cls`'s defaults."""
    if isinstance(source, cls) and not overrides:
        return source
    get = source.get if isinstance(source, dict) else lambda name, default=None: getattr(source, name, default)
    values = {f.name: v for f in dataclasses.fields(cls) if f.init and (v := get(f.name)) is not None}  # type: ignore
    return cls(**{**values, **overrides})
