"""The 1xN block grid of one layer: which weights form a block, and back.

On the GEMM view ``[Cout, Cin*kh*kw]`` (column order ``(cin, kh, kw)``) a 1xN block is N consecutive rows
(output channels) times one *block column*: the kh*kw run of one input channel (granularity ``kernel``, the
papers' block) or a single column (granularity ``tap``). Linear layers ``[out, in]`` have one column per
input feature. The grid is ``[R, C]``: ``R = ceil(Cout / N)`` block-rows, ``C`` block columns. A block never
straddles two input channels, whatever Cout is.
"""

from __future__ import annotations

import attrs
import torch

from prunekit.errors import SelectionError
from prunekit.records import LayerInfo

SUPPORTED_N = (2, 4, 8, 16, 32)
GRANULARITIES = ("kernel", "tap")
COUT_POLICIES = ("error", "ragged", "skip")


def check_common(n: int, granularity: str, cout_policy: str) -> None:
    """Validate the parameters every onexn component shares (called from each Params)."""
    if n not in SUPPORTED_N:
        raise SelectionError(
            f"n = {n} is not a supported 1xN block height; use one of {', '.join(map(str, SUPPORTED_N))}"
        )
    if granularity not in GRANULARITIES:
        raise SelectionError(
            f"granularity = '{granularity}' is unknown; use 'kernel' (N channels x 1 input channel x all kh*kw taps) "
            "or 'tap' (N channels x one weight column)"
        )
    if cout_policy not in COUT_POLICIES:
        raise SelectionError(
            f"cout_policy = '{cout_policy}' is unknown; use 'error', 'ragged' (last block-row smaller) or 'skip' (layer stays dense)"
        )


@attrs.frozen
class BlockGrid:
    """Block geometry of one layer (in the coordinates where blocks are formed)."""

    layer: str
    weight_shape: tuple[int, ...]
    n: int
    cols: int  # C: block columns
    width: int  # GEMM columns per block column (kh*kw for 'kernel', 1 for 'tap' and linear)
    block: tuple[int, ...]  # Selection.block: block extent per weight dim

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

    @classmethod
    def of(cls, layer: LayerInfo, n: int, granularity: str = "kernel", cout_policy: str = "error") -> BlockGrid | None:
        """The layer's grid, or ``None`` when ``cout_policy='skip'`` leaves it dense.

        Raises SelectionError for grouped convs, layers with fewer than N outputs and (policy 'error')
        Cout not divisible by N, naming the layer and the fix.
        """
        if layer.kind == "conv2d" and layer.groups != 1:
            raise SelectionError(
                f"layer {layer.name} is a grouped/depthwise conv (groups={layer.groups}); 1xN blocks are defined for "
                f'groups=1 only: add it to exclude (exclude = ["{layer.name}"]) or keep skip_grouped = true'
            )
        cout = layer.weight_shape[0]
        if cout < n or cout % n:
            if cout_policy == "skip":
                return None
            if cout < n:
                raise SelectionError(
                    f"layer {layer.name} has Cout={cout} < N={n}: too small for one 1xN block; exclude it, "
                    f'set cout_policy = "skip", or use a smaller n'
                )
            if cout_policy == "error":
                raise SelectionError(
                    f'layer {layer.name}: Cout={cout} is not a multiple of N={n}; set cout_policy = "ragged" '
                    f'(last block-row has {cout % n} channels) or "skip" (layer stays dense), exclude the layer, '
                    "or choose an n that divides Cout"
                )
        if layer.kind == "linear":
            return cls(layer.name, layer.weight_shape, n, layer.weight_shape[1], 1, (n, 1))
        _, cin, kh, kw = layer.weight_shape
        if granularity == "kernel":
            return cls(layer.name, layer.weight_shape, n, cin, kh * kw, (n, 1, kh, kw))
        return cls(layer.name, layer.weight_shape, n, cin * kh * kw, 1, (n, 1, 1, 1))

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


def filter_order(weight: torch.Tensor) -> torch.Tensor:
    """Output channels sorted by filter L1, ascending (the reference's order); ``p[slot] = original index``.

    Stable, so equal filters keep their index order and score and select components always agree.
    """
    f = weight.detach().abs().reshape(weight.shape[0], -1).sum(1)
    return torch.argsort(f, stable=True)
