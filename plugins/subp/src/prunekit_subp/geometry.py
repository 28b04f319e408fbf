"""The block-row grid SUBP works on: ``[R, Cin]`` blocks of N output channels x one input channel.

Conv ``[Cout, Cin, kh, kw]`` -> ``[R, Cin, N*kh*kw]`` (the reference's reshape ``[R, N, Cin, kh, kw]`` with
axes 1 and 2 swapped); Linear ``[out, in]`` -> ``[R, in, N]``. ``R = ceil(Cout / N)``; a ragged last row
(``cout_policy = "ragged"``) is zero-padded, which changes no norm or inner product. The grid is the host's
:class:`prunekit.blocks.RowBlocks` (method-neutral, so this plugin still installs without prunekit-onexn);
SUBP only fixes its granularity to whole kernels and names itself in the messages.
"""

from __future__ import annotations

from prunekit.blocks import BLOCK_HEIGHTS, RowBlocks, check_block_height, check_cout_policy
from prunekit.records import LayerInfo

SUPPORTED_N = BLOCK_HEIGHTS  # public name of this distribution since 0.1


def check_common(n: int, cout_policy: str) -> None:
    check_block_height(n)
    check_cout_policy(cout_policy)


class RowGrid(RowBlocks):
    """SUBP's row-block grid: always one input channel with all its kh*kw taps per block."""

    __slots__ = ()

    @classmethod
    def of(cls, layer: LayerInfo, n: int, cout_policy: str = "error") -> RowGrid | None:  # type: ignore[override]
        """The layer's grid, or ``None`` when ``cout_policy = "skip"`` leaves it dense."""
        # "SUBP 1xN": the old messages said "SUBP blocks" (grouped conv) and "1xN block" (Cout < N)
        return super().of(layer, n, "kernel", cout_policy, method="SUBP 1xN")
