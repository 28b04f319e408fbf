"""Discovering installed components through entry points.

Each distribution publishes components under one entry-point group per stage (``prunekit.score`` ...);
the entry-point name is the component's name in registry.toml. Two distributions publishing the same
name for the same stage is a conflict, never a silent override: the component is listed with both
distributions, and only a pipeline that names it refuses to load.
"""

from __future__ import annotations

import functools
import typing
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
    conflicts: tuple[str, ...] = ()  # other distributions publishing the same stage.name

    @property
    def key(self) -> str:
        return f"{self.stage}.{self.name}"

    def check_unique(self) -> None:
        if self.conflicts:
            dists = ", ".join((self.distribution, *self.conflicts))
            raise RegistryError(
                f"component '{self.name}' for stage '{self.stage}' is provided by several distributions ({dists}); "
                f"uninstall all but one (pip uninstall {self.conflicts[0]})"
            )

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


def _add(found: dict[tuple[str, str], ComponentInfo], info: ComponentInfo) -> None:
    key = (info.stage, info.name)
    first = found.get(key)
    if first is None:
        found[key] = info
    elif first.distribution != info.distribution and info.distribution not in first.conflicts:
        found[key] = attrs.evolve(first, conflicts=(*first.conflicts, info.distribution))


@functools.cache
def _entry_point_components() -> dict[tuple[str, str], ComponentInfo]:
    found: dict[tuple[str, str], ComponentInfo] = {}
    for stage, (group, _hook) in STAGE_GROUPS.items():
        for ep in metadata.entry_points(group=group):
            dist, version = _dist_of(ep)
            _add(found, ComponentInfo(stage, ep.name, dist, version, ep.value, ep))
    return found


_LOCAL: dict[tuple[str, str], ComponentInfo] = {}


class _InProcess:
    """Stands in for an entry point: loads a class registered in this process."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def load(self) -> type:
        return self.cls


def installed_components() -> dict[tuple[str, str], ComponentInfo]:
    """Every installed component keyed by ``(stage, name)``: entry points, plus components registered in
    this process. A name two distributions publish carries ``conflicts`` (``check_unique`` raises)."""
    found = dict(_entry_point_components())
    for info in _LOCAL.values():
        _add(found, info)
    return found


def register_component(stage: str, name: str, cls: type, distribution: str = "<in-process>") -> ComponentInfo:
    """Make ``cls`` available as ``stage.name`` in this process without packaging it (a notebook, a
    test): registry pipelines can then name it like an installed component. Undo with
    ``unregister_component``."""
    if stage not in STAGE_GROUPS:
        raise RegistryError(f"stage '{stage}' is unknown; stages are {', '.join(STAGE_GROUPS)}")
    info = ComponentInfo(stage, name, distribution, "0", f"{cls.__module__}:{cls.__qualname__}", _InProcess(cls))  # type: ignore[arg-type]
    _LOCAL[(stage, name)] = info
    return info


def unregister_component(stage: str, name: str) -> None:
    _LOCAL.pop((stage, name), None)


def reset_cache() -> None:
    """Forget discovered entry points (after installing a plugin in the same process)."""
    _entry_point_components.cache_clear()


def _type_name(t: Any) -> str:
    if t is None:
        return "?"
    if isinstance(t, str):
        return t
    if typing.get_origin(t) is not None:
        return str(t).replace("typing.", "")
    return getattr(t, "__name__", str(t))


def params_fields(cls: type) -> list[dict[str, Any]]:
    """The registry keys a component accepts: its ``Params`` fields with type and default."""
    params_cls = getattr(cls, "Params", None)
    if params_cls is None or not attrs.has(params_cls):
        return []
    try:
        hints = typing.get_type_hints(params_cls)
    except Exception:  # unresolvable annotations: fall back to the raw strings
        hints = {}
    rows = []
    for f in attrs.fields(params_cls):
        if f.default is attrs.NOTHING:
            default: Any = "(required)"
        elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            default = f.default.factory() if not f.default.takes_self else "(computed)"
        else:
            default = f.default
        rows.append({"name": f.name, "type": _type_name(hints.get(f.name, f.type)), "default": default})
    return rows
