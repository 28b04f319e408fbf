"""The structural selects: IMP rounds as ``lth-imp``, then in the final round (``sparsity == target``) the
IMP mask of each layer becomes whole output channels (Refill / Refill+, method doc C) or row-disjoint
dense blocks (Regroup, method doc D). Every earlier round is plain IMP, so masks stay nested, and the host
rewinds after the final update, so kept positions (refilled ones included) restart from the snapshot.

Reports carry the IMP density and the post-transform density side by side (method doc I.17).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from prunekit import Selection, SelectionError
from prunekit.records import LayerInfo, LayerStats
from prunekit_lth.imp import IMPParams, IMPSelect
from prunekit_lth.refill import CRITERIA, MODES, as_rows, channel_scores, criterion_needs, refill
from prunekit_lth.regroup import regroup


def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


@attrs.define
class RefillParams(IMPParams):
    """``rho``: Refill+ re-activates this fraction of the dropped channels (0 = Refill); ``criterion``:
    channel score (``l1`` of the masked trained weights, the paper's; ``remain``; ``fm-l1`` / ``fm-l2`` /
    ``saliency`` of the output feature map on calibration data); ``refill_mode``: ``exact`` (K' channels),
    ``reference`` (the reference's +1 tied channel), ``budget`` (one partial channel matches the budget)."""

    rho: float = 0.0
    criterion: str = "l1"
    refill_mode: str = "exact"

    def __attrs_post_init__(self) -> None:
        if not 0.0 <= self.rho <= 1.0:
            raise SelectionError(f"rho = {self.rho} must be in [0, 1] (0 = Refill, 0.1-0.2 = Refill+)")
        if self.criterion not in CRITERIA:
            raise SelectionError(f"criterion = {self.criterion!r} is unknown; use one of {', '.join(CRITERIA)}")
        if self.refill_mode not in MODES:
            raise SelectionError(f"refill_mode = {self.refill_mode!r} is unknown; use one of {', '.join(MODES)}")


class RefillSelect(IMPSelect):
    """Structural LTH Refill/Refill+: IMP rounds, then whole output channels within each layer's budget."""

    Params = RefillParams

    def needs(self, params: RefillParams | None) -> set[str]:
        return criterion_needs((params or RefillParams()).criterion)

    def finish(
        self, layer: LayerInfo, weight: torch.Tensor, mask: torch.Tensor, meta: dict[str, Any], final: bool,
        params: RefillParams, stats: LayerStats | None, generator: torch.Generator,
    ) -> Selection:  # fmt: skip
        if not final:
            return super().finish(layer, weight, mask, meta, final, params, stats, generator)
        scores = channel_scores(params.criterion, weight, mask, stats, layer.name)
        res = refill(as_rows(mask), scores, params.rho, params.refill_mode, generator, layer.name)
        meta.update(res.meta(), criterion=params.criterion, density=res.density_after)
        pattern = "whole output channels (Refill" + (f"+, rho={params.rho})" if params.rho else ")")
        block = (1,) + (0,) * (weight.dim() - 1) if params.refill_mode == "exact" else ()
        return Selection(mask=res.mask.reshape(weight.shape), perms=(None,) * weight.dim(), block=block,
                         pattern=pattern, meta=meta)  # fmt: skip


@attrs.define
class RegroupParams(IMPParams):
    """``parts``: row clusters per layer (the paper's 8; ``rows_per_part`` sizes them per layer instead, for
    narrow layers where 8 clusters are too small to give blocks); ``ratio``: column-growth stopping ratio (1.5);
    ``tile``: rows per block tile (32); ``min_rows``: a cluster needs more rows than this to give a block
    (16); ``backend``: the partitioner (see PARTITIONER.md); ``no_blocks``: ``unchanged`` keeps a layer's
    IMP mask when no cluster gives a block (reported), ``error`` stops; ``imbalance``: partitioner balance."""

    parts: int = 8
    rows_per_part: int = 0  # > 0: each layer gets max(1, Cout // rows_per_part) parts instead of `parts`
    ratio: float = 1.5
    tile: int = 32
    min_rows: int = 16
    backend: str = "auto"
    no_blocks: str = "unchanged"
    imbalance: float = 0.10

    def __attrs_post_init__(self) -> None:
        if self.parts < 1 or self.tile < 1 or self.min_rows < 0 or self.rows_per_part < 0 or not self.ratio > 0:
            raise SelectionError("parts and tile must be >= 1, min_rows and rows_per_part >= 0 and ratio > 0")
        if self.no_blocks not in ("unchanged", "error"):
            raise SelectionError(f"no_blocks = {self.no_blocks!r} is unknown; use 'unchanged' or 'error'")


class RegroupSelect(IMPSelect):
    """Structural LTH Regroup: IMP rounds, then dense row-group x column-set blocks per layer (refilled)."""

    Params = RegroupParams

    def finish(
        self, layer: LayerInfo, weight: torch.Tensor, mask: torch.Tensor, meta: dict[str, Any], final: bool,
        params: RegroupParams, stats: LayerStats | None, generator: torch.Generator,
    ) -> Selection:  # fmt: skip
        if not final:
            return super().finish(layer, weight, mask, meta, final, params, stats, generator)
        parts = max(1, weight.shape[0] // params.rows_per_part) if params.rows_per_part else params.parts
        res = regroup(
            as_rows(mask), parts=parts, seed=_seed(generator), ratio=params.ratio, tile=params.tile,
            min_rows=params.min_rows, backend=params.backend, no_blocks=params.no_blocks, imbalance=params.imbalance,
        )  # fmt: skip
        meta.update(res.meta(), density=res.density_after)
        if res.unchanged:
            meta["regroup"] = f"no dense block: {res.reason}; the IMP mask is kept"
            return Selection(mask=mask, perms=(None,) * weight.dim(), block=(1,) * weight.dim(),
                             pattern="unstructured (regroup found no block)", meta=meta)  # fmt: skip
        # rows of one block next to each other, block by block, then the rest: kernels read this order
        in_blocks = torch.cat([b.rows for b in res.blocks])
        rest = torch.ones(weight.shape[0], dtype=torch.bool)
        rest[in_blocks] = False
        order = torch.cat([in_blocks, rest.nonzero().flatten()]).to(torch.long)
        pattern = f"regroup: {len(res.blocks)} dense blocks (row group x column set)"
        return Selection(mask=res.mask.reshape(weight.shape).to(weight.device), perms=(order,) + (None,) * (weight.dim() - 1),
                         block=(), pattern=pattern, meta=meta)  # fmt: skip
