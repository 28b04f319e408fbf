"""The ``triton-block`` layout: a gathered-K block-sparse row format that covers every block shape.

One row-block = ``bm`` output rows (in the Selection's permuted row order) that share one list of kept GEMM
columns. The list is cut into chunks of ``bk`` columns (one ``tl.dot`` each); a chunk stores

* ``cols[c, k]``   -- the *original* GEMM column (``cin*kh*kw + tap``) the kernel gathers, ``-1`` = padding;
* ``values[c, k, m]`` -- the weight of row ``m`` of the row-block at that column (K-major per chunk, so the
  kernel's ``[bk, bm]`` tile is a plain 2-D load).

``crow[b]..crow[b+1]`` are row-block ``b``'s chunks and ``rows[b, m]`` the original output row it writes (``-1``
= padding when Cout is not a multiple of ``bm``, or a group's last row-block with ``group_rows``). Both
permutations of the Selection are thereby folded into index arrays: the kernel reads input column ``cols[j]``
and writes output row ``rows[r]``.

This one format is b x b BSR (a block = ``b`` columns = one chunk of ``bk = b``), rectangular TETRIS blocks
(a 32 x 32 x 3x3 conv block = 288 columns = 9 chunks of 32), and 1xN rows (a block = one column, or one run
of kh*kw columns for conv; kept columns of a block-row packed ``bk`` at a time, zero-padded to a multiple of
``bk``). Rows with equal chunk counts (SUBP) give a uniform layout (``meta["uniform"]``); otherwise row-blocks
are stored longest first, so the longest sums start first on the GPU.

``group_rows`` (Params; see ``geometry``): rows are grouped by identical kept-column support instead of by the
Selection's block shape (Structural-LTH Regroup, which states none), each group padded to a multiple of ``bm``
rows, so every row-block's column list is exactly its group's columns. ``meta`` then reports ``groups``,
``zero_rows``, ``padded_rows`` (``-1`` rows of working row-blocks: stored zeros) and ``padding_waste``.
"""

from __future__ import annotations

import attrs
import torch

from prunekit import hookimpl
from prunekit.errors import LayoutError
from prunekit.records import LayerInfo, Layout, Selection
from prunekit_triton.geometry import check_group_height, geometry

FORMAT = "triton-block"
CHUNKS = (16, 32, 64)  # tl.dot needs K >= 16; powers of two for tl.arange


def auto_chunk(block: tuple[int, ...], counts: torch.Tensor) -> int:
    """Chunk width: the largest of 64/32/16 that divides a block's GEMM-column count (blocks fill chunks);
    otherwise (1xN: 1 or kh*kw columns per block) 32, unless 16 stores over 10 % fewer padded slots."""
    g = 1
    for b in block[1:]:
        g *= b
    for c in (64, 32, 16):
        if g % c == 0:
            return c

    def slots(c: int) -> int:
        return int(((counts + c - 1) // c).sum()) * c

    return 16 if slots(32) > 1.1 * slots(16) else 32


def pack(
    layer: LayerInfo, weight: torch.Tensor, selection: Selection, chunk: int = 0, group_rows: bool = False,
    bm: int = 32,
) -> Layout:  # fmt: skip
    """Pack ``weight * selection.mask`` into the triton-block layout (see the module docstring); ``bm`` is the
    row-block height of ``group_rows`` (the block shape gives it otherwise)."""
    shape = tuple(layer.weight_shape)
    if tuple(weight.shape) != shape or tuple(selection.mask.shape) != shape:
        raise LayoutError(
            f"layer {layer.name}: weight {tuple(weight.shape)} / mask {tuple(selection.mask.shape)} do not match "
            f"the layer's weight shape {shape}"
        )
    geo = geometry(layer, selection, group_rows=group_rows, bm=bm)
    if chunk and chunk not in CHUNKS:
        raise LayoutError(f"layer {layer.name}: chunk = {chunk} is not a tl.dot K tile; use one of {CHUNKS} (0 = auto)")
    dev = weight.device
    m, k = layer.gemm_shape
    bm = geo.bm
    mask2 = selection.mask.to(dev).reshape(m, k).bool()
    w2 = (weight.detach() * mask2.reshape(shape).to(weight.dtype)).reshape(m, k)
    slots, co = geo.slots.to(dev), geo.col_order.to(dev)
    nrb = slots.numel() // bm
    real = (slots >= 0)[:, None]
    src = slots.clamp(min=0)
    wp = torch.where(real, w2[src][:, co], w2.new_zeros(()))
    mp = mask2[src][:, co] & real
    keep = mp.view(nrb, bm, k).any(1)  # union of kept columns per row-block (exact for any mask)
    counts = keep.sum(1)
    bk = chunk or auto_chunk(geo.block, counts)
    nch = (counts + bk - 1) // bk
    order = torch.argsort(-nch, stable=True)  # longest row-blocks first; identity when uniform
    width = int(nch.max()) * bk if nrb else 0
    # kept positions first, in grouping order (stable sort keeps it)
    pos = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    pos_full = torch.zeros(nrb, width, dtype=torch.long, device=dev)
    take = min(width, k)
    pos_full[:, :take] = pos[:, :take]
    valid = torch.arange(width, device=dev)[None, :] < counts[:, None]
    cols = torch.where(valid, co[pos_full], torch.full_like(pos_full, -1))
    vals = wp.view(nrb, bm, k).gather(2, pos_full[:, None, :].expand(nrb, bm, width))
    vals = vals * valid[:, None, :].to(vals.dtype)
    cols, vals, nch_o = cols[order], vals[order], nch[order]
    maxch = width // bk
    present = torch.arange(maxch, device=dev)[None, :] < nch_o[:, None]  # [nrb, maxch]
    cols_c = cols.view(nrb, maxch, bk)[present]
    vals_c = vals.view(nrb, bm, maxch, bk).permute(0, 2, 3, 1)[present]  # [nchunks, bk, bm]
    crow = torch.zeros(nrb + 1, dtype=torch.int32, device=dev)
    crow[1:] = torch.cumsum(nch_o, 0)
    rows = slots.view(nrb, bm)[order]
    uniform = bool(nrb == 0 or bool((nch == nch[0]).all()))
    # share of neighbouring gathered columns that are adjacent in memory (b x b: ~1, scattered 1xN: ~0)
    pairs = (cols_c[:, 1:] >= 0) & (cols_c[:, :-1] >= 0)
    adjacent = pairs & (cols_c[:, 1:] == cols_c[:, :-1] + 1)
    contiguous = float(adjacent.sum()) / max(1, int(pairs.sum()))
    kept = int(mask2.sum())
    tensors = {
        "values": vals_c.contiguous(),
        "cols": cols_c.to(torch.int32).contiguous(),
        "crow": crow,
        "rows": rows.to(torch.int32).contiguous(),
    }
    meta = {
        "kind": layer.kind,
        "bm": bm,
        "bk": bk,
        "block": list(geo.block),
        "pattern": geo.pattern,
        "uniform": uniform,
        "chunks_per_row": int(nch[0]) if uniform and nrb else None,
        "row_blocks": nrb,
        "chunks": int(crow[-1]),
        "kept": kept,
        "fill": kept / max(1, int(crow[-1]) * bk * bm),  # share of stored slots that hold kept weights
        "contiguous": contiguous,
        "column_order": "(cin, kh, kw)" if group_rows else "block-major; (kh, kw, cin) inside a block",
        "gemm_shape": [m, k],
    }
    if group_rows:
        meta.update(group_rows=True, **geo.groups, **padding_meta(slots.view(nrb, bm), nch, bk))
    return Layout(format=FORMAT, dense_shape=shape, tensors=tensors, meta=meta)


def padding_meta(rows: torch.Tensor, nch: torch.Tensor, bk: int) -> dict[str, float | int]:
    """What grouping costs: ``-1`` rows of row-blocks that do work store (and multiply) zeros over every chunk."""
    pad = (rows < 0).sum(1)
    working = nch > 0
    stored = int((nch * bk).sum()) * rows.shape[1]
    wasted = int((pad * nch * bk).sum())
    return {
        "padded_rows": int(pad[working].sum()),
        "padded_weights": wasted,
        "padding_waste": wasted / max(1, stored),
    }


def densify(layout: Layout) -> torch.Tensor:
    """The dense weight a layout holds, in the original index space (exact: values are copied, not summed)."""
    if layout.format != FORMAT:
        raise LayoutError(f"layout format '{layout.format}' is not '{FORMAT}'; pair the triton-block kernel with its layout")
    t = layout.tensors
    m, k = layout.meta["gemm_shape"]
    vals, cols, crow, rows = t["values"], t["cols"].long(), t["crow"].long(), t["rows"].long()
    out = vals.new_zeros(m, k)
    if vals.numel():
        nch = crow[1:] - crow[:-1]
        chunk_rb = torch.repeat_interleave(torch.arange(len(nch), device=vals.device), nch)
        r = rows[chunk_rb][:, None, :].expand_as(vals)  # [nchunks, bk, bm]
        c = cols[:, :, None].expand_as(vals)
        ok = (r >= 0) & (c >= 0)
        out[r[ok], c[ok]] = vals[ok]
    return out.reshape(layout.dense_shape)


class TritonBlockLayout:
    """Gathered-K block-sparse rows for Triton: b x b BSR, TETRIS blocks and 1xN rows, permutations folded in."""

    @attrs.define
    class Params:
        chunk: int = 0  # columns per tl.dot step: 16, 32 or 64; 0 = auto from the block shape
        group_rows: bool = False  # rows of identical support form row-blocks (Regroup); no block shape needed
        bm: int = 32  # group_rows row-block height: 16, 32 or 64

        def __attrs_post_init__(self) -> None:
            if self.chunk not in (0, *CHUNKS):
                raise LayoutError(f"chunk = {self.chunk}: use 0 (auto) or one of {CHUNKS} (tl.dot needs K >= 16)")
            check_group_height(self.bm)

    @hookimpl
    def prunekit_transform_layout(self, layer: LayerInfo, weight: torch.Tensor, selection: Selection, params: Params | None) -> Layout:
        p = params if params is not None else TritonBlockLayout.Params()
        return pack(layer, weight, selection, chunk=p.chunk, group_rows=p.group_rows, bm=p.bm)
