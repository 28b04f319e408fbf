"""The ``triton-block`` kernel component: Triton module on GPU / interpreter, dense fallback otherwise."""

from __future__ import annotations

import warnings

import attrs
import torch

from prunekit import hookimpl
from prunekit.blocks import dense_module
from prunekit.errors import LayoutError, PrunekitError
from prunekit.records import CompiledLayer, LayerInfo, Layout
from prunekit_triton.layout import FORMAT, densify
from prunekit_triton.modules import DTYPES, PRECISIONS, TritonBlockConv2d, TritonBlockLinear, interpreter_enabled


def runtime_mode() -> tuple[str | None, str]:
    """("gpu"|"interpreter"|None, why not) for this process."""
    if torch.cuda.is_available():
        return "gpu", ""
    if interpreter_enabled():
        return "interpreter", ""
    return None, "no CUDA device and TRITON_INTERPRET is not set: Triton needs a GPU or its CPU interpreter"


def check(layer: LayerInfo, layout: Layout, bias: torch.Tensor | None) -> None:
    if layout.format != FORMAT:
        raise LayoutError(
            f"layer {layer.name}: the triton-block kernel got a '{layout.format}' layout; pair it with layout = \"{FORMAT}\""
        )
    if tuple(layout.dense_shape) != tuple(layer.weight_shape) or layout.meta.get("kind") != layer.kind:
        raise LayoutError(
            f"layer {layer.name}: layout was packed for a {layout.meta.get('kind')} {tuple(layout.dense_shape)}, "
            f"not this {layer.kind} {tuple(layer.weight_shape)}; re-pack it for this layer"
        )
    vals = layout.tensors["values"]
    if vals.dtype not in DTYPES:
        raise LayoutError(f"layer {layer.name}: weights are {vals.dtype}; the Triton kernel takes float32, float16 or bfloat16")
    if bias is not None and (bias.dtype != vals.dtype or bias.device != vals.device):
        raise LayoutError(
            f"layer {layer.name}: bias is {bias.dtype} on {bias.device} but the weights are {vals.dtype} on "
            f"{vals.device}; give both the same dtype and device"
        )
    if layer.groups != 1:
        raise LayoutError(f"layer {layer.name}: grouped conv (groups={layer.groups}) is not supported; keep it dense")


class TritonBlockKernel:
    """Triton block-sparse Linear/Conv2d (implicit GEMM); IEEE, TF32 or 3xTF32 fp32, fp16, bf16."""

    @attrs.define
    class Params:
        precision: str = "ieee"  # fp32 tl.dot input precision: "ieee" | "tf32" | "tf32x3" (fp16/bf16 ignore it)
        tile_p: int = 0  # output positions per program on the GPU; 0 = triton.autotune per shape

        def __attrs_post_init__(self) -> None:
            if self.precision not in PRECISIONS:
                raise PrunekitError(f"precision = {self.precision!r}: use one of {', '.join(PRECISIONS)}")
            if self.tile_p and (self.tile_p < 16 or self.tile_p & (self.tile_p - 1)):
                raise PrunekitError(f"tile_p = {self.tile_p}: use 0 (autotune) or a power of two >= 16")

    @hookimpl
    def prunekit_build_kernel(
        self, layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, params: Params | None
    ) -> CompiledLayer:
        params = params if params is not None else self.Params()
        check(layer, layout, bias)
        mode, why = runtime_mode()
        if mode is None:
            warnings.warn(f"triton-block: layer {layer.name} runs dense: {why}", RuntimeWarning, stacklevel=2)
            return CompiledLayer(dense_module(layer, densify(layout), bias), "dense-fallback", why)
        cls = TritonBlockLinear if layer.kind == "linear" else TritonBlockConv2d
        module = cls(layer, layout, bias, params.precision, params.tile_p)
        return CompiledLayer(module, f"triton-block/{mode}", "")
