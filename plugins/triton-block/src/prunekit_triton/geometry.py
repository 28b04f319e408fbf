"""Block geometry: from a Selection to the GEMM-view row order, column order and row-block height.

The kernel works on the GEMM view ``W2 = weight.reshape(Cout, Cin*kh*kw)`` (column order ``(cin, kh, kw)``).
A Selection states its blocks in *permuted* coordinates (``weight[p0][:, p1]...``); we turn that into

* ``slots[slot]`` -- original output row of each permuted row (``perms[0]`` or identity), ``-1`` = padding
  (a last partial row-block); row-blocks are ``bm`` consecutive slots, so the kernel writes output row
  ``slots[r]``;
* ``col_order[pos]`` -- original GEMM column at each position of the *grouping order* in which a row-block's
  kept columns are listed and cut into ``tl.dot`` chunks.

Grouping order (a deliberate choice, tested): block-major, and inside one block **tap-major**
``(kh, kw, cin)``. For a TETRIS conv block (32 out x 32 in x 3x3) a block is 32*9 = 288 columns; with chunks of
32 each chunk then holds one tap of 32 in-channels, so a block is exactly 9 chunks and a chunk never mixes
taps. For Linear and for 1xN conv blocks (one in-channel x all taps: a run of kh*kw columns) it is the plain
``(cin, kh, kw)`` order of permuted slots. Correctness never depends on this order (every kept column is
listed with its own original index); only how well blocks fill chunks does.

``group_rows`` (method-neutral; Structural-LTH Regroup, method doc E.3): the Selection needs no block shape.
Output rows with identical kept-column supports form a group, groups taken in ``perms[0]`` order of first
appearance, each padded to a multiple of ``bm`` with ``-1`` slots, so a row-block never mixes two groups and
its column list is exactly its group's columns (gathered-K, no zeros stored for other rows). All-zero rows
come last as row-blocks with no chunk: the kernel writes their bias (or 0) and multiplies nothing. Columns
are listed in plain ``(cin, kh, kw)`` order.
"""

from __future__ import annotations

import attrs
import torch

from prunekit import blocks
from prunekit.errors import LayoutError
from prunekit.records import LayerInfo, Selection

MAX_ROW_BLOCK = 128  # largest tl.dot tile height we generate; taller row-blocks would spill registers
SPLIT_ROW_BLOCK = 64  # taller blocks are cut into row-blocks of this height (rows of a block share columns)
# group_rows row-block heights: tl.dot tiles are >= 16 rows (a smaller bm only adds row-blocks); at most
# SPLIT_ROW_BLOCK (taller groups are cut into row-blocks of bm, which is exact: they share the columns)
GROUP_HEIGHTS = (16, 32, 64)


@attrs.frozen
class Geometry:
    bm: int  # row-block height (output rows sharing one list of kept columns); block[0], or 64 if that is > 128
    slots: torch.Tensor  # [row-blocks * bm] long: original output row of each permuted slot, -1 = padding
    col_order: torch.Tensor  # [K] long: original GEMM column at each grouping position
    block: tuple[int, ...]  # the Selection's block with 0 ("full") resolved; () with group_rows
    pattern: str  # words for reports: "1x32 (32 out x 1 in x 3x3 taps)", "32x32", ...
    groups: dict[str, int] = attrs.field(factory=dict)  # group_rows: counts for Layout.meta


def check_group_height(bm: int, what: str = "bm") -> None:
    if bm not in GROUP_HEIGHTS:
        raise LayoutError(
            f"{what} = {bm} is not a group_rows row-block height; use one of {', '.join(map(str, GROUP_HEIGHTS))} "
            "(16 pads least, 32 matches Regroup's 32-row tiles)"
        )


def _perm(selection: Selection, dim: int, n: int, layer: LayerInfo) -> torch.Tensor:
    p = selection.perm(dim)
    if p is None:
        return torch.arange(n)
    p = torch.as_tensor(p).to(device="cpu", dtype=torch.long).reshape(-1)
    if p.numel() != n or not torch.equal(torch.sort(p).values, torch.arange(n)):
        raise LayoutError(
            f"layer {layer.name}: Selection.perms[{dim}] is not a permutation of range({n}); "
            "the select component must give p[slot] = original index for every slot"
        )
    return p


def resolve_block(layer: LayerInfo, selection: Selection) -> tuple[int, ...]:
    """The Selection's block with 0 ("whole dim") resolved by the host's rule; an empty block is refused
    here because only a kernel layout needs one."""
    if not selection.block:
        raise LayoutError(
            f"layer {layer.name}: Selection.block is empty; the triton-block layout needs the block shape "
            f"(e.g. (32, 32) or (N, 1, kh, kw)) from the select component, or, for a row-grouped selection "
            f"(Structural-LTH Regroup), set group_rows = true on the triton-block layout (rows grouped by "
            f"identical support, bm = 32)"
        )
    return blocks.resolve_block(layer.weight_shape, selection.block, f"layer {layer.name} (Selection.block)", LayoutError)


def group_slots(mask2: torch.Tensor, order: torch.Tensor, bm: int) -> tuple[torch.Tensor, dict[str, int]]:
    """Slots of the rows grouped by identical support: ``[S]`` original row per slot, ``-1`` = padding.

    Groups come in order of first appearance in ``order`` (rows keep that order inside a group), each padded
    to a multiple of ``bm``; the all-zero group goes last. Also returns the counts for ``Layout.meta``
    (``groups`` excludes the all-zero one).
    """
    m = mask2.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.long), {"groups": 0, "zero_rows": 0}
    rows = mask2[order]
    _, inv = torch.unique(rows.to(torch.uint8), dim=0, return_inverse=True)  # group id per position of `order`
    g = int(inv.max()) + 1
    first = torch.full((g,), m, dtype=torch.long).scatter_reduce_(0, inv, torch.arange(m), "amin")
    empty = ~rows.any(dim=1)
    if bool(empty.any()):
        first[inv[empty][0]] = m  # after every working group
    rank = torch.empty(g, dtype=torch.long)
    rank[torch.argsort(first, stable=True)] = torch.arange(g)
    key = rank[inv]
    src = torch.argsort(key, stable=True)  # positions in `order`, group by group, order kept inside a group
    sizes = torch.bincount(key, minlength=g)
    padded = (sizes + bm - 1) // bm * bm
    start = torch.cumsum(padded, 0) - padded
    within = torch.arange(m) - (torch.cumsum(sizes, 0) - sizes)[key[src]]
    slots = torch.full((int(padded.sum()),), -1, dtype=torch.long)
    slots[start[key[src]] + within] = order[src]
    return slots, {"groups": g - int(bool(empty.any())), "zero_rows": int(empty.sum())}


def grouped_geometry(layer: LayerInfo, selection: Selection, bm: int) -> Geometry:
    """``group_rows``: row-blocks of ``bm`` slots of one support group each; columns in plain order."""
    check_group_height(bm, f"layer {layer.name}: bm")
    m, k = layer.gemm_shape
    mask2 = selection.mask.detach().to(device="cpu", dtype=torch.bool).reshape(m, k)
    slots, groups = group_slots(mask2, _perm(selection, 0, m, layer), bm)
    pattern = f"row groups of identical support, gathered-K (bm = {bm}, {groups['groups']} groups)"
    return Geometry(bm=bm, slots=slots, col_order=torch.arange(k), block=(), pattern=pattern, groups=groups)


def _check_conv_groups(layer: LayerInfo) -> None:
    if layer.groups != 1:
        raise LayoutError(
            f"layer {layer.name}: grouped conv (groups={layer.groups}) is not supported by triton-block; "
            "keep grouped convs dense (skip_grouped = true)"
        )


def geometry(layer: LayerInfo, selection: Selection, group_rows: bool = False, bm: int = 32) -> Geometry:
    """The GEMM-view geometry of ``selection``: from its block shape, or (``group_rows``) from its rows."""
    _check_conv_groups(layer)
    if group_rows:
        return grouped_geometry(layer, selection, bm)
    block = resolve_block(layer, selection)
    if block[0] < 1:
        raise LayoutError(f"layer {layer.name}: block height {block[0]} must be >= 1 output row")
    # Any height up to 128 runs on a tile padded to the next power of two >= 16 (tl.dot needs >= 16 rows;
    # 1xN with N < 16 wastes the padding); a taller block is split, which is exact.
    bm = block[0] if block[0] <= MAX_ROW_BLOCK else SPLIT_ROW_BLOCK
    shape = tuple(layer.weight_shape)
    m = shape[0]
    row_order = _perm(selection, 0, m, layer)
    if layer.kind == "linear":
        cin, kh, kw = shape[1], 1, 1
        bc, bh, bw = block[1], 1, 1
        perms = (_perm(selection, 1, cin, layer), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    else:
        cin, kh, kw = shape[1], shape[2], shape[3]
        bc, bh, bw = block[1], block[2], block[3]
        perms = (_perm(selection, 1, cin, layer), _perm(selection, 2, kh, layer), _perm(selection, 3, kw, layer))
    pc, ph, pw = perms
    # original GEMM column of every permuted slot (c, h, w)
    orig = pc[:, None, None] * (kh * kw) + ph[None, :, None] * kw + pw[None, None, :]
    if bc >= 1 and bh >= 1 and bw >= 1 and cin % bc == 0 and kh % bh == 0 and kw % bw == 0:
        grid = orig.reshape(cin // bc, bc, kh // bh, bh, kw // bw, bw)
        # block-major (channel block, tap block), then tap-major (kh, kw, cin) inside a block
        col_order = grid.permute(0, 2, 4, 3, 5, 1).reshape(-1)
    else:  # blocks do not tile the dims: plain permuted (cin, kh, kw) order is still exact
        col_order = orig.reshape(-1)
    bm_words = block[0]
    if layer.kind == "linear":
        pattern = f"1x{bm_words} ({bm_words} out x 1 in)" if bc == 1 else f"{bm_words}x{bc} ({bm_words} out x {bc} in)"
    elif bc == 1:
        taps = f"{bh}x{bw} taps" if (bh, bw) == (kh, kw) else f"{bh}x{bw} of {kh}x{kw} taps"
        pattern = f"1x{bm_words} ({bm_words} out x 1 in x {taps})"
    else:
        pattern = f"{bm_words}x{bc}x{bh}x{bw} ({bm_words} out x {bc} in x {bh}x{bw} taps)"
    pad = -(-m // bm) * bm - m
    slots = torch.cat([row_order, torch.full((pad,), -1, dtype=torch.long)])
    return Geometry(bm=bm, slots=slots, col_order=col_order, block=block, pattern=pattern)
