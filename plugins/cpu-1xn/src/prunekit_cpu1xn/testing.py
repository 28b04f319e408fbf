"""Helpers for tests and benches: build a packed layer from a selection and compare it with dense."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunekit.records import CompiledLayer, LayerInfo, Selection
from prunekit_cpu1xn.kernel import Cpu1xN, build
from prunekit_cpu1xn.layout import pack_1xn


def compile_layer(
    layer: LayerInfo, weight: torch.Tensor, sel: Selection, bias: torch.Tensor | None, **params
) -> CompiledLayer:
    params.setdefault("fallback", "never")
    compiled = build(layer, pack_1xn(layer, weight, sel), bias, Cpu1xN.Params(**params))
    if hasattr(compiled.module, "poison_output"):
        compiled.module.poison_output = True  # an element the kernel forgets to write stays NaN
    return compiled


def reference(layer: LayerInfo, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if layer.kind == "linear":
        return F.linear(x, w, bias)
    return F.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|; NaN anywhere in ``y`` counts as an infinite error."""
    y, ref = y.detach(), ref.detach()
    if y.shape != ref.shape or not bool(torch.isfinite(y).all()):
        return float("inf")
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
