"""registry.toml: named pipelines, structured with cattrs so that every error names its key path.

Format::

    default = "han-lenet"

    [pipelines.han-lenet]
    description = "..."
    schedule = "iterative"      # one component name per stage
    score = "magnitude"
    select = "threshold"
    layout = "csr"              # optional (with kernel)
    kernel = "csr"              # optional: without it the model runs with masked dense weights
    [pipelines.han-lenet.params]
    sparsity = 0.9              # host keys and each component's own Params fields, flat

    [distributions.prunekit-magnitude]   # catalogue: who provides what, for install hints
    path = "plugins/magnitude"
    provides = ["score.magnitude", "select.threshold", "layout.csr", "kernel.csr"]
"""

from __future__ import annotations

import os
import tomllib
import typing
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.v import format_exception

from prunekit.errors import RegistryError
from prunekit.hookspecs import OPTIONAL_STAGES, STAGES

ENV_REGISTRY = "PRUNEKIT_REGISTRY"


class _SpecMethods:
    def component(self, stage: str) -> str | None:
        """The component named for ``stage`` (``None`` for an optional stage left out)."""
        return getattr(self, stage)

    def components(self) -> dict[str, str]:
        """``{stage: component}`` for every stage this pipeline names, in stage order."""
        return {s: getattr(self, s) for s in STAGES if getattr(self, s) is not None}


def _spec_fields() -> dict[str, Any]:
    """One field per stage, derived from hookspecs.STAGES (the stage list is defined only there)."""
    fields: dict[str, Any] = {}
    for stage in STAGES:
        if stage in OPTIONAL_STAGES:
            fields[stage] = attrs.field(type=str | None, default=None)
        else:
            fields[stage] = attrs.field(type=str)
    fields["description"] = attrs.field(type=str, default="")
    fields["params"] = attrs.field(type=dict[str, Any], factory=dict)
    return fields


PipelineSpec = attrs.make_class("PipelineSpec", _spec_fields(), bases=(_SpecMethods,), frozen=True)
PipelineSpec.__doc__ = "One [pipelines.NAME] table: a component name per stage, a description and flat params."
PipelineSpec.__module__ = __name__


@attrs.frozen
class DistributionSpec:
    path: str | None = None
    provides: list[str] = attrs.field(factory=list)


@attrs.frozen
class Registry:
    pipelines: dict[str, PipelineSpec]
    default: str | None = None
    distributions: dict[str, DistributionSpec] = attrs.field(factory=dict)
    source: Path = Path("registry.toml")
    root: Path = Path(".")

    def pipeline(self, name: str | None) -> tuple[str, PipelineSpec]:
        if name is None:
            if not self.default:
                raise RegistryError(f"{self.source}: no pipeline named and no 'default' key; add default = \"NAME\"")
            name = self.default
        if name not in self.pipelines:
            known = ", ".join(sorted(self.pipelines))
            raise RegistryError(f"{self.source}: no pipeline '{name}' (known: {known}); check the name or add [pipelines.{name}]")
        return name, self.pipelines[name]

    def provider(self, stage: str, name: str) -> tuple[str, DistributionSpec] | None:
        """The catalogued distribution that provides ``stage.name``, if any."""
        for dist, spec in self.distributions.items():
            if f"{stage}.{name}" in spec.provides:
                return dist, spec
        return None

    def install_hint(self, dist: str) -> str:
        spec = self.distributions.get(dist)
        if spec and spec.path:
            return f"pip install -e {os.path.relpath(self.root / spec.path)}"
        return f"pip install {dist}"


def strict_converter() -> cattrs.Converter:
    """A converter that refuses extra keys and never coerces between str, bool and numbers."""
    conv = cattrs.Converter(forbid_extra_keys=True)

    def exact(kind: type, accept: tuple[type, ...]):  # noqa: ANN202
        def hook(value: Any, _t: Any) -> Any:
            if isinstance(value, bool) and kind is not bool:
                raise TypeError(f"expected {kind.__name__}, got a boolean")
            if not isinstance(value, accept):
                raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
            return kind(value)

        return hook

    conv.register_structure_hook(str, exact(str, (str,)))
    conv.register_structure_hook(bool, exact(bool, (bool,)))
    conv.register_structure_hook(int, exact(int, (int,)))
    conv.register_structure_hook(float, exact(float, (int, float)))

    def list_factory(t: Any) -> Any:
        (item,) = typing.get_args(t) or (Any,)

        def hook(value: Any, _t: Any) -> list[Any]:
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {type(value).__name__} {value!r}; write [{value!r}]")
            return [conv.structure(v, item) for v in value]

        return hook

    conv.register_structure_hook_factory(lambda t: typing.get_origin(t) is list, list_factory)
    return conv


def describe_structure_error(exc: Exception, prefix: str) -> str:
    """Flatten a cattrs error tree into one line of ``key.path: problem`` items."""
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"{prefix}: unknown key(s) {', '.join(sorted(exc.extra_fields))}"
    def fmt(e: BaseException, t: Any) -> str:
        if isinstance(e, KeyError):
            return "required parameter missing; add it"
        if isinstance(e, ForbiddenExtraKeysError):
            return f"unknown key(s) {', '.join(sorted(e.extra_fields))}"
        return str(e) or format_exception(e, t)

    if isinstance(exc, ClassValidationError):
        messages = cattrs.transform_error(exc, path=prefix, format_exception=fmt)
    else:
        messages = [f"{prefix}: {exc}"]
    return "; ".join(m.replace("$.", "").replace("$", "") for m in messages)


def _check_stage_keys(name: str, raw: Any, source: Path) -> None:
    if not isinstance(raw, dict):
        raise RegistryError(f"{source}: pipelines.{name} must be a table; write [pipelines.{name}]")
    allowed = set(STAGES) | {"description", "params"}
    for key in raw:
        if key not in allowed:
            raise RegistryError(
                f"{source}: pipelines.{name}.{key}: unknown stage or key; stages are {', '.join(STAGES)} "
                f"(plus description and params)"
            )
    for stage in STAGES:
        if stage not in OPTIONAL_STAGES and stage not in raw:
            raise RegistryError(f"{source}: pipelines.{name}.{stage}: missing; name the component for this stage")
    optional = [s for s in STAGES if s in OPTIONAL_STAGES]
    given = [s for s in optional if s in raw]
    if given and len(given) != len(optional):
        both = " and ".join(f"'{s}'" for s in optional)
        raise RegistryError(f"{source}: pipelines.{name}: {both} go together; give both or neither")


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """Read and validate a registry file (default: $PRUNEKIT_REGISTRY, else ./registry.toml)."""
    source = Path(path or os.environ.get(ENV_REGISTRY) or "registry.toml")
    if not source.is_file():
        raise RegistryError(f"{source}: registry file not found; pass --registry PATH or run from the project root")
    try:
        text = source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = source.read_bytes()[: exc.start].count(b"\n") + 1
        raise RegistryError(f"{source}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); "
                            "TOML files are UTF-8: save it as UTF-8") from None  # fmt: skip
    except OSError as exc:
        raise RegistryError(f"{source}: cannot read the registry ({exc.strerror or exc}); check the path and its permissions") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{source}: TOML syntax error: {exc}; fix the line it names") from None
    pipelines = raw.get("pipelines")
    if not isinstance(pipelines, dict) or not pipelines:
        raise RegistryError(f"{source}: no [pipelines.NAME] table; add at least one pipeline")
    for name, body in pipelines.items():
        _check_stage_keys(name, body, source)
    conv = strict_converter()
    try:
        reg = conv.structure(raw, Registry)
    except Exception as exc:  # cattrs raises a tree of errors; flatten it to one line
        raise RegistryError(f"{source}: {describe_structure_error(exc, 'registry')}") from None
    if reg.default is not None and reg.default not in reg.pipelines:
        raise RegistryError(f"{source}: default: no pipeline '{reg.default}'; set default to one of {', '.join(reg.pipelines)}")
    return attrs.evolve(reg, source=source, root=source.resolve().parent)
