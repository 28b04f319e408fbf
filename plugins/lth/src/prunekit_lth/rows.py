"""Layout ``dense-rows`` and kernel ``lth-rows``: compute only the kept output channels of a layer whose
mask is all-or-nothing per output channel (Refill / Refill+), and write them at their original indices.

Layout tensors: ``rows`` int64 ``[K']``, the kept output channels in ascending order, and ``weight``
``[K', Cin/groups, kh, kw]`` (Linear ``[K', in]``), those rows of ``weight * mask``. Meta: ``kept``,
``cout``, ``kept_fraction``.

The kernel runs one thin ``F.conv2d`` / ``F.linear`` and scatters it into a full-size output whose
removed channels hold exactly what the masked dense layer gives them: their bias, or 0. The removed
channels' downstream effect (BN beta etc.) is the network's business; this layer is exact on its own.
Output assembly, measured on the 2-core Xeon (see benches/lth_rows_kernel.py "assembly"): one whole-
tensor fill (zeros, or the bias broadcast) then ``index_copy_`` of the kept channels beats filling only
the removed channels (``index_fill_``) or ``out[:, rows] = y``, markedly so for channels_last outputs.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.errors import LayoutError, PrunekitError
from prunekit.records import CompiledLayer, LayerInfo, Layout, Selection

FORMAT = "dense-rows"
FALLBACK_MODES = ("auto", "never", "always")

# Fallback model, calibrated on benches/results/lth_rows_kernel.md (every ResNet-18/50 conv shape at
# 224x224, batch 1 and 8, 1 and 2 threads, kept fractions 0.25-0.75):
#   t_rows / t_dense ~= f + BASE_OVERHEAD + SCATTER_MACS / macs_per_output + FIXED_MACS / macs_per_call
# f = kept fraction; BASE_OVERHEAD: the thin conv runs a little less efficiently than the full one;
# SCATTER_MACS: filling the full output and copying the kept channels into it costs about this many MACs
# of the conv per output element (macs_per_output = Cin/groups*kh*kw), so 1x1 convs over few input
# channels gain least; FIXED_MACS: the ~20 us per-call cost (allocation, two extra ops), counted only
# when the layer's input size is known (LayerInfo.input_shape, from compile(example)). The CPU conv
# (oneDNN) computes output channels in blocks of CHANNEL_BLOCK: K' = 33 costs what K' = 48 does.
BASE_OVERHEAD = 0.07
CHANNEL_BLOCK = 16
SCATTER_MACS = 40.0
FIXED_MACS = 3_000_000.0
MARGIN = 1.1  # predicted speed-up the thin path must reach before it is chosen


# ---------------------------------------------------------------------------------------------- layout


def kept_rows(layer: LayerInfo, mask: torch.Tensor) -> torch.Tensor:
    """The ascending kept output channels of a row mask; LayoutError unless every row is all or nothing."""
    m2 = mask.detach().reshape(mask.shape[0], -1).to(torch.bool)
    n = m2.shape[1]
    count = m2.sum(1)
    partial = torch.nonzero((count > 0) & (count < n)).flatten()
    if partial.numel():
        c = int(partial[0])
        raise LayoutError(
            f"layer {layer.name}: output channel {c} keeps {int(count[c])} of {n} weights ({partial.numel()} "
            "partial channels in all); dense-rows computes whole output channels only: pair dense-rows with a "
            "refill select (mode 'exact')"
        )
    return torch.nonzero(count == n).flatten().to(torch.int64)


def pack_rows(layer: LayerInfo, weight: torch.Tensor, selection: Selection) -> Layout:
    """The ``dense-rows`` layout of ``weight * selection.mask`` (see the module docstring)."""
    shape = tuple(weight.shape)
    if shape != tuple(layer.weight_shape) or tuple(selection.mask.shape) != shape:
        raise LayoutError(
            f"layer {layer.name}: weight {shape} / mask {tuple(selection.mask.shape)} do not match the layer's "
            f"{tuple(layer.weight_shape)}; pack the layer's own weight and selection"
        )
    rows = kept_rows(layer, selection.mask)
    mask = selection.mask.to(device=weight.device, dtype=torch.bool)
    thin = (weight.detach() * mask).index_select(0, rows.to(weight.device)).contiguous()
    cout = shape[0]
    meta = {"kept": int(rows.numel()), "cout": cout, "kept_fraction": rows.numel() / cout}
    if selection.dense_reason:
        meta["dense_reason"] = selection.dense_reason
    return Layout(format=FORMAT, dense_shape=shape, tensors={"rows": rows, "weight": thin}, meta=meta)


def validate(layer: LayerInfo, layout: Layout) -> None:
    """LayoutError unless ``layout`` is a well-formed dense-rows layout of ``layer``."""
    where = f"layer {layer.name}"
    if layout.format != FORMAT:
        raise LayoutError(f"{where}: layout format '{layout.format}' is not {FORMAT}; pair lth-rows with layout {FORMAT}")
    if tuple(layout.dense_shape) != tuple(layer.weight_shape):
        raise LayoutError(
            f"{where}: layout built for weight {tuple(layout.dense_shape)}, the layer has {tuple(layer.weight_shape)}; "
            "re-pack for this layer"
        )
    t = layout.tensors
    if "rows" not in t or "weight" not in t:
        raise LayoutError(f"{where}: dense-rows layout lacks 'rows' or 'weight'; build it with pack_rows")
    rows, w = t["rows"], t["weight"]
    cout = layer.weight_shape[0]
    ok = rows.dtype == torch.int64 and rows.dim() == 1
    ok = ok and (rows.numel() == 0 or (int(rows.min()) >= 0 and int(rows.max()) < cout))
    ok = ok and bool((rows[1:] > rows[:-1]).all())
    if not ok:
        raise LayoutError(f"{where}: 'rows' must be ascending distinct int64 channel indices below {cout}; re-pack")
    if tuple(w.shape) != (rows.numel(), *layer.weight_shape[1:]):
        raise LayoutError(f"{where}: 'weight' {tuple(w.shape)} does not hold {rows.numel()} rows of {tuple(layer.weight_shape)}")


def densify(layout: Layout) -> torch.Tensor:
    """The dense weight a dense-rows layout holds: exactly ``weight * mask`` (zeros in removed rows)."""
    w = layout.tensors["weight"]
    out = torch.zeros(layout.dense_shape, dtype=w.dtype, device=w.device)
    out.index_copy_(0, layout.tensors["rows"].to(w.device), w)
    return out


class RowsLayout:
    """Pack a whole-output-channel mask (Refill / Refill+) as the kept rows and their indices."""

    @prunekit.hookimpl
    def prunekit_transform_layout(self, layer: LayerInfo, weight: torch.Tensor, selection: Selection, params: None) -> Layout:
        return pack_rows(layer, weight, selection)


# ---------------------------------------------------------------------------------------------- kernel


@attrs.frozen
class GroupPlan:
    """How a grouped conv runs thin: the non-empty groups, each keeping the same number of channels."""

    groups: int  # groups of the thin conv
    in_index: torch.Tensor | None  # input channels to gather (None: all groups kept)


def group_plan(layer: LayerInfo, rows: torch.Tensor) -> GroupPlan | str:
    """A GroupPlan, or why the thin conv cannot keep the group structure (then the layer runs dense)."""
    g = layer.groups
    if layer.kind != "conv2d" or g == 1 or rows.numel() == 0:
        return GroupPlan(1, None)
    cout, cin_g = layer.weight_shape[0], layer.weight_shape[1]
    per = torch.bincount(rows.cpu() // (cout // g), minlength=g)
    live = torch.nonzero(per).flatten()
    counts = per[live].unique()
    if counts.numel() != 1:
        return (
            f"grouped conv (groups={g}) keeps unequal channel counts per group ({sorted(counts.tolist())}); "
            "a thin grouped conv needs the same count in every non-empty group"
        )
    if live.numel() == g:
        return GroupPlan(g, None)
    in_index = (live[:, None] * cin_g + torch.arange(cin_g)[None, :]).flatten()
    return GroupPlan(int(live.numel()), in_index)


class RowsModule(nn.Module):
    """Conv2d / Linear computing only the kept output channels; removed channels output their bias or 0."""

    def __init__(self, layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, plan: GroupPlan) -> None:
        super().__init__()
        self.name = layer.name
        self.kind = layer.kind
        self.out_channels = layer.weight_shape[0]
        self.stride, self.padding, self.dilation = tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation)
        self.kernel_size = tuple(layer.weight_shape[2:])
        self.groups = plan.groups
        rows = layout.tensors["rows"]
        w = layout.tensors["weight"].detach()
        self.kept = int(rows.numel())
        self.identity = self.kept == self.out_channels  # rows == arange: no scatter needed
        self.register_buffer("rows", rows.to(w.device).clone())
        self.register_buffer("weight", w.clone())
        self.register_buffer("in_index", None if plan.in_index is None else plan.in_index.to(w.device))
        b = None if bias is None else bias.detach().to(device=w.device, dtype=w.dtype)
        self.register_buffer("bias", None if b is None else b.clone())  # full size: the removed channels' value
        self.register_buffer("thin_bias", None if b is None else b.index_select(0, self.rows))

    def extra_repr(self) -> str:
        return f"{self.kind}, kept {self.kept}/{self.out_channels} output channels"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            y = F.linear(x, self.weight, self.thin_bias) if self.kept else None
            return self._assemble(y, x, y.dim() - 1 if y is not None else x.dim() - 1)
        cdim = x.dim() - 3  # 0 for an unbatched [C, H, W] input
        y = None
        if self.kept:
            xin = x if self.in_index is None else x.index_select(cdim, self.in_index)
            y = F.conv2d(xin, self.weight, self.thin_bias, self.stride, self.padding, self.dilation, self.groups)
        return self._assemble(y, x, cdim)

    def _assemble(self, y: torch.Tensor | None, x: torch.Tensor, cdim: int) -> torch.Tensor:
        if self.identity:
            return y
        ref = y if y is not None else x
        shape = list(ref.shape) if y is not None else self._out_shape(x)
        shape[cdim] = self.out_channels
        fmt = torch.contiguous_format
        if ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last):
            fmt = torch.channels_last  # dense F.conv2d keeps channels_last; so do we
        dtype = y.dtype if y is not None else torch.result_type(x, self.weight)
        out = torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)
        if self.bias is None:
            out.zero_()
        else:
            view = [1] * len(shape)
            view[cdim] = self.out_channels
            out.copy_(self.bias.view(view).expand(shape))
        if y is not None:
            out.index_copy_(cdim, self.rows, y)
        return out

    def _out_shape(self, x: torch.Tensor) -> list[int]:
        """Output shape when no channel is kept (no conv to read it from)."""
        if self.kind == "linear":
            return list(x.shape)
        size = list(x.shape)
        for i in range(2):
            k, s, p, d = self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]
            size[-2 + i] = (size[-2 + i] + 2 * p - d * (k - 1) - 1) // s + 1
        return size


def dense_module(layer: LayerInfo, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The plain torch layer with the (already masked) weight: what a dense fallback runs."""
    if layer.kind == "linear":
        out_f, in_f = layer.weight_shape
        mod: nn.Module = nn.Linear(in_f, out_f, bias=bias is not None)
    else:
        cout, cin_g, kh, kw = layer.weight_shape
        mod = nn.Conv2d(
            cin_g * layer.groups, cout, (kh, kw), stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, bias=bias is not None,
        )  # fmt: skip
    mod = mod.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        mod.weight.copy_(weight)
        if bias is not None:
            mod.bias.copy_(bias)
    return mod.eval()


def predicted_speedup(layer: LayerInfo, kept: int) -> float:
    """t_dense / t_rows by the calibrated model above."""
    cout = layer.weight_shape[0]
    f = min(cout, -(-kept // CHANNEL_BLOCK) * CHANNEL_BLOCK) / cout
    per_out = math.prod(layer.weight_shape[1:])
    ratio = f + BASE_OVERHEAD + SCATTER_MACS / per_out
    if layer.input_shape is not None:
        ratio += FIXED_MACS / max(dense_macs(layer), 1)
    return 1.0 / ratio


def rule(layer: LayerInfo, kept: int, threshold: float | None = None) -> tuple[bool, str]:
    """The calibrated model: (thin path?, reason when not). ``threshold`` replaces it by a kept-fraction limit."""
    cout = layer.weight_shape[0]
    f = kept / cout
    if kept == cout:
        return False, "every output channel is kept: nothing to skip, dense is the same computation"
    if kept == 0:
        return True, ""  # the layer is its bias: one fill, always cheaper than the conv
    if threshold is not None:
        if f > threshold:
            return False, f"kept fraction {f:.2f} > threshold {threshold:.2f} (params.threshold)"
        return True, ""
    speed = predicted_speedup(layer, kept)
    if speed < MARGIN:
        size = "" if layer.input_shape is None else f", {dense_macs(layer) / 1e6:.1f} M MACs per call"
        return False, (
            f"predicted speed-up {speed:.2f}x < {MARGIN}x (kept fraction {f:.2f}, "
            f"{math.prod(layer.weight_shape[1:])} MACs per output element{size}): dense is faster"
        )
    return True, ""


def dense_macs(layer: LayerInfo) -> int:
    """Multiply-accumulates of one dense call on ``layer.input_shape``."""
    shape = layer.input_shape
    per_out = math.prod(layer.weight_shape[1:])
    if layer.kind == "linear":
        return math.prod(shape[:-1]) * layer.weight_shape[0] * per_out
    batch = shape[0] if len(shape) == 4 else 1
    out_hw = 1
    for i in range(2):
        k, s, p, d = layer.weight_shape[2 + i], layer.stride[i], layer.padding[i], layer.dilation[i]
        out_hw *= (shape[-2 + i] + 2 * p - d * (k - 1) - 1) // s + 1
    return batch * out_hw * layer.weight_shape[0] * per_out


class RowsKernel:
    """Thin dense conv/linear over the kept output channels, scattered to their original indices."""

    tolerance = 1e-5

    @attrs.define
    class Params:
        fallback: str = "auto"  # auto: calibrated rule; never: always thin; always: always dense
        threshold: float | None = None  # auto only: thin iff kept fraction <= threshold (overrides the model)

        def __attrs_post_init__(self) -> None:
            if self.fallback not in FALLBACK_MODES:
                raise PrunekitError(f"fallback = {self.fallback!r}: use one of {', '.join(FALLBACK_MODES)}")
            if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
                raise PrunekitError(f"threshold = {self.threshold!r}: give a kept fraction in [0, 1], or leave it unset")

    @prunekit.hookimpl
    def prunekit_build_kernel(
        self, layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, params: Params | None
    ) -> CompiledLayer:
        return build(layer, layout, bias, params if params is not None else RowsKernel.Params())


def build(layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, params: RowsKernel.Params) -> CompiledLayer:
    validate(layer, layout)
    if bias is not None and tuple(bias.shape) != (layer.weight_shape[0],):
        raise LayoutError(f"layer {layer.name}: bias {tuple(bias.shape)} does not match {layer.weight_shape[0]} output channels")
    kept = int(layout.tensors["rows"].numel())
    if params.fallback == "always":
        return _dense(layer, layout, bias, "fallback = 'always' keeps every layer dense")
    plan = group_plan(layer, layout.tensors["rows"])
    if isinstance(plan, str):
        return _dense(layer, layout, bias, plan)
    if params.fallback == "auto":
        thin, reason = rule(layer, kept, params.threshold)
        if not thin:
            return _dense(layer, layout, bias, reason)
    module = RowsModule(layer, layout, bias, plan).eval()
    return CompiledLayer(module=module, kernel="lth-rows")


def _dense(layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, reason: str) -> CompiledLayer:
    return CompiledLayer(module=dense_module(layer, densify(layout), bias), kernel="dense-fallback", reason=reason)
