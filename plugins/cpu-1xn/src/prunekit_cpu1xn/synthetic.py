"""Random 1xN selections with exact per-row counts, for tests and benchmarks (no select plugin needed)."""

from __future__ import annotations

import torch

from prunekit.blocks import RowBlocks
from prunekit.records import LayerInfo, Selection


def random_selection(
    layer: LayerInfo,
    n: int,
    sparsity: float,
    *,
    runs: bool = True,
    uniform: bool = True,
    permute: bool = False,
    permute_inputs: bool = False,
    generator: torch.Generator | None = None,
) -> Selection:
    """A 1xN mask on ``layer``: block-rows of N output channels (in a random order when ``permute``),
    each keeping ``round((1-s) * units)`` random units (``uniform``) or each unit with probability 1-s.

    A unit is one input channel with all its taps (``runs``) or one GEMM column. ``permute_inputs``
    additionally reports a random input-channel permutation in ``perms[1]`` (as TETRIS does; the mask
    itself stays in the original space, so the permutation does not change which weights are kept).
    """
    shape = tuple(layer.weight_shape)
    m, cin = shape[0], shape[1]
    taps = shape[2] * shape[3] if len(shape) == 4 else 1
    units = cin if runs else cin * taps
    # built directly, not with RowBlocks.of: tests want any Cout here, even Cout < N (no cout_policy)
    grid = RowBlocks(layer.name, shape, n, units, taps if runs else 1)
    nbr = grid.rows
    if uniform:
        nk = min(units, max(1, round(units * (1.0 - sparsity))))
        order = torch.rand(nbr, units, generator=generator).argsort(dim=1)
        keep = torch.zeros(nbr, units, dtype=torch.bool)
        keep.scatter_(1, order[:, :nk], True)
    else:
        keep = torch.rand(nbr, units, generator=generator) >= sparsity
    rows = grid.expand(keep).reshape(m, cin * taps)
    perm = torch.randperm(m, generator=generator) if permute else None
    mask = torch.empty(m, cin * taps, dtype=torch.bool)
    if perm is None:
        mask.copy_(rows)
    else:
        mask[perm] = rows
    p1 = torch.randperm(cin, generator=generator) if permute_inputs else None
    perms = (perm, p1, None, None) if len(shape) == 4 else (perm, p1)
    return Selection(mask=mask.reshape(shape), perms=perms, block=grid.block, meta={"synthetic": True})
