"""Frozen records of a few PruneConfig fields, for the parts that read only those (each
estimator, the repair): the fields keep their config names, and their defaults live in
PruneConfig alone."""

from __future__ import annotations

import functools
from dataclasses import make_dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import PruneConfig


@functools.cache
def settings_type(names: tuple[str, ...]) -> type:
    """The frozen record of the config fields `names` (one type per set of names)."""
    return make_dataclass("Settings", [(name, Any) for name in names], frozen=True)


def settings_from(names: tuple[str, ...], config: PruneConfig | None) -> Any:
    """The config fields `names`, copied from the config."""
    if config is None and names:
        raise TypeError(f"a part reading {', '.join(names)} is built from a PruneConfig")
    return settings_type(names)(**{name: getattr(config, name) for name in names})
