"""Errors that reach the user as one line (the CLI prints them and exits with status 2)."""

from __future__ import annotations


class PrunekitError(Exception):
    """Base class: the message names the problem and the fix."""


class RegistryError(PrunekitError):
    """registry.toml is malformed or names something that does not exist."""


class MissingComponentError(RegistryError):
    """A pipeline names a component that no installed distribution provides."""


class SelectionError(PrunekitError):
    """A layer cannot be pruned as asked (shape, block size, sparsity)."""


class LayoutError(PrunekitError):
    """A layout or kernel was given data it was not built for."""


class CheckpointError(PrunekitError):
    """A saved pruning state cannot be read or does not fit the model."""


class ComponentError(PrunekitError):
    """A component hook raised, or returned nothing or the wrong type (the message names the stage,
    component, distribution and layer)."""


class KernelMismatchError(PrunekitError):
    """A compiled model's output differs from the masked dense model's by more than the tolerance."""
