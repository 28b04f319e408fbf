"""Block geometry every block method and kernel shares, stated once and method-neutral.

The GEMM view of a weight is ``[Cout, K]`` with ``K = Cin/groups * kh * kw`` in PyTorch flatten order
``(cin, kh, kw)`` (linear: ``[out, in]``). A block extent of ``0`` means the whole dimension. A *row
block* is ``n`` consecutive output channels (in the coordinates where blocks are formed) times one block
column: one input channel with all its ``kh*kw`` taps (``granularity = "kernel"``, the 1xN papers' block)
or one GEMM column (``"tap"``; linear layers always). The grid is ``[R, C]`` with ``R = ceil(Cout / n)``.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from prunekit.errors import LayoutError, PrunekitError, SelectionError
from prunekit.records import LayerInfo

BLOCK_HEIGHTS: tuple[int, ...] = (2, 4, 8, 16, 32)  # row-block heights every row-block kernel here supports
GRANULARITIES: tuple[str, ...] = ("kernel", "tap")
COUT_POLICIES: tuple[str, ...] = ("error", "ragged", "skip")


def check_block_height(n: int, what: str = "n", error: type[PrunekitError] = SelectionError) -> None:
    if n not in BLOCK_HEIGHTS:
        raise error(f"{what} = {n} is not a supported block height; use one of {', '.join(map(str, BLOCK_HEIGHTS))}")


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise SelectionError(
            f"granularity = '{granularity}' is unknown; use 'kernel' (N channels x 1 input channel x all kh*kw taps) "
            "or 'tap' (N channels x one weight column)"
        )


def check_cout_policy(policy: str) -> None:
    if policy not in COUT_POLICIES:
        raise SelectionError(
            f"cout_policy = '{policy}' is unknown; use 'error', 'ragged' (last block-row smaller) or 'skip' (layer stays dense)"
        )


def resolve_block(
    shape: tuple[int, ...], block: tuple[int, ...] | list[int], where: str, error: type[PrunekitError] = SelectionError
) -> tuple[int, ...]:
    """One extent per weight dim with ``0`` replaced by the whole dimension; names the fix when wrong."""
    block = tuple(int(b) for b in block)
    if len(block) != len(shape):
        raise error(
            f"{where}: block {list(block)} has {len(block)} entries but the weight {list(shape)} has {len(shape)} "
            "dims; give one block extent per dim (0 = whole dim)"
        )
    negative = [d for d, b in enumerate(block) if b < 0]
    if negative:
        raise error(
            f"{where}: block {list(block)} has a negative extent for dim {negative[0]}; use 0 (whole dim) or a positive size"
        )
    return tuple(n if b == 0 else b for b, n in zip(block, shape))


def gemm_view(weight: torch.Tensor) -> torch.Tensor:
    """``[Cout, K]``: the weight as the matrix every block pattern is stated on."""
    return weight.reshape(weight.shape[0], -1)


@attrs.frozen
class RowBlocks:
    """The row-block grid of one layer (in the coordinates where blocks are formed)."""

    layer: str
    weight_shape: tuple[int, ...]
    n: int
    cols: int  # C: block columns
    width: int  # GEMM columns per block column (kh*kw for 'kernel', 1 for 'tap' and linear)

    @property
    def cout(self) -> int:
        return self.weight_shape[0]

    @property
    def rows(self) -> int:
        return -(-self.cout // self.n)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def last_rows(self) -> int:
        """Output channels in the last block-row (N unless the layer is ragged)."""
        return self.cout - (self.rows - 1) * self.n

    @property
    def ragged(self) -> bool:
        return self.last_rows != self.n

    @property
    def numel(self) -> int:
        return self.cout * self.cols * self.width

    @property
    def block(self) -> tuple[int, ...]:
        """``Selection.block`` of this grid: ``(n, 1)`` linear, ``(n, 1, kh, kw)`` or ``(n, 1, 1, 1)`` conv."""
        if len(self.weight_shape) == 2:
            return (self.n, 1)
        kh, kw = self.weight_shape[2:]
        return (self.n, 1, kh, kw) if self.width == kh * kw and self.width > 1 else (self.n, 1, 1, 1)

    @classmethod
    def of(
        cls, layer: LayerInfo, n: int, granularity: str = "kernel", cout_policy: str = "error", method: str = "1xN"
    ) -> RowBlocks | None:
        """The layer's grid, or ``None`` when ``cout_policy = "skip"`` leaves it dense.

        Raises SelectionError for grouped convs, layers with fewer than N outputs and (policy "error")
        Cout not divisible by N, naming the layer and the fix; ``method`` names the blocks in messages.
        """
        check_granularity(granularity)
        check_cout_policy(cout_policy)
        if layer.kind == "conv2d" and layer.groups != 1:
            raise SelectionError(
                f"layer {layer.name} is a grouped/depthwise conv (groups={layer.groups}); {method} blocks are defined "
                f'for groups=1 only: add it to exclude (exclude = ["{layer.name}"]) or keep skip_grouped = true'
            )
        cout = layer.weight_shape[0]
        if cout < n or cout % n:
            if cout_policy == "skip":
                return None
            if cout < n:
                raise SelectionError(
                    f"layer {layer.name} has Cout={cout} < N={n}: too small for one {method} block; exclude it, "
                    'set cout_policy = "skip", or use a smaller n'
                )
            if cout_policy == "error":
                raise SelectionError(
                    f'layer {layer.name}: Cout={cout} is not a multiple of N={n}; set cout_policy = "ragged" '
                    f'(last block-row has {cout % n} channels) or "skip" (layer stays dense), exclude the layer, '
                    "or choose an n that divides Cout"
                )
        shape = tuple(layer.weight_shape)
        if layer.kind == "linear":
            return cls(layer.name, shape, n, shape[1], 1)
        _, cin, kh, kw = shape
        if granularity == "kernel":
            return cls(layer.name, shape, n, cin, kh * kw)
        return cls(layer.name, shape, n, cin * kh * kw, 1)

    def blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """``[R, C, N*width]``: the weights of every block; a ragged last row is padded with zeros."""
        g = weight.reshape(self.cout, self.cols, self.width)
        pad = self.rows * self.n - self.cout
        if pad:
            g = torch.cat([g, g.new_zeros(pad, self.cols, self.width)])
        return g.reshape(self.rows, self.n, self.cols, self.width).transpose(1, 2).reshape(self.rows, self.cols, -1)

    def block_sizes(self) -> torch.Tensor:
        """``[R, C]`` weights per block (smaller on a ragged last row)."""
        sizes = torch.full(self.shape, self.n * self.width, dtype=torch.long)
        sizes[-1] = self.last_rows * self.width
        return sizes

    def expand(self, keep: torch.Tensor) -> torch.Tensor:
        """Block decisions ``[R, C]`` -> bool mask of the weight's shape (same coordinates as the grid)."""
        if tuple(keep.shape) != self.shape:
            raise SelectionError(f"layer {self.layer}: block grid {tuple(keep.shape)} does not match {self.shape}")
        full = keep.bool()[:, None, :, None].expand(self.rows, self.n, self.cols, self.width)
        return full.reshape(self.rows * self.n, self.cols * self.width)[: self.cout].reshape(self.weight_shape)


def dense_module(layer: LayerInfo, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The plain torch layer with the given (already masked) weight: what a kernel's dense fallback runs."""
    if layer.kind == "linear":
        out_f, in_f = layer.weight_shape
        mod: nn.Module = nn.Linear(in_f, out_f, bias=bias is not None)
    else:
        cout, cpg, kh, kw = layer.weight_shape
        mod = nn.Conv2d(
            cpg * layer.groups, cout, (kh, kw), stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
            groups=layer.groups, bias=bias is not None,
        )  # fmt: skip
    if tuple(weight.shape) != tuple(layer.weight_shape):
        raise LayoutError(f"layer {layer.name}: dense weight {tuple(weight.shape)} does not match {tuple(layer.weight_shape)}")
    with torch.no_grad():
        mod = mod.to(device=weight.device, dtype=weight.dtype)
        mod.weight.copy_(weight)
        if bias is not None:
            mod.bias.copy_(bias)
    return mod.eval()

