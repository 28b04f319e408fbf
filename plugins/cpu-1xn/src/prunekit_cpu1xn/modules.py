"""The modules that replace pruned layers: packed 1xN conv/linear, computing F.conv2d/F.linear exactly."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import LayoutError
from prunekit.records import LayerInfo, Layout
from prunekit_cpu1xn import ext
from prunekit_cpu1xn.layout import densify, row_ptr_of

_OP = None  # the loaded op (torch.ops.prunekit_cpu1xn.conv2d.default), looked up on first use


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
        if (
            self.kind == "conv2d"
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.dim() == 4
            and x.shape[1] == self.in_channels
            and not (x.requires_grad and torch.is_grad_enabled())
        ):
            return self._call(x.contiguous())
        return self._checked_forward(x)

    def _call(self, x4: torch.Tensor) -> torch.Tensor:
        global _OP
        if _OP is None:
            _OP = ext.load().conv2d.default
        return _OP(x4, *self._static)

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

