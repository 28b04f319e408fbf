"""Discovering installed components through entry points.

Each distribution publishes components under one entry-point group per stage (``prunekit.score`` ...);
the entry-point name is the component's name in registry.toml. Two distributions publishing the same
name for the same stage is an error, never a silent override.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any

import attrs

from prunekit.errors import RegistryError
from prunekit.hookspecs import STAGE_GROUPS


@attrs.frozen
class ComponentInfo:
    """One installed component: where it comes from and how to load it."""

    stage: str
    name: str
    distribution: str
    version: str
    target: str  # "module:attr" of the entry point
    entry_point: metadata.EntryPoint = attrs.field(eq=False, repr=False)

    def load(self) -> Any:
        """Import the component class (imports stay lazy until a pipeline needs it)."""
        return self.entry_point.load()

    def summary(self) -> str:
        cls = self.load()
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ("?", "?")
    return (dist.metadata["Name"], dist.version)


@functools.cache
def installed_components() -> dict[tuple[str, str], ComponentInfo]:
    """Every installed component keyed by ``(stage, name)``; duplicates raise RegistryError."""
    found: dict[tuple[str, str], ComponentInfo] = {}
    for stage, (group, _hook) in STAGE_GROUPS.items():
        for ep in metadata.entry_points(group=group):
            dist, version = _dist_of(ep)
            info = ComponentInfo(stage, ep.name, dist, version, ep.value, ep)
            key = (stage, ep.name)
            if key in found and found[key].distribution != dist:
                other = found[key].distribution
                raise RegistryError(
                    f"component '{ep.name}' for stage '{stage}' is provided by both {other} and {dist}; "
                    f"uninstall one of them (pip uninstall {dist})"
                )
            found[key] = info
    return found


def reset_cache() -> None:
    """Forget discovered components (after installing a plugin in the same process)."""
    installed_components.cache_clear()
