"""The modules that replace pruned layers: packed 1xN conv/linear, computing F.conv2d/F.linear exactly, and
the fused modules that compute a layer and its epilogue (prunekit.fusion) in one kernel call."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import LayoutError
from prunekit.fusion import Epilogue, apply_epilogue
from prunekit.records import LayerInfo, Layout
from prunekit_cpu1xn import ext, ops
from prunekit_cpu1xn.layout import densify, row_ptr_of

_OP = None  # the loaded op (torch.ops.prunekit_cpu1xn.conv2d.default), looked up on first use
_EPI = None  # torch.ops.prunekit_cpu1xn.epilogue.default
_NO_EPILOGUE = (None, None, 0, 0, 0, 0)  # shift, residual, act, pool k/s/p
ACT_CODES = {"": 0, "relu": 1, "relu6": 2}


def _op():  # noqa: ANN202
    global _OP
    if _OP is None:
        _OP = ops.conv2d()
    return _OP


def _epi():  # noqa: ANN202
    global _EPI
    if _EPI is None:
        _EPI = ops.epilogue()
    return _EPI


class Packed1xN(nn.Module):
    """A conv2d or linear layer whose weight is a pack-1xn layout, run by the C++ kernel.

    Inputs the kernel cannot take (not fp32, not on the CPU, or needing autograd) are computed densely
    from the same weights with a one-time warning saying why, so the answer is always the layer's.
    """

    def __init__(self, layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, isa: int) -> None:
        super().__init__()
        self.kind = layer.kind
        self.name = layer.name
        self.weight_shape = tuple(layer.weight_shape)
        self.out_channels = layer.weight_shape[0]
        self.in_channels = layer.weight_shape[1]
        if layer.kind == "conv2d":
            self.kernel_size = tuple(layer.weight_shape[2:])
            self.stride, self.padding, self.dilation = tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation)
        else:
            self.kernel_size, self.stride, self.padding, self.dilation = (1, 1), (1, 1), (0, 0), (1, 1)
        self.runs = bool(layout.meta["runs"])
        self.n = int(layout.meta["n"])
        self.isa = isa
        self.layout_meta = dict(layout.meta)
        t = layout.tensors
        self.register_buffer("values", t["values"].detach().to(torch.float32).contiguous().reshape(-1, self.n))
        self.register_buffer("indices", t["indices"].to(torch.int32).contiguous().reshape(-1))
        self.register_buffer("row_ptr", row_ptr_of(layout).to(torch.int64).contiguous())
        self.register_buffer("out_rows", t["out_rows"].to(torch.int64).contiguous())
        self._layout = layout
        if bias is not None:
            rows = self.out_rows
            slot_bias = torch.zeros(rows.numel(), dtype=torch.float32)
            slot_bias[rows >= 0] = bias.detach().to(torch.float32)[rows[rows >= 0]]
            self.register_buffer("slot_bias", slot_bias)
            self.register_buffer("bias", bias.detach().to(torch.float32).clone())
        else:
            self.register_buffer("slot_bias", None)
            self.register_buffer("bias", None)
        self._dense: torch.Tensor | None = None
        self._poison = False
        _op()  # look the op up now: traced code (torch.compile) must not meet the loader
        self._warned: set[str] = set()
        self._refresh()

    # The hot path passes one prebuilt argument tuple to the op (the per-call Python cost is what a small
    # layer pays on top of the kernel); it is rebuilt whenever the buffers are replaced (_apply).
    def _refresh(self) -> None:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        self._static = (
            self.values, self.indices, self.row_ptr, self.out_rows, self.slot_bias,
            self.out_channels, kh, kw, sh, sw, ph, pw, dh, dw, self.runs, self.isa, self._poison,
        )  # fmt: skip
        self._plain = self._static + _NO_EPILOGUE

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        out = super()._apply(fn, *args, **kwargs)
        self._refresh()
        return out

    @property
    def poison_output(self) -> bool:
        """Tests: the kernel fills its output with NaN before writing it, so a missed element shows."""
        return self._poison

    @poison_output.setter
    def poison_output(self, value: bool) -> None:
        self._poison = bool(value)
        self._refresh()

    def extra_repr(self) -> str:
        return f"{self.kind} {self.weight_shape}, N={self.n}, runs={self.runs}, isa={ext.isa_name(self.isa)}"

    def dense_weight(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = densify(self._layout)
        return self._dense

    def _dense_forward(self, x: torch.Tensor, why: str) -> torch.Tensor:
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"prunekit cpu-1xn, layer {self.name}: {why}; computing this call densely", stacklevel=3)
        w = self.dense_weight().to(device=x.device, dtype=x.dtype)
        b = self.bias.to(device=x.device, dtype=x.dtype) if self.bias is not None else None
        if self.kind == "linear":
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_input(x):
            return self._call(x.contiguous())
        return self._checked_forward(x)

    def _call(self, x4: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: name the buffers, so freezing / export see them as such
            return _op()(x4, *self._args(), *_NO_EPILOGUE)
        return _op()(x4, *self._plain)

    def _args(self) -> tuple:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (self.values, self.indices, self.row_ptr, self.out_rows, self.slot_bias, self.out_channels,
                kh, kw, sh, sw, ph, pw, dh, dw, self.runs, self.isa, self._poison)  # fmt: skip

    def out_hw(self, x: torch.Tensor) -> tuple[int, int]:
        """Output height and width of the conv for input ``x`` (before any pooling)."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return ((x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    def fast_input(self, x: torch.Tensor) -> bool:
        """Whether the kernel takes ``x`` as it is (else forward computes densely or raises)."""
        return (
            self.kind == "conv2d"
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.dim() == 4
            and x.shape[1] == self.in_channels
            and not (x.requires_grad and torch.is_grad_enabled())
        )

    def call_fused(self, x4: torch.Tensor, shift: torch.Tensor | None, residual: torch.Tensor | None, act: int,
                   pool: tuple[int, int, int]) -> torch.Tensor:  # fmt: skip
        """conv + shift (per output channel) + residual, activation, max pooling: one kernel call."""
        if torch.compiler.is_compiling():
            return _op()(x4, *self._args(), shift, residual, act, *pool)
        return _op()(x4, *self._static, shift, residual, act, *pool)

    def _checked_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self._dense_forward(x, f"input is on {x.device}, the kernel runs on the CPU")
        if x.dtype != torch.float32:
            return self._dense_forward(x, f"input is {x.dtype}, the kernel computes float32")
        if torch.is_grad_enabled() and x.requires_grad:
            return self._dense_forward(x, "autograd is recording and the kernel has no backward")
        if self.kind == "linear":
            return self._linear(x)
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise LayoutError(
                f"layer {self.name}: expected input [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        y = self._call(x.contiguous())
        return y.squeeze(0) if squeeze else y

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_channels:
            raise LayoutError(f"layer {self.name}: expected input [..., {self.in_channels}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        xt = x.reshape(-1, self.in_channels).t().contiguous()  # [in, P]: channel-major, P on the SIMD axis
        p = xt.shape[1]
        if p == 0:
            return x.new_empty(*lead, self.out_channels)
        y = self._call(xt.view(1, self.in_channels, 1, p))
        return y.view(self.out_channels, p).t().reshape(*lead, self.out_channels)


def _tensor_ok(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and not (t.requires_grad and torch.is_grad_enabled()))


class _WithEpilogue(nn.Module):
    """What both fused modules hold: the epilogue, its kernel codes, and how a call's tensors split."""

    def __init__(self, epilogue: Epilogue) -> None:
        super().__init__()
        self.epilogue = epilogue
        self.chain = epilogue.chain
        self._act = ACT_CODES[epilogue.act]
        self._pool = epilogue.pool or (0, 0, 0)

    def extra_repr(self) -> str:
        return f"+ {self.chain}"

    def split(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(shift, residual) of ``fused(x, *tensors)``: the chain's ``bias`` tensor first, then ``add``'s."""
        return (tensors[0] if self.epilogue.bias else None), (tensors[-1] if self.epilogue.add else None)


class Fused1xN(_WithEpilogue):
    """A packed conv followed by its epilogue (``prunekit.fusion`` chain), in one kernel call: the shift
    initialises the accumulators, the residual is added and the activation applied in the output store, and
    max pooling runs over the conv's output before it leaves the call.

    Called as ``fused(x, *tensors)`` (the chain's ``bias`` shift, then its ``add`` residual). Inputs the
    kernel cannot take (another dtype or device, autograd, a residual of another shape) are computed by the
    packed module followed by the epilogue in plain torch: the answer is always the same.
    """

    def __init__(self, base: Packed1xN, epilogue: Epilogue) -> None:
        super().__init__(epilogue)
        self.base = base

    def forward(self, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        # the hot path of every fused layer: a few cheap checks (a small layer's kernel call is ~50 us)
        ep = self.epilogue
        shift, residual = self.split(tensors)
        base = self.base
        if base.fast_input(x) and _tensor_ok(shift) and _tensor_ok(residual):
            x = x.contiguous()
            if residual is not None:
                h, w = base.out_hw(x)
                if residual.shape != (x.shape[0], base.out_channels, h, w):
                    return apply_epilogue(base(x), ep, *tensors)
                residual = residual.contiguous()
            if shift is not None and (shift.dim() != 1 or not shift.is_contiguous()):
                shift = shift.reshape(-1).contiguous()
            return base.call_fused(x, shift, residual, self._act, self._pool)
        return apply_epilogue(base(x), ep, *tensors)


class DenseEpilogue(_WithEpilogue):
    """A dense conv (F.conv2d, oneDNN) followed by its epilogue in one pass of the kernel library's
    ``epilogue`` op (shift, residual, activation, max pooling), instead of one pass per op."""

    def __init__(self, conv: nn.Module, epilogue: Epilogue) -> None:
        super().__init__(epilogue)
        _epi()  # looked up now, not under torch.compile
        self.conv = conv

    def forward(self, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ep = self.epilogue
        y = self.conv(x)
        shift, residual = self.split(tensors)
        if (
            y.dim() == 4 and _tensor_ok(y) and _tensor_ok(shift) and _tensor_ok(residual)
            and (residual is None or residual.shape == y.shape)
        ):  # fmt: skip
            return _epi()(y, None if shift is None else shift.reshape(-1).contiguous(), residual, self._act, *self._pool)
        return apply_epilogue(y, ep, *tensors)
