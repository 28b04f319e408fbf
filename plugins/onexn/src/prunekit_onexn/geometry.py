"""The 1xN block grid of one layer, and the filter order rearrangement forms it on.

The grid itself (N consecutive output channels x one input channel with its kh*kw taps, ``kernel``, or
one weight column, ``tap``; ``[R, C]`` with ``R = ceil(Cout / N)``) is the host's
:class:`prunekit.blocks.RowBlocks`, shared with every other row-block method; what is 1xN-paper specific
stays here: the filter order and the parameter check naming the three shared parameters.
"""

from __future__ import annotations

import torch

from prunekit.blocks import BLOCK_HEIGHTS, RowBlocks, check_block_height, check_cout_policy, check_granularity

# Public names of this distribution since 0.1; the grid and heights now live in the host.
BlockGrid = RowBlocks
SUPPORTED_N = BLOCK_HEIGHTS


def check_common(n: int, granularity: str, cout_policy: str) -> None:
    """Validate the parameters every onexn component shares (called from each Params)."""
    check_block_height(n, "1xN n")
    check_granularity(granularity)
    check_cout_policy(cout_policy)


def filter_order(weight: torch.Tensor) -> torch.Tensor:
    """Output channels sorted by filter L1, ascending (the reference's order); ``p[slot] = original index``.

    Stable, so equal filters keep their index order and score and select components always agree.
    """
    f = weight.detach().abs().reshape(weight.shape[0], -1).sum(1)
    return torch.argsort(f, stable=True)
