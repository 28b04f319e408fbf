"""CSR inference modules (Linear as SpMM, Conv2d as unfold + SpMM) and the dense fallback.

``fallback`` decides per layer: ``"never"`` always builds the CSR module, ``"always"`` the dense one, and
``"auto"`` (default) times both on a probe input built from the LayerInfo (Linear: ``[probe_batch, in]``;
Conv2d: ``[probe_batch, Cin, probe_hw, probe_hw]``, since LayerInfo carries no spatial size) and keeps the
faster one; the CompiledLayer's ``reason`` quotes both timings (best of 25 after a warm-up; CSR must be at
least 10 % faster). The choice is a measurement, so it can differ between machines and runs; the function computed cannot. Both modules compute
``F.linear/F.conv2d(x, W * mask, bias)``; only the summation order differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import CompiledLayer, Layout, LayoutError, hookimpl
from prunekit.records import LayerInfo
from prunekit_magnitude.csr import densify


class _CsrBase(nn.Module):
    def __init__(self, layout: Layout, bias: torch.Tensor | None) -> None:
        super().__init__()
        t = layout.tensors
        self.register_buffer("crow_indices", t["crow_indices"].clone())
        self.register_buffer("col_indices", t["col_indices"].clone())
        self.register_buffer("values", t["values"].clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        self.gemm_shape = tuple(layout.meta["gemm_shape"])

    def matrix(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(
            self.crow_indices, self.col_indices, self.values, size=self.gemm_shape, check_invariants=False
        )


class CsrLinear(_CsrBase):
    """``y = x W^T + b`` with W in CSR: computed as ``(W @ x^T)^T``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.sparse.mm(self.matrix(), x2.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.gemm_shape[0])


class CsrConv2d(_CsrBase):
    """Conv2d (groups = 1) as GEMM: unfold the input to ``[Cin*kh*kw, B*L]`` and multiply by the CSR weight."""

    def __init__(self, layer: LayerInfo, layout: Layout, bias: torch.Tensor | None) -> None:
        super().__init__(layout, bias)
        self.kernel_size = tuple(layer.weight_shape[2:])
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        k, length = cols.shape[1], cols.shape[2]
        cols = cols.transpose(0, 1).reshape(k, b * length)  # [K, B*L], column order (cin, kh, kw) = weight's
        y = torch.sparse.mm(self.matrix(), cols)  # [M, B*L]
        y = y.reshape(self.gemm_shape[0], b, ho, wo).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y.contiguous()


class DenseMasked(nn.Module):
    """The masked dense layer (weight densified from the layout): the fallback path."""

    def __init__(self, layer: LayerInfo, layout: Layout, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", densify(layout).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        self.kind = layer.kind
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


# CSR must beat dense by 10 %: near a tie the timing noise would pick either path run to run.
CSR_MARGIN = 0.9


def _times_ms(fn: Callable[[], torch.Tensor], sync: bool, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _warm(fn: Callable[[], torch.Tensor], seconds: float = 0.02, at_most: int = 200) -> None:
    # time-bounded: the first calls in a process pay thread-pool and sparse-handle start-up (ms each)
    t0 = time.perf_counter()
    for i in range(at_most):
        fn()
        if i >= 2 and time.perf_counter() - t0 > seconds:
            break


def time_both(sparse: nn.Module, dense: nn.Module, x: torch.Tensor, rounds: int = 5, repeats: int = 5) -> tuple[float, float]:
    """Best-of ms of the sparse and the dense module on ``x`` (after warm-up; rounds interleaved).

    The minimum, not the median: on a shared CPU, interference only ever adds time (an OpenMP barrier can
    wait a whole scheduler tick), so the fastest sample is the closest to what each path costs.
    """
    sync = x.is_cuda
    ts: list[float] = []
    td: list[float] = []
    with torch.inference_mode():
        _warm(lambda: sparse(x))
        _warm(lambda: dense(x))
        for _ in range(rounds):
            ts += _times_ms(lambda: sparse(x), sync, repeats)
            td += _times_ms(lambda: dense(x), sync, repeats)
    return min(ts), min(td)


def probe_input(layer: LayerInfo, batch: int, hw: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if layer.kind == "linear":
        return torch.randn(batch, layer.weight_shape[1], generator=g).to(device)
    cin = layer.weight_shape[1] * layer.groups
    # big enough for one output pixel whatever the kernel, dilation and padding
    kh, kw = layer.weight_shape[2:]
    h = max(hw, layer.dilation[0] * (kh - 1) + 1 - 2 * layer.padding[0])
    w = max(hw, layer.dilation[1] * (kw - 1) + 1 - 2 * layer.padding[1])
    return torch.randn(batch, cin, h, w, generator=g).to(device)


class CsrKernel:
    """CSR SpMM for Linear and Conv2d (unfold + SpMM); per-layer dense fallback when it is faster."""

    @attrs.define
    class Params:
        fallback: str = "auto"
        probe_batch: int = 1
        probe_hw: int = 14

        def __attrs_post_init__(self) -> None:
            if self.fallback not in ("auto", "never", "always"):
                raise LayoutError(f"fallback = {self.fallback!r} is unknown; use \"auto\", \"never\" or \"always\"")
            if self.probe_batch < 1 or self.probe_hw < 1:
                raise LayoutError(f"probe_batch = {self.probe_batch}, probe_hw = {self.probe_hw}; both must be >= 1")

    @hookimpl
    def prunekit_build_kernel(self, layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, params: Params | None) -> CompiledLayer:
        p = params or CsrKernel.Params()
        if layout.format != "csr":
            raise LayoutError(f"layer {layer.name}: kernel 'csr' reads a csr layout, got {layout.format!r}; pair it with layout = \"csr\"")
        sp = float(layout.meta["sparsity"])
        be = float(layout.meta["break_even_sparsity"])
        facts = f"sparsity {sp:.3f}, CSR storage break-even {be:.3f}"
        if layer.kind == "conv2d" and layer.groups != 1:
            return CompiledLayer(DenseMasked(layer, layout, bias), "dense-fallback", f"groups = {layer.groups}: the CSR GEMM handles groups = 1 only; {facts}")
        if p.fallback == "always":
            return CompiledLayer(DenseMasked(layer, layout, bias), "dense-fallback", f"fallback = always; {facts}")
        sparse: nn.Module = CsrLinear(layout, bias) if layer.kind == "linear" else CsrConv2d(layer, layout, bias)
        if p.fallback == "never":
            return CompiledLayer(sparse, "csr", f"fallback = never; {facts}")
        dense = DenseMasked(layer, layout, bias)
        x = probe_input(layer, p.probe_batch, p.probe_hw, layout.tensors["values"].device)
        ts, td = time_both(sparse, dense, x)
        shape = f"batch {p.probe_batch}" + (f", {p.probe_hw}x{p.probe_hw}" if layer.kind == "conv2d" else "")
        measured = f"csr {ts:.3f} ms vs dense {td:.3f} ms best of 25 ({shape}, {torch.get_num_threads()} threads)"
        if ts < CSR_MARGIN * td:
            return CompiledLayer(sparse, "csr", f"{facts}; {measured}")
        return CompiledLayer(dense, "dense-fallback", f"{facts}; {measured}")
