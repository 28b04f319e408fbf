"""Kernel ``cpu-1xn``: build the packed module for a layer, or keep it dense where that is faster.

Fallback rule (``fallback = "auto"``), calibrated on this kernel's benchmark (benches/results/cpu1xn.md;
see README). With the layer's real input (``LayerInfo.input_shape``, known when ``compile`` got an
example: batch and spatial size) it compares fitted time models of dense F.conv2d and the packed kernel
(``time_rule``). Without it, the packed layer wins when its density is below the ratio of the kernel's
worst measured efficiency relative to dense F.conv2d for that block height, with a margin, and the layer
is not so small that fixed per-call costs dominate (``rule``).
"""

from __future__ import annotations

import warnings

import attrs
import torch

import prunekit
from prunekit.blocks import dense_module
from prunekit.errors import PrunekitError
from prunekit.fusion import every_chain, parse_epilogue
from prunekit.records import CompiledLayer, LayerInfo, Layout
from prunekit_cpu1xn import ext, ops
from prunekit_cpu1xn.layout import check_n, densify, validate
from prunekit_cpu1xn.modules import DenseEpilogue, Fused1xN, Packed1xN

FALLBACK_MODES = ("auto", "never", "always")
ISA_CHOICES = ("auto", "avx512", "avx2")

# Worst-case fraction of ideal (speed-up x density) the packed kernel reached against dense F.conv2d at
# equal threads, by N, over the ResNet-50 shapes at batch 1 and 8, 1 and 2 threads, sparsity 0.2-0.5
# (benches/results/cpu1xn.md, "Fallback calibration" and the per-layer rows), rounded down. N = 4 is set
# so that s = 0.5 stays dense: memory-bound batch-8 1x1 layers measured 0.68-0.76x there in some runs.
EFFICIENCY = {2: 0.45, 4: 0.55, 8: 0.65, 16: 0.75, 32: 0.7}
MARGIN = 1.15  # predicted speed-up needed before the packed path is chosen
MIN_WEIGHTS = 4096  # dense M*K below this: the packed call's ~12 us fixed cost can exceed what it saves


# With the real input size (LayerInfo.input_shape, when compile() got an example) the rule compares two time
# models instead, fitted (non-negative least squares on relative error) to the per-layer sweep of
# benches/cpu1xn_table.py --fallback-sweep (1 thread; ResNet-50 and MobileNetV2 1x1 shapes; batch 1, 8, 32;
# N = 16; s = 0.5 / 0.75 / 0.9; Intel Xeon AVX-512): milliseconds per unit.
#   dense F.conv2d: DENSE_MAC * M*K*P
#   packed:         SPARSE_MAC * M*K*P*density * (EFFICIENCY[16] / EFFICIENCY[N])  (the kept multiply-adds)
#                   + SMALL_P_MAC * the same when an image has <= 64 positions (7x7 maps: SIMD lanes idle)
#                   + SPARSE_OUT * M*P (writing the output: what bounds 1x1 layers with few kept inputs)
#                   + SPARSE_COPY * input elements, for strided convs (phase planes) + FIXED_MS per call
# and packs when dense / packed >= TIME_MARGIN. Over the sweep's 228 rows: every packed row measured >= 1.03x.
DENSE_MAC = 1.45e-8
SPARSE_MAC = 1.93e-8
SMALL_P_MAC = 7.3e-9
SPARSE_OUT = 1.32e-7
SPARSE_COPY = 5.2e-7
FIXED_MS = 9.8e-3
TIME_MARGIN = 1.1


def conv_positions(layer: LayerInfo, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(batch, output positions per image, input elements) of ``layer`` on an input of ``input_shape``."""
    if layer.kind == "linear":
        rows = 1
        for d in input_shape[:-1]:
            rows *= d
        return 1, rows, rows * layer.weight_shape[1]
    b = input_shape[0] if len(input_shape) == 4 else 1
    h, w = input_shape[-2:]
    kh, kw = layer.weight_shape[2:]
    ho = (h + 2 * layer.padding[0] - layer.dilation[0] * (kh - 1) - 1) // layer.stride[0] + 1
    wo = (w + 2 * layer.padding[1] - layer.dilation[1] * (kw - 1) - 1) // layer.stride[1] + 1
    return b, max(ho, 0) * max(wo, 0), b * layer.weight_shape[1] * h * w


def time_rule(n: int, density: float, layer: LayerInfo, input_shape: tuple[int, ...]) -> tuple[bool, str, float]:
    """(packed?, reason when not, predicted speed-up) from the time models above, on the real input size."""
    m, k = layer.gemm_shape
    b, p_img, inp = conv_positions(layer, input_shape)
    p = b * p_img
    macs = m * k * p
    kept = macs * density * EFFICIENCY[16] / EFFICIENCY[n]
    sparse = (SPARSE_MAC * kept + (SMALL_P_MAC * kept if p_img <= 64 else 0.0) + SPARSE_OUT * m * p
              + (SPARSE_COPY * inp if layer.kind == "conv2d" and max(layer.stride) > 1 else 0.0) + FIXED_MS)  # fmt: skip
    speed = DENSE_MAC * macs / sparse
    if speed >= TIME_MARGIN:
        return True, "", speed
    return False, (
        f"predicted speed-up {speed:.2f}x < {TIME_MARGIN}x on input {tuple(input_shape)} (density {density:.2f}, "
        f"N = {n}, {m}x{k}): dense F.{'linear' if layer.kind == 'linear' else 'conv2d'} is faster"
    ), speed


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
    n, density = int(layout.meta["n"]), float(layout.meta["density"])
    if layer.input_shape is not None and n in EFFICIENCY:
        packed, reason, _ = time_rule(n, density, layer, tuple(layer.input_shape))
        return packed, reason
    return rule(n, density, m, k, layer.kind)


class Cpu1xN:
    """C++/OpenMP 1xN kernel (AVX-512 or AVX2, chosen at run time), dense fallback per layer."""

    # every chain of prunekit.fusion's vocabulary: shift, residual add, ReLU/ReLU6, max pooling, in the store
    epilogues = every_chain()

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
    """The packed module (or the dense fallback) and, with ``layer.epilogue``, the fused one."""
    validate(layer, layout, params.n)
    if "dense" in layout.meta:
        return _dense(layer, layout, bias, f"not pruned in 1xN blocks: {layout.meta['dense']}")
    if layer.kind == "conv2d" and layer.groups != 1:
        return _dense(layer, layout, bias, f"grouped convolution (groups={layer.groups}) is not supported")
    packed, reason = decide(layer, layout, params.fallback)
    if not packed:
        return _dense(layer, layout, bias, reason)
    try:
        lib = ops.load()
    except ext.ExtensionUnavailable as exc:
        warnings.warn(f"prunekit cpu-1xn: {exc}; layer {layer.name} stays dense", stacklevel=2)
        return _dense(layer, layout, bias, str(exc), fuse=False)
    best = int(lib.isa())
    want = {"auto": best, "avx512": 512, "avx2": 2}[params.isa]
    if want == 512 and best != 512:
        warnings.warn(f"prunekit cpu-1xn: isa = 'avx512' asked but this CPU lacks it; using avx2 ({layer.name})", stacklevel=2)
        want = 2
    module = Packed1xN(layer, layout, bias, want).eval()
    fused = Fused1xN(module, parse_epilogue(layer.epilogue)).eval() if layer.epilogue and layer.kind == "conv2d" else None
    return CompiledLayer(module=module, kernel=f"cpu-1xn/{ext.isa_name(want)}", fused=fused)


def _dense(layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, reason: str, fuse: bool = True) -> CompiledLayer:
    """Dense F.conv2d / F.linear; with an epilogue, fused = the conv then the epilogue op in one pass."""
    module = dense_module(layer, densify(layout), bias)
    fused = None
    if fuse and layer.epilogue and layer.kind == "conv2d":
        try:
            ops.load()
            fused = DenseEpilogue(module, parse_epilogue(layer.epilogue)).eval()
        except ext.ExtensionUnavailable:
            fused = None
    return CompiledLayer(module=module, kernel="dense-fallback", reason=reason, fused=fused)
