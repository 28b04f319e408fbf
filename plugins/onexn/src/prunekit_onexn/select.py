"""Layer-global bottom-k selection of 1xN blocks (the 1xN paper's one-shot mask).

The ``k`` lowest-scoring blocks of the layer are pruned, ``k = int(sparsity * #blocks)`` (the reference's
floor), so block-rows keep different numbers of blocks. With a ragged last block-row the blocks differ in
size and ``k`` is the longest prefix of the ascending order whose weights stay within ``sparsity * numel``.
With ``rearrange`` the mask is formed on ``weight[perm]`` (perm = output channels by filter L1) and
scattered back: the Selection's mask stays in the original index space and ``perms[0] = perm``, so the
network function never changes; only a kernel reads the permutation.
"""

from __future__ import annotations

import torch

from prunekit import hookimpl
from prunekit.blocks import RowBlocks
from prunekit.errors import SelectionError
from prunekit.records import LayerInfo, Selection
from prunekit_onexn.geometry import filter_order
from prunekit_onexn.params import OneXNParams

PATTERN = "1xN: N consecutive output channels x one input channel"


def _pattern(params: OneXNParams) -> str:
    taps = "all kh x kw taps" if params.granularity == "kernel" else "one tap"
    return f"{PATTERN} ({taps}), N={params.n}"


class OneXNSelect:
    """Prune the layer's lowest-scoring 1xN blocks (layer-global bottom-k; rows may differ)."""

    Params = OneXNParams
    host_defaults = {"keep_first_dense": True, "keep_last_dense": True}

    @hookimpl
    def prunekit_select_mask(
        self, layer: LayerInfo, weight: torch.Tensor, scores: torch.Tensor, sparsity: float, params: OneXNParams
    ) -> Selection:
        grid = RowBlocks.of(layer, params.n, params.granularity, params.cout_policy)
        if grid is None:
            return Selection(
                mask=torch.ones(weight.shape, dtype=torch.bool),
                dense_reason=f"Cout={weight.shape[0]} not a multiple of N={params.n} (cout_policy=skip)",
                meta={"pattern": _pattern(params)},
            )
        if tuple(scores.shape) != grid.shape:
            raise SelectionError(
                f"layer {layer.name}: scores have shape {tuple(scores.shape)}, the 1xN grid is {grid.shape}; "
                "pair select 'onexn' with an onexn score component (onexn-l1, onexn-l2, onexn-random)"
            )
        perm = filter_order(weight) if params.rearrange else None
        keep, pruned = _bottom_k(scores, grid, sparsity)
        mask_blocks = grid.expand(keep)  # in permuted coordinates when rearranged
        if perm is not None:
            mask = torch.empty_like(mask_blocks)
            mask[perm] = mask_blocks
        else:
            mask = mask_blocks
        perms = (perm,) + (None,) * (len(grid.weight_shape) - 1)
        kept_per_row = keep.sum(1)
        meta = {
            "pattern": _pattern(params),
            "n": params.n,
            "granularity": params.granularity,
            "rearranged": params.rearrange,
            "cout_policy": params.cout_policy,
            "blocks": grid.rows * grid.cols,
            "pruned_blocks": pruned,
            "kept_blocks_per_row": [int(kept_per_row.min()), int(kept_per_row.max())],
            "target_sparsity": sparsity,
            "achieved_sparsity": 1.0 - float(mask.float().mean()),
        }
        if grid.ragged:
            meta["last_block_rows"] = grid.last_rows
        return Selection(mask=mask, perms=perms, block=grid.block, pattern=meta["pattern"], meta=meta)


def _bottom_k(scores: torch.Tensor, grid: RowBlocks, sparsity: float) -> tuple[torch.Tensor, int]:
    flat = scores.reshape(-1)
    order = torch.argsort(flat, stable=True)
    if grid.ragged:
        sizes = grid.block_sizes().reshape(-1)[order]
        k = int((sizes.cumsum(0) <= sparsity * grid.numel).sum())
    else:
        k = int(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.reshape(grid.shape), k
