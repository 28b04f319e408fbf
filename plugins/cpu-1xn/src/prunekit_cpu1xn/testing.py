"""Helpers for tests and benches: build a packed layer from a selection and compare it with dense."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.records import CompiledLayer, LayerInfo, Selection
from prunekit_cpu1xn.kernel import Cpu1xN, build
from prunekit_cpu1xn.layout import pack_1xn


def require_kernel() -> object:
    """The loaded ops, or skip the calling test when this machine cannot build them at all.

    A machine without a compiler / ninja / x86-64 skips (the plugin then runs layers densely, which the
    fallback tests cover); a build that fails on a machine that has them fails the test.
    """
    import pytest

    from prunekit_cpu1xn import ext

    try:
        return ext.load()
    except ext.ExtensionUnavailable as exc:
        if exc.missing_prerequisite:
            pytest.skip(f"cpu-1xn kernel cannot be built here: {exc}", allow_module_level=True)
        raise


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


# ResNet-50 (torchvision v1.5) conv shapes, kernels.md 3.1: (id, Cin, Cout, k, input H=W, stride).
RESNET50_SHAPES: tuple[tuple[str, int, int, int, int, int], ...] = (
    ("L1a", 256, 64, 1, 56, 1),
    ("L1b", 64, 64, 3, 56, 1),
    ("L1c", 64, 256, 1, 56, 1),
    ("L2a", 512, 128, 1, 28, 1),
    ("L2b", 128, 128, 3, 28, 1),
    ("L2c", 128, 512, 1, 28, 1),
    ("L3a", 1024, 256, 1, 14, 1),
    ("L3b", 256, 256, 3, 14, 1),
    ("L3c", 256, 1024, 1, 14, 1),
    ("L4a", 2048, 512, 1, 7, 1),
    ("L4b", 512, 512, 3, 7, 1),
    ("L4c", 512, 2048, 1, 7, 1),
)
# first block of stages 2-4: stride-2 3x3 and 1x1 stride-2 downsample
RESNET50_STRIDED: tuple[tuple[str, int, int, int, int, int], ...] = (
    ("S2b", 128, 128, 3, 56, 2),
    ("S2d", 256, 512, 1, 56, 2),
    ("S3b", 256, 256, 3, 28, 2),
    ("S3d", 512, 1024, 1, 28, 2),
    ("S4b", 512, 512, 3, 14, 2),
    ("S4d", 1024, 2048, 1, 14, 2),
)


def conv_layer(name: str, cin: int, cout: int, k: int, stride: int = 1) -> LayerInfo:
    return LayerInfo(
        name=name, kind="conv2d", weight_shape=(cout, cin, k, k), stride=(stride, stride), padding=(k // 2, k // 2)
    )


@torch.no_grad()
def trained_like_bn(model: nn.Module, seed: int) -> None:
    """BatchNorm statistics and affine parameters like a trained model's (random init has shift 0, which would
    let a fused model skip the BN shift: an unfair advantage in a benchmark, an untested path in a test)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
