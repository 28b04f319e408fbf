"""Block scores on the 1xN grid ``[R, C]`` (higher = keep), in the coordinates the select component uses.

With ``rearrange`` the grid is formed on ``weight[filter_order(weight)]``: output channels sorted by filter
L1 first, so that similar filters share blocks. A ragged last block-row (``cout_policy='ragged'``) has fewer
weights per block; its norms are rescaled to a full block's so that layer-global ranking stays fair.
"""

from __future__ import annotations

import math

import torch

from prunekit import hookimpl
from prunekit.blocks import RowBlocks
from prunekit.records import LayerInfo
from prunekit_onexn.geometry import filter_order
from prunekit_onexn.params import OneXNParams


def _grid_and_blocks(layer: LayerInfo, weight: torch.Tensor, params: OneXNParams):  # noqa: ANN202
    grid = RowBlocks.of(layer, params.n, params.granularity, params.cout_policy)
    if grid is None:
        return None, None
    w = weight.detach()
    if params.rearrange:
        w = w[filter_order(w)]
    return grid, grid.blocks(w.float())


def _no_grid() -> torch.Tensor:
    return torch.empty(0, 0)  # layer left dense by cout_policy='skip'; the select stage says why


class BlockL1:
    """L1 norm of each 1xN block (N output channels x one input channel x its kh*kw taps)."""

    Params = OneXNParams

    @hookimpl
    def prunekit_score(self, layer: LayerInfo, weight: torch.Tensor, params: OneXNParams) -> torch.Tensor:
        grid, b = _grid_and_blocks(layer, weight, params)
        if grid is None:
            return _no_grid()
        s = b.abs().sum(-1)
        if grid.ragged:
            s[-1] *= grid.n / grid.last_rows
        return s


class BlockL2:
    """L2 norm of each 1xN block (N output channels x one input channel x its kh*kw taps)."""

    Params = OneXNParams

    @hookimpl
    def prunekit_score(self, layer: LayerInfo, weight: torch.Tensor, params: OneXNParams) -> torch.Tensor:
        grid, b = _grid_and_blocks(layer, weight, params)
        if grid is None:
            return _no_grid()
        s = b.square().sum(-1).sqrt()
        if grid.ragged:
            s[-1] *= math.sqrt(grid.n / grid.last_rows)
        return s


class BlockRandom:
    """Random 1xN block scores (baseline): a seeded permutation, so bottom-k samples without replacement."""

    Params = OneXNParams

    @hookimpl
    def prunekit_score(
        self, layer: LayerInfo, weight: torch.Tensor, params: OneXNParams, generator: torch.Generator
    ) -> torch.Tensor:
        grid = RowBlocks.of(layer, params.n, params.granularity, params.cout_policy)
        if grid is None:
            return _no_grid()
        rows, cols = grid.shape
        # distinct values: the k lowest are k distinct blocks, uniformly drawn (the reference's randint
        # drew with replacement and so pruned fewer blocks than asked)
        return torch.randperm(rows * cols, generator=generator).to(torch.float32).reshape(rows, cols)
