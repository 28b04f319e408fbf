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

``group_rows`` mode (method-neutral; Structural-LTH Regroup, method doc E.3): output channels whose kept-column
supports are identical form a *group*, taken in ``perms[0]`` order of first appearance; each group fills
whole block-rows, its last one padded with ``-1`` slots, so every block-row's N rows share one column list and
the selection needs no block shape (N is the layout's ``n``). All-zero channels come last, as block-rows
with no kept unit: no multiply-adds, and the kernel still writes their bias (or 0) there, because every
slot's accumulator starts at its bias. Padding is reported in ``meta`` and counted in ``meta["density"]``.
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


GROUP_FIX = "set group_rows = true on the pack-1xn layout (rows grouped by identical support, n = block height)"


def block_height(layer: LayerInfo, selection: Selection) -> int:
    """N from ``Selection.block`` after checking the block is a 1xN block for this layer."""
    block = tuple(int(b) for b in selection.block)
    where = f"layer {layer.name}"
    if not block:
        raise LayoutError(
            f"{where}: the selection carries no block shape; pack-1xn needs a 1xN select component, or, for a "
            f"row-grouped selection (Structural-LTH Regroup), {GROUP_FIX}"
        )
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


def output_perm(where: str, selection: Selection, m: int) -> torch.Tensor:
    """``perms[0]`` (identity without it), checked to be a permutation of the ``m`` output channels."""
    perm = selection.perm(0)
    perm = torch.arange(m) if perm is None else perm.to(device="cpu", dtype=torch.int64)
    if perm.numel() != m or not torch.equal(torch.sort(perm).values, torch.arange(m)):
        raise LayoutError(f"{where}: perms[0] is not a permutation of the {m} output channels")
    return perm


def group_slots(mask2: torch.Tensor, order: torch.Tensor, n: int) -> tuple[torch.Tensor, dict[str, int]]:
    """Slots of the rows grouped by identical support: ``[S]`` original row per slot, ``-1`` = padding.

    Groups come in order of first appearance in ``order`` (rows keep that order inside a group), each padded
    to a multiple of ``n`` so no block of ``n`` slots mixes two groups; the all-zero group goes last. Also
    returns ``groups`` (working groups, the all-zero one excluded) and ``zero_rows`` for ``Layout.meta``.
    """
    m = mask2.shape[0]
    if m == 0:  # the kernel needs one block-row
        return torch.full((n,), -1, dtype=torch.int64), {"groups": 0, "zero_rows": 0}
    rows = mask2[order]
    _, inv = torch.unique(rows.to(torch.uint8), dim=0, return_inverse=True)  # group id per position of `order`
    g = int(inv.max()) + 1
    first = torch.full((g,), m, dtype=torch.int64).scatter_reduce_(0, inv, torch.arange(m), "amin")
    empty = ~rows.any(dim=1)
    if bool(empty.any()):
        first[inv[empty][0]] = m  # after every working group: its block-rows do no multiply-adds
    rank = torch.empty(g, dtype=torch.int64)
    rank[torch.argsort(first, stable=True)] = torch.arange(g)
    key = rank[inv]
    src = torch.argsort(key, stable=True)  # positions in `order`, group by group, order kept inside a group
    sizes = torch.bincount(key, minlength=g)
    padded = (sizes + n - 1) // n * n
    start = torch.cumsum(padded, 0) - padded
    within = torch.arange(m) - (torch.cumsum(sizes, 0) - sizes)[key[src]]
    slots = torch.full((int(padded.sum()),), -1, dtype=torch.int64)
    slots[start[key[src]] + within] = order[src]
    return slots, {"groups": g - int(bool(empty.any())), "zero_rows": int(empty.sum())}


def pack_1xn(
    layer: LayerInfo, weight: torch.Tensor, selection: Selection, n: int | None = None, group_rows: bool = False
) -> Layout:
    """Pack ``weight * mask`` of one layer (see the module docstring for the format and ``group_rows``)."""
    where = f"layer {layer.name}"
    if selection.dense_reason or (not selection.block and bool(selection.mask.all())):
        # the select stage left this layer whole (e.g. cout_policy = "skip"): it stays dense
        why = selection.dense_reason or "the select stage kept every weight (no 1xN block)"
        return Layout(format=FORMAT, dense_shape=tuple(weight.shape), tensors={"dense": weight.detach().clone()},
                      meta={"dense": str(why)})  # fmt: skip
    if layer.kind == "conv2d" and layer.groups != 1:
        raise LayoutError(f"{where}: grouped convolution (groups={layer.groups}) is not supported; keep it dense")
    shape = tuple(weight.shape)
    if shape != tuple(layer.weight_shape) or tuple(selection.mask.shape) != shape:
        raise LayoutError(f"{where}: weight {shape} / mask {tuple(selection.mask.shape)} do not match {layer.weight_shape}")
    M = shape[0]
    mask2 = selection.mask.detach().to(device="cpu", dtype=torch.bool).reshape(M, -1)
    perm = output_perm(where, selection, M)
    groups: dict[str, int] = {}
    if group_rows:
        if n is None:
            raise LayoutError(f"{where}: group_rows = true needs the block height: set n (2, 4, 8, 16 or 32) on the layout")
        check_n(n, where)
        N = n
        out_rows, groups = group_slots(mask2, perm, N)
    else:
        N = block_height(layer, selection)
        if n is not None and n != N:
            raise LayoutError(f"{where}: the selection has N = {N} but the pipeline asks n = {n}; make them agree")
        pad = -(-M // N) * N - M
        out_rows = torch.cat([perm, torch.full((pad,), -1, dtype=torch.int64)])
    tensors, meta = pack_slots(where, weight, mask2, out_rows, N)
    if group_rows:
        meta.update(group_rows=True, **groups)
    return Layout(format=FORMAT, dense_shape=shape, tensors=tensors, meta=meta)


def pack_slots(
    where: str, weight: torch.Tensor, mask2: torch.Tensor, out_rows: torch.Tensor, N: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """Pack the block-rows given by ``out_rows`` (``[nbr*N]``: original row per slot, ``-1`` = padding)."""
    shape = tuple(weight.shape)
    M, cin = shape[0], shape[1]
    taps = shape[2] * shape[3] if len(shape) == 4 else 1
    mask = mask2.reshape(M, cin, taps)
    # no W * mask copy: the check below makes every kept unit kept in all its real rows, so only kept weights
    # are ever gathered (a layer the size of VGG-16's fc6 would otherwise cost three full-size copies)
    w = weight.detach().to(device="cpu", dtype=torch.float32).reshape(M, cin, taps)
    nbr = out_rows.numel() // N
    real = (out_rows >= 0).reshape(nbr, N, 1, 1)
    if out_rows.numel() == M and torch.equal(out_rows, torch.arange(M, dtype=out_rows.dtype)):
        mp, wp = mask.reshape(nbr, N, cin, taps), w.reshape(nbr, N, cin, taps)  # rows in order: views, no copy
        whole = mp.all(dim=1)
    else:
        src = out_rows.clamp(min=0)
        mp = mask[src].reshape(nbr, N, cin, taps) & real
        wp = torch.where(real, w[src].reshape(nbr, N, cin, taps), 0.0)
        whole = (mp | ~real).all(dim=1)
    keep = mp.any(dim=1)  # [nbr, cin, taps]
    if not torch.equal(whole, keep):
        raise LayoutError(
            f"{where}: the mask is not constant over blocks of N = {N} output channels (in perms[0] order); "
            f"it was made for another block size: use the same n for select and layout, or {GROUP_FIX}"
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
        tensors = {"values": values.reshape(nbr, nk, t_u, N), "indices": indices.reshape(nbr, nk)}
    else:
        row_ptr = torch.zeros(nbr + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(counts, 0)
        tensors = {"values": values, "indices": indices, "row_ptr": row_ptr}
    tensors["out_rows"] = out_rows
    kept = int(torch.count_nonzero(mask))
    stored = int(counts.sum()) * t_u * N  # every kept unit stores N values, padding slots included
    pad_per_row = (~real).reshape(nbr, N).sum(dim=1)
    padded = int((pad_per_row * counts).sum()) * t_u
    meta = {
        "n": N,
        "uniform": uniform,
        "runs": runs,
        "taps": t_u,
        "units": keep_u.shape[1],
        "block_rows": nbr,
        "kept_per_row": int(counts[0]) if uniform else None,
        # multiply-adds per position relative to the dense layer's M*K (what the fallback rule compares)
        "density": stored / max(M * cin * taps, 1),
        "sparsity": 1.0 - kept / max(mask.numel(), 1),
        # padding: -1 slots of block-rows that do work, and the zeros they store (multiplied for nothing);
        # the all-zero block-rows of group_rows store nothing and are not counted
        "padded_slots": int(pad_per_row[counts > 0].sum()),
        "padded_weights": padded,
        "padding_waste": padded / max(stored, 1),
    }
    return tensors, meta


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
    rows = t["out_rows"]
    nbr = rows.numel() // N  # ceil(M / N) for 1xN blocks; more with group_rows (groups padded to N)
    rp = row_ptr_of(layout)
    if (
        nbr < 1
        or rows.numel() != nbr * N
        or rp.numel() != nbr + 1
        or int(rp[0]) != 0
        or int(rp[-1]) != idx.numel()
        or bool((rp[1:] < rp[:-1]).any())
    ):
        raise LayoutError(f"{where}: row pointers / out_rows do not describe {nbr} block-rows of N = {N}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= units):
        raise LayoutError(f"{where}: an index is outside the {units} input units of this layer")
    real = rows[rows >= 0]
    if (
        real.numel() != M
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
    """Pack 1xN blocks (N out-channels x 1 input unit): SUBP-uniform 2-D arrays or BSR(N,1) rows; with
    ``group_rows``, any mask whose rows fall into groups of identical support (Regroup)."""

    @attrs.define
    class Params:
        n: int | None = None  # when given, must equal the selection's block height (group_rows: required)
        group_rows: bool = False  # rows of identical support form groups padded to n (Regroup; no block needed)

        def __attrs_post_init__(self) -> None:
            if self.n is not None:
                check_n(self.n, "params.n")
            elif self.group_rows:
                raise LayoutError("group_rows = true needs n, the block height (2, 4, 8, 16 or 32; 16 is a good default)")

    @prunekit.hookimpl
    def prunekit_transform_layout(
        self, layer: LayerInfo, weight: torch.Tensor, selection: Selection, params: Params | None
    ) -> Layout:
        params = params if params is not None else Pack1xN.Params()
        return pack_1xn(layer, weight, selection, n=params.n, group_rows=params.group_rows)
