"""Layout ``pack-1xn``: the kept values of each block-row of N output channels, contiguous, with the
input index each block reads.

GEMM view ``[Cout, Cin*kh*kw]``. A block-row is N output channels (slots ``b*N .. b*N+N-1`` of the
Selection's output permutation ``perms[0]``; identity without it). A *unit* is what one index names:
one input channel with all its kh*kw taps when every kept block covers whole runs of taps (``runs``,
the 1xN paper's block), else one GEMM column (``taps`` = 1, the finer (N,1,1,1) variant; Linear).

Tensors (``taps`` T, block height N):
  uniform (same kept count ``nk`` in every block-row, SUBP):
    ``values`` [nbr, nk, T, N] fp32, ``indices`` [nbr, nk] int32
  non-uniform (BSR with blocksize (N, 1) on the unit grid):
    ``values`` [nnz, T, N] fp32, ``indices`` [nnz] int32, ``row_ptr`` [nbr+1] int64
  both: ``out_rows`` [nbr*N] int64: slot -> original output channel, -1 for the padding slots of a last
  partial block-row (Cout not a multiple of N).
Indices are in the ORIGINAL input space (ascending within a block-row), and ``out_rows`` carries the
output permutation, so the packed layer reads and writes the original channel order: no neighbouring
layer changes, and any input permutation (TETRIS ``perms[1]``) is folded in by construction.
"""

from __future__ import annotations

import attrs
import torch

import prunekit
from prunekit.blocks import check_block_height
from prunekit.errors import LayoutError
from prunekit.records import LayerInfo, Layout, Selection

FORMAT = "pack-1xn"


def check_n(n: int, what: str) -> None:
    """N must be one of the host's row-block heights (the ones the kernel's inner loops are built for)."""
    check_block_height(n, f"{what}: pack-1xn N", LayoutError)


def block_height(layer: LayerInfo, selection: Selection) -> int:
    """N from ``Selection.block`` after checking the block is a 1xN block for this layer."""
    block = tuple(int(b) for b in selection.block)
    where = f"layer {layer.name}"
    if not block:
        raise LayoutError(f"{where}: the selection carries no block shape; pack-1xn needs a 1xN select component")
    n = block[0]
    check_n(n, where)
    if layer.kind == "linear":
        ok = block == (n, 1)
    else:
        kh, kw = layer.weight_shape[2:]
        ok = len(block) == 4 and block[1] == 1 and block[2:] in ((1, 1), (kh, kw))
    if not ok:
        expect = "(N, 1)" if layer.kind == "linear" else "(N, 1, kh, kw) or (N, 1, 1, 1)"
        raise LayoutError(f"{where}: selection block {block} is not a 1xN block {expect}; pick a 1xN pipeline")
    return n


def pack_1xn(layer: LayerInfo, weight: torch.Tensor, selection: Selection, n: int | None = None) -> Layout:
    """Pack ``weight * mask`` of one layer (see the module docstring for the format)."""
    where = f"layer {layer.name}"
    if selection.dense_reason or (not selection.block and bool(selection.mask.all())):
        # the select stage left this layer whole (e.g. cout_policy = "skip"): it stays dense
        why = selection.dense_reason or "the select stage kept every weight (no 1xN block)"
        return Layout(format=FORMAT, dense_shape=tuple(weight.shape), tensors={"dense": weight.detach().clone()},
                      meta={"dense": str(why)})  # fmt: skip
    if layer.kind == "conv2d" and layer.groups != 1:
        raise LayoutError(f"{where}: grouped convolution (groups={layer.groups}) is not supported; keep it dense")
    N = block_height(layer, selection)
    if n is not None and n != N:
        raise LayoutError(f"{where}: the selection has N = {N} but the pipeline asks n = {n}; make them agree")
    shape = tuple(weight.shape)
    if shape != tuple(layer.weight_shape) or tuple(selection.mask.shape) != shape:
        raise LayoutError(f"{where}: weight {shape} / mask {tuple(selection.mask.shape)} do not match {layer.weight_shape}")
    M = shape[0]
    cin = shape[1]
    taps = shape[2] * shape[3] if len(shape) == 4 else 1
    mask = selection.mask.to(torch.bool).reshape(M, cin, taps)
    w = (weight.detach().to(torch.float32) * mask.reshape(shape)).reshape(M, cin, taps)
    perm = selection.perm(0)
    if perm is None:
        perm = torch.arange(M)
    perm = perm.to(torch.int64)
    if perm.numel() != M or not torch.equal(torch.sort(perm).values, torch.arange(M)):
        raise LayoutError(f"{where}: perms[0] is not a permutation of the {M} output channels")
    nbr = -(-M // N)
    pad = nbr * N - M
    out_rows = torch.cat([perm, torch.full((pad,), -1, dtype=torch.int64)])
    mp = torch.cat([mask[perm], torch.zeros(pad, cin, taps, dtype=torch.bool)]).reshape(nbr, N, cin, taps)
    wp = torch.cat([w[perm], torch.zeros(pad, cin, taps)]).reshape(nbr, N, cin, taps)
    keep = mp.any(dim=1)  # [nbr, cin, taps]
    real = (out_rows >= 0).reshape(nbr, N, 1, 1)
    if not torch.equal((mp | ~real).all(dim=1), keep):
        raise LayoutError(
            f"{where}: the mask is not constant over blocks of N = {N} output channels (in perms[0] order); "
            "it was made for another block size: use the same n for select and layout"
        )
    per_channel = keep.sum(dim=2)
    runs = taps > 1 and bool(((per_channel == 0) | (per_channel == taps)).all())
    if runs:
        keep_u = keep[:, :, 0]  # [nbr, cin]
        vals_u = wp.permute(0, 2, 3, 1)  # [nbr, cin, taps, N]
        t_u = taps
    else:
        keep_u = keep.reshape(nbr, cin * taps)
        vals_u = wp.reshape(nbr, N, cin * taps, 1).permute(0, 2, 3, 1)  # [nbr, K, 1, N]
        t_u = 1
    nz = keep_u.nonzero()  # row-major: sorted by block-row, then ascending unit
    counts = keep_u.sum(dim=1)
    values = vals_u[nz[:, 0], nz[:, 1]].contiguous()  # [nnz, t_u, N]
    indices = nz[:, 1].to(torch.int32)
    uniform = bool((counts == counts[0]).all())
    if uniform:
        nk = int(counts[0])
        tensors = {
            "values": values.reshape(nbr, nk, t_u, N),
            "indices": indices.reshape(nbr, nk),
        }
    else:
        row_ptr = torch.zeros(nbr + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(counts, 0)
        tensors = {"values": values, "indices": indices, "row_ptr": row_ptr}
    tensors["out_rows"] = out_rows
    kept = int(mask.sum())
    meta = {
        "n": N,
        "uniform": uniform,
        "runs": runs,
        "taps": t_u,
        "units": keep_u.shape[1],
        "block_rows": nbr,
        "kept_per_row": int(counts[0]) if uniform else None,
        "density": float(keep_u.sum()) * t_u * N / max(nbr * N * cin * taps, 1),
        "sparsity": 1.0 - kept / max(mask.numel(), 1),
    }
    return Layout(format=FORMAT, dense_shape=shape, tensors=tensors, meta=meta)


def row_ptr_of(layout: Layout) -> torch.Tensor:
    """``row_ptr`` for either form (uniform rows have it implicitly)."""
    if "row_ptr" in layout.tensors:
        return layout.tensors["row_ptr"]
    nbr, nk = layout.tensors["indices"].shape
    return torch.arange(nbr + 1, dtype=torch.int64) * nk


def validate(layer: LayerInfo, layout: Layout, n: int | None = None) -> None:
    """Raise LayoutError unless ``layout`` is a well-formed pack-1xn layout of ``layer``."""
    where = f"layer {layer.name}"
    if layout.format != FORMAT:
        raise LayoutError(f"{where}: layout format '{layout.format}' is not {FORMAT}; pair cpu-1xn with layout pack-1xn")
    if tuple(layout.dense_shape) != tuple(layer.weight_shape):
        raise LayoutError(
            f"{where}: layout built for weight {tuple(layout.dense_shape)}, layer has {tuple(layer.weight_shape)}; "
            "re-pack for this layer"
        )
    t = layout.tensors
    if "dense" in layout.meta:
        if tuple(t["dense"].shape) != tuple(layer.weight_shape):
            raise LayoutError(f"{where}: dense layout has shape {tuple(t['dense'].shape)}; re-pack for this layer")
        return
    for key in ("values", "indices", "out_rows"):
        if key not in t:
            raise LayoutError(f"{where}: pack-1xn layout lacks '{key}'; build it with pack_1xn")
    N = int(layout.meta.get("n", -1))
    check_n(N, where)
    if n is not None and n != N:
        raise LayoutError(f"{where}: layout built for N = {N}, the pipeline asks n = {n}; re-pack with n = {n}")
    vals = t["values"]
    if vals.dtype != torch.float32 or vals.shape[-1] != N:
        raise LayoutError(f"{where}: values {tuple(vals.shape)} {vals.dtype} do not hold fp32 blocks of N = {N}")
    M, cin = layer.weight_shape[0], layer.weight_shape[1]
    taps = layer.weight_shape[2] * layer.weight_shape[3] if layer.kind == "conv2d" else 1
    runs = bool(layout.meta.get("runs", False))
    t_u = taps if runs else 1
    units = cin if runs else cin * taps
    if vals.shape[-2] != t_u:
        raise LayoutError(f"{where}: values hold {vals.shape[-2]} taps per index, this layer needs {t_u}")
    idx = t["indices"]
    if idx.dtype != torch.int32 or vals.numel() != idx.numel() * t_u * N:
        raise LayoutError(f"{where}: indices {tuple(idx.shape)} {idx.dtype} do not match values {tuple(vals.shape)}")
    nbr = -(-M // N)
    rp = row_ptr_of(layout)
    if rp.numel() != nbr + 1 or int(rp[0]) != 0 or int(rp[-1]) != idx.numel() or bool((rp[1:] < rp[:-1]).any()):
        raise LayoutError(f"{where}: row pointers do not describe {nbr} block-rows of N = {N}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= units):
        raise LayoutError(f"{where}: an index is outside the {units} input units of this layer")
    rows = t["out_rows"]
    real = rows[rows >= 0]
    if (
        rows.numel() != nbr * N
        or real.numel() != M
        or not torch.equal(torch.sort(real).values, torch.arange(M))
    ):
        raise LayoutError(f"{where}: out_rows is not a permutation of the {M} output channels plus padding")


def densify(layout: Layout) -> torch.Tensor:
    """The dense weight (original index space) a pack-1xn layout holds: exactly ``weight * mask``."""
    shape = tuple(layout.dense_shape)
    if "dense" in layout.meta:
        return layout.tensors["dense"].clone()
    M, cin = shape[0], shape[1]
    taps = shape[2] * shape[3] if len(shape) == 4 else 1
    N = int(layout.meta["n"])
    t_u = int(layout.meta["taps"])
    vals = layout.tensors["values"].reshape(-1, t_u, N)
    idx = layout.tensors["indices"].reshape(-1).to(torch.int64)
    rp = row_ptr_of(layout)
    nbr = rp.numel() - 1
    rows_of = torch.repeat_interleave(torch.arange(nbr), rp[1:] - rp[:-1])  # block-row of each stored block
    dense = torch.zeros(nbr * N, cin * taps)
    slots = rows_of[:, None] * N + torch.arange(N)[None, :]  # [nnz, N]
    for t in range(t_u):
        cols = idx * t_u + t  # runs: unit c, tap t -> column c*taps + t; else the unit is the column
        dense[slots, cols[:, None].expand_as(slots)] = vals[:, t, :]
    out = torch.zeros(M, cin * taps)
    rows = layout.tensors["out_rows"]
    keep = rows >= 0
    out[rows[keep]] = dense[keep]
    return out.reshape(shape)


class Pack1xN:
    """Pack 1xN blocks (N out-channels x 1 input unit): SUBP-uniform 2-D arrays or BSR(N,1) rows."""

    @attrs.define
    class Params:
        n: int | None = None  # when given, must equal the selection's block height

        def __attrs_post_init__(self) -> None:
            if self.n is not None:
                check_n(self.n, "params.n")

    @prunekit.hookimpl
    def prunekit_transform_layout(
        self, layer: LayerInfo, weight: torch.Tensor, selection: Selection, params: Params | None
    ) -> Layout:
        return pack_1xn(layer, weight, selection, n=params.n if params is not None else None)
