"""The block-row grid SUBP works on: ``[R, Cin]`` blocks of N output channels x one input channel.

Conv ``[Cout, Cin, kh, kw]`` -> ``[R, Cin, N*kh*kw]`` (the reference's reshape ``[R, N, Cin, kh, kw]`` with
axes 1 and 2 swapped); Linear ``[out, in]`` -> ``[R, in, N]``. ``R = ceil(Cout / N)``; a ragged last row
(``cout_policy = "ragged"``) is zero-padded, which changes no norm or inner product. Kept in this
distribution (not imported from prunekit-onexn) so that each plugin installs on its own.
"""

from __future__ import annotations

import attrs
import torch

from prunekit.errors import SelectionError
from prunekit.records import LayerInfo

SUPPORTED_N = (2, 4, 8, 16, 32)
COUT_POLICIES = ("error", "ragged", "skip")


def check_common(n: int, cout_policy: str) -> None:
    if n not in SUPPORTED_N:
        raise SelectionError(f"n = {n} is not a supported block height; use one of {', '.join(map(str, SUPPORTED_N))}")
    if cout_policy not in COUT_POLICIES:
        raise SelectionError(
            f"cout_policy = '{cout_policy}' is unknown; use 'error', 'ragged' (last block-row smaller) "
            "or 'skip' (layer stays dense)"
        )


@attrs.frozen
class RowGrid:
    layer: str
    weight_shape: tuple[int, ...]
    n: int

    @property
    def cout(self) -> int:
        return self.weight_shape[0]

    @property
    def cols(self) -> int:
        return self.weight_shape[1]

    @property
    def width(self) -> int:
        w = 1
        for d in self.weight_shape[2:]:
            w *= d
        return w

    @property
    def rows(self) -> int:
        return -(-self.cout // self.n)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def last_rows(self) -> int:
        return self.cout - (self.rows - 1) * self.n

    @property
    def block(self) -> tuple[int, ...]:
        return (self.n, 1, *self.weight_shape[2:])

    @classmethod
    def of(cls, layer: LayerInfo, n: int, cout_policy: str = "error") -> RowGrid | None:
        """The layer's grid, or ``None`` when ``cout_policy = "skip"`` leaves it dense."""
        if layer.kind == "conv2d" and layer.groups != 1:
            raise SelectionError(
                f"layer {layer.name} is a grouped/depthwise conv (groups={layer.groups}); SUBP blocks are defined "
                f'for groups=1 only: add it to exclude (exclude = ["{layer.name}"]) or keep skip_grouped = true'
            )
        cout = layer.weight_shape[0]
        if cout < n or cout % n:
            if cout_policy == "skip":
                return None
            if cout < n:
                raise SelectionError(
                    f"layer {layer.name} has Cout={cout} < N={n}: too small for one 1xN block; exclude it, "
                    'set cout_policy = "skip", or use a smaller n'
                )
            if cout_policy == "error":
                raise SelectionError(
                    f'layer {layer.name}: Cout={cout} is not a multiple of N={n}; set cout_policy = "ragged" '
                    f'(last block-row has {cout % n} channels) or "skip" (layer stays dense), exclude the layer, '
                    "or choose an n that divides Cout"
                )
        return cls(layer.name, tuple(layer.weight_shape), n)

    def blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """``[R, Cin, N*width]``: every block's weights (ragged last row zero-padded)."""
        g = weight.reshape(self.cout, self.cols, self.width)
        pad = self.rows * self.n - self.cout
        if pad:
            g = torch.cat([g, g.new_zeros(pad, self.cols, self.width)])
        return g.reshape(self.rows, self.n, self.cols, self.width).transpose(1, 2).reshape(self.rows, self.cols, -1)

    def expand(self, keep: torch.Tensor) -> torch.Tensor:
        """Block decisions ``[R, Cin]`` -> bool mask of the weight's shape."""
        full = keep.bool()[:, None, :, None].expand(self.rows, self.n, self.cols, self.width)
        return full.reshape(self.rows * self.n, self.cols * self.width)[: self.cout].reshape(self.weight_shape)
