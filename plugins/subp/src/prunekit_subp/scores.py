"""SUBP block criteria on the ``[R, Cin]`` grid (higher = keep), compared only within a block-row.

``scoring = "v2"`` (default, the reference's main code) scores ``W * mask``: last epoch's pruned blocks
score 0 (L1/L2) or ``-alpha`` (BPAR) and come back only through sampled regrowth. ``"v1"`` scores the raw
weights, so a pruned block whose straight-through-updated weights grew can win its place back by score.
"""

from __future__ import annotations

import attrs
import torch

from prunekit import hookimpl
from prunekit.errors import SelectionError
from prunekit.records import LayerInfo
from prunekit_subp.geometry import RowGrid, check_common

SCORINGS = ("v2", "v1")


@attrs.define
class ScoreParams:
    """``n``: block height; ``cout_policy``: Cout not a multiple of N; ``scoring``: ``v2`` = W*mask, ``v1`` = raw W."""

    n: int = 16
    cout_policy: str = "error"
    scoring: str = "v2"

    def __attrs_post_init__(self) -> None:
        check_common(self.n, self.cout_policy)
        if self.scoring not in SCORINGS:
            raise SelectionError(f"scoring = '{self.scoring}' is unknown; use 'v2' (score W*mask) or 'v1' (raw W)")


@attrs.define
class BPARParams(ScoreParams):
    """Adds ``alpha``: weight of the angular-redundancy term (the reference hard-codes 1.0)."""

    alpha: float = 1.0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not self.alpha >= 0.0:
            raise SelectionError(f"alpha = {self.alpha} must be >= 0 (1.0 is the paper's value)")


def _blocks(
    layer: LayerInfo, weight: torch.Tensor, mask: torch.Tensor | None, params: ScoreParams
) -> tuple[RowGrid | None, torch.Tensor, torch.Tensor]:
    """(grid, blocks of the scored weight, blocks of the mask) as float ``[R, Cin, N*kh*kw]``."""
    grid = RowGrid.of(layer, params.n, params.cout_policy)
    if grid is None:
        return None, torch.empty(0), torch.empty(0)
    w = weight.detach().float()
    m = torch.ones_like(w) if mask is None else mask.to(w.dtype)
    scored = w * m if params.scoring == "v2" else w
    return grid, grid.blocks(scored), grid.blocks(m)


def _skipped() -> torch.Tensor:
    return torch.empty(0, 0)  # layer left dense by cout_policy = "skip"; the select stage says why


class SubpL1:
    """L1 norm of each 1xN block, of W*mask (SUBP V2) by default."""

    Params = ScoreParams

    @hookimpl
    def prunekit_score(
        self, layer: LayerInfo, weight: torch.Tensor, mask: torch.Tensor | None, params: ScoreParams
    ) -> torch.Tensor:
        grid, b, _ = _blocks(layer, weight, mask, params)
        return _skipped() if grid is None else b.abs().sum(-1)


class SubpL2:
    """L2 norm of each 1xN block, of W*mask (SUBP V2) by default."""

    Params = ScoreParams

    @hookimpl
    def prunekit_score(
        self, layer: LayerInfo, weight: torch.Tensor, mask: torch.Tensor | None, params: ScoreParams
    ) -> torch.Tensor:
        grid, b, _ = _blocks(layer, weight, mask, params)
        return _skipped() if grid is None else b.square().sum(-1).sqrt()


class BPAR:
    """BPAR: row-normalised block L1 minus alpha x the block's share of the row's angular redundancy."""

    Params = BPARParams

    @hookimpl
    def prunekit_score(
        self, layer: LayerInfo, weight: torch.Tensor, mask: torch.Tensor | None, params: BPARParams
    ) -> torch.Tensor:
        grid, b, m = _blocks(layer, weight, mask, params)
        if grid is None:
            return _skipped()
        return bpar(b, m, params.alpha)


def bpar(blocks: torch.Tensor, mask_blocks: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``s_j = a_j - alpha * c_j / sum_k c_k`` per block-row (method notes B.3).

    ``a_j = |b_j|_1 / sum_k |b_k|_1``; ``c_j = sum_n |<u_j, u_n>|`` over the row's unit blocks ``u`` (itself
    included); a zero (masked) block has ``c_j = 0``, which is replaced by 1 so that it scores ``-alpha``,
    the minimum. An all-zero row (the reference divides 0 by 0) gets ``a_j = 1 / Cin`` and ``c_hat = 1``.
    """
    l1 = blocks.abs().sum(-1)
    row_l1 = l1.sum(1, keepdim=True)
    a = torch.where(row_l1 > 0, l1 / row_l1.clamp_min(torch.finfo(l1.dtype).tiny), 1.0 / l1.shape[1])
    masked = blocks * mask_blocks
    u = masked / masked.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    c = (u @ u.transpose(1, 2)).abs().sum(-1)
    row_c = c.sum(1, keepdim=True)
    c_hat = torch.where(row_c > 0, c / row_c.clamp_min(torch.finfo(c.dtype).tiny), 0.0)
    c_hat = torch.where(c_hat == 0, 1.0, c_hat)
    return a - alpha * c_hat
