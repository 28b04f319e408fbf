"""Kernel ``cpu-1xn``: build the packed module for a layer, or keep it dense where that is faster.

Fallback rule (``fallback = "auto"``), a model calibrated on this kernel's benchmark
(benches/results/cpu1xn.md; see README): the packed layer wins when its density is below the ratio of
the kernel's worst measured efficiency relative to dense F.conv2d for that block height, with a margin,
and the layer is not so small that fixed per-call costs dominate. Spatial size is not known
when a layer is built, so the rule uses only the weight's shape and pattern.
"""

from __future__ import annotations

import warnings

import attrs
import torch

import prunekit
from prunekit.blocks import dense_module
from prunekit.errors import PrunekitError
from prunekit.records import CompiledLayer, LayerInfo, Layout
from prunekit_cpu1xn import ext
from prunekit_cpu1xn.layout import check_n, densify, validate
from prunekit_cpu1xn.modules import Packed1xN

FALLBACK_MODES = ("auto", "never", "always")
ISA_CHOICES = ("auto", "avx512", "avx2")

# Worst-case fraction of ideal (speed-up x density) the packed kernel reached against dense F.conv2d at
# equal threads, by N, over the ResNet-50 shapes at batch 1 and 8, 1 and 2 threads, sparsity 0.2-0.5
# (benches/results/cpu1xn.md, "Fallback calibration" and the per-layer rows), rounded down. N = 4 is set
# so that s = 0.5 stays dense: memory-bound batch-8 1x1 layers measured 0.68-0.76x there in some runs.
EFFICIENCY = {2: 0.45, 4: 0.55, 8: 0.65, 16: 0.75, 32: 0.7}
MARGIN = 1.15  # predicted speed-up needed before the packed path is chosen
MIN_WEIGHTS = 4096  # dense M*K below this: the packed call's ~12 us fixed cost can exceed what it saves


def rule(n: int, density: float, m: int, k: int, kind: str = "conv2d") -> tuple[bool, str]:
    """The calibrated model: (packed?, reason when not)."""
    speed = EFFICIENCY[n] / max(density, 1e-6)
    if speed < MARGIN:
        op = "linear" if kind == "linear" else "conv2d"
        return False, (
            f"predicted speed-up {speed:.2f}x < {MARGIN}x at density {density:.2f} for N = {n} "
            f"(low sparsity): dense F.{op} is faster"
        )
    if m * k < MIN_WEIGHTS:
        return False, f"tiny layer: {m}x{k} weights < {MIN_WEIGHTS}, the packed call's fixed cost dominates"
    return True, ""


def decide(layer: LayerInfo, layout: Layout, mode: str) -> tuple[bool, str]:
    """(use packed kernel?, reason). ``mode``: auto | never (always packed) | always (always dense)."""
    if mode == "always":
        return False, "fallback = 'always' keeps every layer dense"
    if mode == "never":
        return True, ""
    m, k = layer.gemm_shape
    return rule(int(layout.meta["n"]), float(layout.meta["density"]), m, k, layer.kind)


class Cpu1xN:
    """C++/OpenMP 1xN kernel (AVX-512 or AVX2, chosen at run time), dense fallback per layer."""

    @attrs.define
    class Params:
        n: int | None = None  # when given, the layout must have been built for this N
        fallback: str = "auto"  # auto: calibrated rule; never: always packed; always: always dense
        isa: str = "auto"  # auto: best the CPU has; avx512 / avx2 force a path (tests, benchmarks)

        def __attrs_post_init__(self) -> None:
            if self.fallback not in FALLBACK_MODES:
                raise PrunekitError(f"fallback = {self.fallback!r}: use one of {', '.join(FALLBACK_MODES)}")
            if self.isa not in ISA_CHOICES:
                raise PrunekitError(f"isa = {self.isa!r}: use one of {', '.join(ISA_CHOICES)}")
            if self.n is not None:
                check_n(self.n, "params.n")

    @prunekit.hookimpl
    def prunekit_build_kernel(
        self, layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, params: Params | None
    ) -> CompiledLayer:
        return build(layer, layout, bias, params if params is not None else Cpu1xN.Params())


def build(layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, params: Cpu1xN.Params) -> CompiledLayer:
    validate(layer, layout, params.n)
    if "dense" in layout.meta:
        return _dense(layer, layout, bias, f"not pruned in 1xN blocks: {layout.meta['dense']}")
    if layer.kind == "conv2d" and layer.groups != 1:
        return _dense(layer, layout, bias, f"grouped convolution (groups={layer.groups}) is not supported")
    packed, reason = decide(layer, layout, params.fallback)
    if not packed:
        return _dense(layer, layout, bias, reason)
    try:
        ops = ext.load()
    except ext.ExtensionUnavailable as exc:
        warnings.warn(f"prunekit cpu-1xn: {exc}; layer {layer.name} stays dense", stacklevel=2)
        return _dense(layer, layout, bias, str(exc))
    best = int(ops.isa())
    want = {"auto": best, "avx512": 512, "avx2": 2}[params.isa]
    if want == 512 and best != 512:
        warnings.warn(f"prunekit cpu-1xn: isa = 'avx512' asked but this CPU lacks it; using avx2 ({layer.name})", stacklevel=2)
        want = 2
    module = Packed1xN(layer, layout, bias, want)
    return CompiledLayer(module=module.eval(), kernel=f"cpu-1xn/{ext.isa_name(want)}")


def _dense(layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, reason: str) -> CompiledLayer:
    return CompiledLayer(module=dense_module(layer, densify(layout), bias), kernel="dense-fallback", reason=reason)
