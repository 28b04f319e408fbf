"""Uniform per-row selection with importance-sampled regrowth (SUBP, method notes B.2).

At each mask update (once per epoch: the schedule says when), for every block-row independently:
prune the ``int(target * Cin)`` lowest-scoring blocks (the *final* count), then regrow
``int((target - sparsity) * Cin)`` of them, drawn without replacement from
``softmax(normalize(scores of the pruned) / tau)`` with the hook's seeded ``generator``. Every row therefore
zeroes exactly ``Z = int(p * Cin) - int((p - p_e) * Cin)`` blocks (not ``int(p_e * Cin)``), so every
row of a layer keeps the same number of blocks. Masks are soft by default: pruned weights keep their
straight-through gradient plus ``pruned_decay * W`` (applied by the host's masking) and return with their
evolved values when regrown.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from prunekit import hookimpl
from prunekit.errors import SelectionError
from prunekit.records import LayerInfo, Selection
from prunekit_subp.geometry import RowGrid, check_common

PATTERN = "uniform 1xN: N consecutive output channels x one input channel (all kh x kw taps)"


@attrs.define
class SelectParams:
    """``n``, ``cout_policy`` as the scores; ``hard``: plain masking instead of STE + decay;
    ``pruned_decay``: the SR-STE decay on pruned weights (2e-4); ``tau``: regrowth softmax temperature."""

    n: int = 16
    cout_policy: str = "error"
    hard: bool = False
    pruned_decay: float = 2e-4
    tau: float = 1.0

    def __attrs_post_init__(self) -> None:
        check_common(self.n, self.cout_policy)
        if not self.pruned_decay >= 0.0:
            raise SelectionError(f"pruned_decay = {self.pruned_decay} must be >= 0 (2e-4 is the paper's value)")
        if not self.tau > 0.0:
            raise SelectionError(f"tau = {self.tau} must be > 0 (1.0 is the paper's value)")


class UniformSelect:
    """SUBP: every block-row keeps the same number of 1xN blocks; prune to the final count, sample regrowth."""

    Params = SelectParams
    host_defaults = {"keep_first_dense": True, "keep_last_dense": True}

    @hookimpl
    def prunekit_select_mask(
        self,
        layer: LayerInfo,
        weight: torch.Tensor,
        scores: torch.Tensor,
        sparsity: float,
        target: float,
        params: SelectParams,
        generator: torch.Generator,
    ) -> Selection:
        soft = not params.hard
        decay = params.pruned_decay if soft else 0.0
        grid = RowGrid.of(layer, params.n, params.cout_policy)
        meta = {"pattern": f"{PATTERN}, N={params.n}", "n": params.n, "soft": soft}
        if grid is None:
            why = f"Cout={weight.shape[0]} not a multiple of N={params.n} (cout_policy=skip)"
            return Selection(mask=torch.ones(weight.shape, dtype=torch.bool), soft=soft, pruned_decay=decay, dense_reason=why, meta=meta)
        if tuple(scores.shape) != grid.shape:
            raise SelectionError(
                f"layer {layer.name}: scores have shape {tuple(scores.shape)}, the SUBP block grid is {grid.shape}; "
                "pair select 'subp-uniform' with subp-l1, subp-l2 or bpar"
            )
        cin = grid.cols
        k_prune = int(target * cin)
        k_regrow = max(0, int((target - sparsity) * cin))
        if k_prune >= cin:
            raise SelectionError(
                f"layer {layer.name}: sparsity {target} prunes {k_prune} of {cin} blocks per row and leaves no "
                "block in a row; lower sparsity or exclude the layer"
            )
        keep = _uniform_keep(scores, k_prune, k_regrow, params.tau, generator)
        mask = grid.expand(keep)
        zeros = k_prune - min(k_regrow, k_prune)
        meta.update(
            {
                "cout_policy": params.cout_policy,
                "zero_blocks_per_row": zeros,
                "kept_blocks_per_row": cin - zeros,
                "pruned_to": k_prune,
                "regrown": min(k_regrow, k_prune),
                "target_sparsity": target,
                "schedule_sparsity": sparsity,
                "achieved_sparsity": 1.0 - float(mask.float().mean()),
            }
        )
        if k_prune == 0 and target > 0:
            meta["note"] = f"int({target} * Cin={cin}) = 0: no block to prune, layer stays dense"
        if grid.last_rows != grid.n:
            meta["last_block_rows"] = grid.last_rows
        return Selection(mask=mask, block=grid.block, soft=soft, pruned_decay=decay, pattern=meta["pattern"], meta=meta)


def _uniform_keep(
    scores: torch.Tensor, k_prune: int, k_regrow: int, tau: float, generator: torch.Generator
) -> torch.Tensor:
    """``[R, Cin]`` keep decisions with exactly ``k_prune - k_regrow`` zeros per row."""
    rows, cin = scores.shape
    keep = torch.ones(rows, cin, dtype=torch.bool)
    if k_prune == 0:
        return keep
    s_sorted, order = torch.sort(scores.float(), dim=1, stable=True)
    pruned = order[:, :k_prune]
    keep.scatter_(1, pruned, False)
    if k_regrow > 0:
        # candidates are only the blocks just pruned; a higher score gives a higher chance to return
        probs = torch.softmax(F.normalize(s_sorted[:, :k_prune], dim=1) / tau, dim=1)
        pick = torch.multinomial(probs, min(k_regrow, k_prune), replacement=False, generator=generator)
        keep.scatter_(1, pruned.gather(1, pick), True)
    return keep
