"""prunekit: structured pruning with plugins, and sparse kernels that make it pay."""

from prunekit.errors import (
    CheckpointError,
    LayoutError,
    MissingComponentError,
    PrunekitError,
    RegistryError,
    SelectionError,
)
from prunekit.export import load_compiled, read_manifest
from prunekit.hookspecs import hookimpl
from prunekit.records import CompiledLayer, LayerInfo, Layout, ScheduleDecision, Selection

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CompiledLayer",
    "LayerInfo",
    "Layout",
    "LayoutError",
    "MissingComponentError",
    "PrunekitError",
    "RegistryError",
    "ScheduleDecision",
    "Selection",
    "SelectionError",
    "hookimpl",
    "load_compiled",
    "load_pipeline",
    "read_manifest",
]


def load_pipeline(name: str | None = None, registry: str | None = None):  # noqa: ANN201
    """Load a pipeline by name from registry.toml (the default pipeline when ``name`` is None)."""
    from prunekit.pipeline import Pipeline

    return Pipeline.load(name, registry)

