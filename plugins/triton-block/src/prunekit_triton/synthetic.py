"""Random block-shaped Selections for tests and benchmarks (no select plugin needed).

Blocks are laid out in permuted coordinates (``weight[p0][:, p1]``) and scattered back to the original
index space, exactly as a TETRIS / 1xN / SUBP select component would return them.
"""

from __future__ import annotations

import torch

from prunekit.blocks import resolve_block
from prunekit.records import LayerInfo, Selection


def random_block_selection(
    layer: LayerInfo,
    block: tuple[int, ...],
    sparsity: float,
    *,
    uniform: bool = True,
    permute: bool = False,
    generator: torch.Generator | None = None,
) -> Selection:
    """Keep ``round((1 - sparsity) * blocks)`` random blocks: per row-block (``uniform``, SUBP-like) or
    over the whole layer (non-uniform). The last row-block may be partial when Cout % block[0] != 0."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    shape = tuple(layer.weight_shape)
    blk = resolve_block(shape, block, f"layer {layer.name}")
    nrb = -(-shape[0] // blk[0])
    inner = [n // b for n, b in zip(shape[1:], blk[1:])]
    if any(n % b for n, b in zip(shape[1:], blk[1:])):
        raise ValueError(f"block {blk} does not tile the weight {shape} past dim 0")
    per_row = 1
    for n in inner:
        per_row *= n
    scores = torch.rand(nrb, per_row, generator=g)
    if uniform:
        keep_n = round((1.0 - sparsity) * per_row)
        grid = torch.zeros(nrb, per_row, dtype=torch.bool)
        if keep_n:
            grid.scatter_(1, scores.topk(keep_n, dim=1).indices, True)
    else:
        keep_n = round((1.0 - sparsity) * nrb * per_row)
        grid = torch.zeros(nrb * per_row, dtype=torch.bool)
        if keep_n:
            grid[scores.flatten().topk(keep_n).indices] = True
    grid = grid.view(nrb, *inner)
    full = grid
    for d, b in enumerate(blk):
        full = full.repeat_interleave(b, dim=d)
    maskp = full[: shape[0]]
    perms: list[torch.Tensor | None] = [None] * len(shape)
    if permute:
        perms[0] = torch.randperm(shape[0], generator=g)
        perms[1] = torch.randperm(shape[1], generator=g)
    mask = maskp
    for d, p in enumerate(perms):
        if p is not None:  # permuted slot i holds original index p[i]
            out = torch.empty_like(mask)
            out.index_copy_(d, p, mask)
            mask = out
    return Selection(
        mask=mask.contiguous(), perms=tuple(perms), block=tuple(block),
        meta={"synthetic": True, "uniform": uniform, "sparsity": 1.0 - float(mask.float().mean())},
    )  # fmt: skip
