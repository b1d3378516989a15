"""Registry of model families: which decomposer handles which timm architecture."""
from __future__ import annotations

from typing import Callable

_FAMILIES: dict[str, object] = {}


def register_family(*prefixes: str) -> Callable:
    def wrap(cls):
        family = cls()
        for prefix in prefixes:
            _FAMILIES[prefix] = family
        return cls

    return wrap


def family_for(timm_name: str):
    """The family whose prefix is the longest match of `timm_name`."""
    matches = [p for p in _FAMILIES if timm_name.startswith(p)]
    if not matches:
        known = ", ".join(sorted(_FAMILIES))
        raise ValueError(f"no component family handles timm model {timm_name!r} (known prefixes: {known})")
    return _FAMILIES[max(matches, key=len)]
