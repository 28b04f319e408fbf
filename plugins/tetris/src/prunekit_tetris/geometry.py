"""Block geometry of one layer: resolve the block list against the weight shape, apply the
non-divisible policy, and say which axes are worth permuting."""

from __future__ import annotations

import math
from typing import Literal

import attrs

from prunekit import SelectionError
from prunekit.blocks import resolve_block

Policy = Literal["error", "pad", "shrink"]
POLICIES: tuple[str, ...] = ("error", "pad", "shrink")


@attrs.frozen
class BlockPlan:
    """Resolved geometry: ``block[k]`` divides ``padded[k]``; ``shape`` is the real weight shape.

    ``pad``: zero slices appended at the end of a dim (pinned to their slots, never permuted).
    ``shrunk``: dims whose requested block was replaced by a divisor, as ``{dim: (asked, used)}``.
    """

    shape: tuple[int, ...]
    block: tuple[int, ...]
    padded: tuple[int, ...]
    shrunk: dict[int, tuple[int, int]] = attrs.field(factory=dict)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(n // b for n, b in zip(self.padded, self.block))

    @property
    def num_blocks(self) -> int:
        return math.prod(self.grid)

    @property
    def pad(self) -> tuple[int, ...]:
        return tuple(p - n for p, n in zip(self.padded, self.shape))

    def optimisable(self, dim: int) -> bool:
        """Permuting a dim changes block sums only when 1 < b < n (A.8-2: b = 1 and b = n are skipped)."""
        return 1 < self.block[dim] < self.padded[dim]


def expand_block(block: list[int] | tuple[int, ...], ndim: int, kind: str, where: str) -> tuple[int, ...]:
    """One block size per weight dim from the ``block`` parameter.

    Conv weights are ``[Cout, Cin, kh, kw]``: a 2-entry list ``[bo, bi]`` means ``[bo, bi, 0, 0]`` (all
    taps). Linear weights are ``[out, in]``: a 4-entry list uses its first two entries, so one ``block``
    serves a model with both kinds of layer.
    """
    block = tuple(int(b) for b in block)
    if len(block) == ndim:
        return block
    if ndim == 4 and len(block) == 2:
        return (*block, 0, 0)
    if ndim == 2 and len(block) == 4:
        return block[:2]
    raise SelectionError(
        f"{where}: block {list(block)} has {len(block)} entries for a {kind} weight with {ndim} dims; "
        f"give {ndim} entries (or 2 = [out, in] for a conv)"
    )


def _shrink(n: int, b: int) -> int:
    """The largest divisor of ``n`` that is <= ``b`` and leaves at least 2 blocks (paper rule)."""
    cap = min(b, max(1, n // 2))
    return max(d for d in range(1, cap + 1) if n % d == 0)


def plan_blocks(shape: tuple[int, ...], block: tuple[int, ...], policy: str, layer: str, entry: str = "") -> BlockPlan:
    """Resolve ``block`` (0 = whole dim, the host's rule) for ``shape`` under the non-divisible ``policy``."""
    resolved = resolve_block(shape, block, f"layer {layer}{entry}")
    out, padded, shrunk = [], [], {}
    for dim, (n, b) in enumerate(zip(shape, resolved)):
        if n % b == 0:
            out.append(b)
            padded.append(n)
            continue
        if policy == "pad":
            out.append(b)
            padded.append(-(-n // b) * b)
        elif policy == "shrink":
            used = _shrink(n, b)
            out.append(used)
            padded.append(n)
            shrunk[dim] = (b, used)
        else:
            raise SelectionError(
                f"layer {layer}{entry}: dim {dim} has size {n}, not divisible by block {b}; choose a block that "
                f"divides {n}, set nondivisible = \"pad\" or \"shrink\", or exclude the layer"
            )
    return BlockPlan(tuple(shape), tuple(out), tuple(padded), shrunk)
