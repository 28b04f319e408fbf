"""Regroup (method doc, section D): turn an unstructured mask into row-disjoint dense blocks.

On the GEMM view ``M`` ``[Cout, n]`` (columns ``(cin, kh, kw)`` in PyTorch flatten order):

1. partition the non-empty rows into ``parts`` clusters (:func:`prunekit_lth.partition.partition_rows`);
2. per cluster ``G`` sort the columns by in-cluster count, descending, ties by ascending column index (``π``);
3. the block width is the smallest ``w`` such that every row ``g`` of ``G`` satisfies
   ``(w - 1) > ratio * |supp(M_g) \\ π[0:w]|`` (the clean rule of invariant I.14: every row's uncovered
   nonzeros stay below about ``1/ratio`` of the block width). The left side grows with ``w`` and the right side
   never does, so the rule holds on a suffix of widths and the first width is found from prefix sums in one
   vectorised pass over all clusters. ``w = n`` always qualifies when ``n >= 2``;
4. a cluster with at most ``min_rows`` rows yields no block (its rows become all-zero and are counted in
   ``rows_without_block``); a cluster of ``r > tile`` rows becomes a block of its first ``tile * (r // tile)``
   rows plus a remainder block of the other ``r % tile`` rows with the same columns;
5. the new mask is exactly the union of ``rows x cols`` over the blocks (in-block zeros are refilled, nonzeros
   outside every block are dropped); if no block is found at all the input comes back unchanged (the
   reference's fallback, flagged ``unchanged``) or :class:`prunekit.errors.SelectionError` is raised.

Unlike the reference (section H.2) nothing here is silent: a missing partitioner raises, zeroed rows and the
kept / dropped / refilled counts are reported, and the no-block fallback carries a reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F

from prunekit.errors import SelectionError
from prunekit_lth.partition import partition_rows

NoBlocks = Literal["unchanged", "error"]


@attrs.frozen(eq=False)
class Block:
    """One dense block: original output-channel indices ``rows`` (ascending) x GEMM columns ``cols``.

    ``cols`` are in column-growth order (most shared column of the cluster first), not sorted.
    """

    rows: torch.Tensor
    cols: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.rows.numel()), int(self.cols.numel()))

    @property
    def numel(self) -> int:
        return int(self.rows.numel()) * int(self.cols.numel())


@attrs.frozen(eq=False)
class RegroupResult:
    """Outcome of :func:`regroup` for one layer (counts in weights; densities over ``Cout * n``).

    ``kept_orig = nnz(M & M')``, ``dropped = nnz(M) - kept_orig``, ``refilled = nnz(M') - kept_orig``
    (invariant I.13). ``clusters`` counts the non-empty clusters, ``cluster_sizes`` their row counts in block
    order (size descending, then part id). ``rows_without_block`` counts the non-empty rows zeroed because their
    cluster gave no block (0 when ``unchanged``: then nothing was zeroed, ``reason`` says why no block exists).
    ``part`` is the partition used (``-1`` for empty rows).
    """

    mask: torch.Tensor
    blocks: tuple[Block, ...]
    kept_orig: int
    dropped: int
    refilled: int
    density_before: float
    density_after: float
    clusters: int
    rows_without_block: int
    unchanged: bool
    reason: str
    cluster_sizes: tuple[int, ...] = ()
    part: torch.Tensor | None = None
    params: dict[str, Any] = attrs.field(factory=dict)

    def meta(self) -> dict[str, Any]:
        """JSON-able summary for reports (no tensors)."""
        widths = [b.shape[1] for b in self.blocks]
        return {
            "blocks": len(self.blocks),
            "block_shapes": [list(b.shape) for b in self.blocks],
            "block_width_range": [min(widths), max(widths)] if widths else [],
            "kept_orig": self.kept_orig,
            "dropped": self.dropped,
            "refilled": self.refilled,
            "nnz_before": self.kept_orig + self.dropped,
            "nnz_after": self.kept_orig + self.refilled,
            "density_before": self.density_before,
            "density_after": self.density_after,
            "kept_fraction": self.kept_orig / max(1, self.kept_orig + self.dropped),
            "clusters": self.clusters,
            "cluster_sizes": list(self.cluster_sizes),
            "rows_without_block": self.rows_without_block,
            "unchanged": self.unchanged,
            "reason": self.reason,
            **self.params,
        }


def regroup(
    mask2: torch.Tensor,
    parts: int = 8,
    seed: int = 0,
    ratio: float = 1.5,
    tile: int = 32,
    min_rows: int = 16,
    backend: str = "auto",
    no_blocks: NoBlocks = "unchanged",
    part: torch.Tensor | None = None,
    imbalance: float = 0.10,
) -> RegroupResult:
    """Regroup one layer's GEMM-view mask ``[Cout, n]`` into dense blocks (see the module docstring).

    ``part`` (LongTensor ``[Cout]``, any non-negative ids for non-empty rows) skips the partitioner; ids of empty
    rows are ignored. ``parts``, ``seed``, ``imbalance`` and ``backend`` go to :func:`partition_rows` otherwise.
    """
    m = _check(mask2, ratio, tile, min_rows, no_blocks)
    cout, n = m.shape
    params = {"parts": parts, "seed": seed, "ratio": ratio, "tile": tile, "min_rows": min_rows, "backend": backend}
    if part is None:
        part = partition_rows(m, parts=parts, seed=seed, imbalance=imbalance, backend=backend)
    else:
        params["backend"] = "given"
    cid, sizes = _clusters(m, part)
    part = torch.where(cid >= 0, part.to(torch.long).cpu(), -1)  # as partition_rows gives it: -1 for empty rows
    nnz = int(m.sum())
    total = max(1, cout * n)

    widths, order = _widths(m, cid, len(sizes), ratio)  # per cluster: block width (0 = none), column order π
    has_block = (sizes > min_rows) & (widths > 0)
    blocks = _blocks(cid, sizes, widths, order, has_block, tile)
    if not blocks:
        reason = _no_block_reason(nnz, sizes, widths, min_rows, n)
        if no_blocks == "error":
            fix = (
                "leave this layer out of Regroup"
                if nnz == 0 or n < 2
                else f"fewer parts (now {parts}) or a smaller min_rows (now {min_rows}) so that clusters have more "
                "than min_rows rows, or no_blocks='unchanged' to keep the mask as it is"
            )
            raise SelectionError(f"Regroup found no dense block in a {cout}x{n} mask: {reason}; fix: {fix}")
        return RegroupResult(
            mask=m.clone(), blocks=(), kept_orig=nnz, dropped=0, refilled=0, density_before=nnz / total,
            density_after=nnz / total, clusters=len(sizes), rows_without_block=0, unchanged=True, reason=reason,
            cluster_sizes=tuple(int(s) for s in sizes), part=part, params=params,
        )  # fmt: skip

    # M' in π order is a prefix of width w per row; scattering it back through π gives the union of blocks.
    row_w = torch.zeros(cout, dtype=torch.long)
    live = cid >= 0
    row_w[live] = torch.where(has_block, widths, 0)[cid[live]]
    sorted_keep = torch.arange(n)[None, :] < row_w[:, None]
    new = torch.zeros_like(m)
    new[live] = torch.zeros_like(m[live]).scatter_(1, order[cid[live]], sorted_keep[live])
    kept = int((m & new).sum())
    after = int(new.sum())
    zeroed = int(sizes[~has_block].sum())
    return RegroupResult(
        mask=new, blocks=blocks, kept_orig=kept, dropped=nnz - kept, refilled=after - kept,
        density_before=nnz / total, density_after=after / total, clusters=len(sizes), rows_without_block=zeroed,
        unchanged=False, reason="", cluster_sizes=tuple(int(s) for s in sizes), part=part, params=params,
    )  # fmt: skip


def _check(mask2: torch.Tensor, ratio: float, tile: int, min_rows: int, no_blocks: str) -> torch.Tensor:
    if not isinstance(mask2, torch.Tensor) or mask2.dim() != 2:
        got = tuple(mask2.shape) if isinstance(mask2, torch.Tensor) else type(mask2).__name__
        raise SelectionError(f"regroup needs a 2-D [Cout, n] mask (mask.view(Cout, -1)), got {got}")
    if not ratio >= 0:
        raise SelectionError(f"regroup ratio must be >= 0 (reference 1.5), got {ratio!r}")
    if tile < 1 or min_rows < 0:
        raise SelectionError(f"regroup needs tile >= 1 and min_rows >= 0 (reference 32 and 16), got {tile}, {min_rows}")
    if no_blocks not in ("unchanged", "error"):
        raise SelectionError(f"no_blocks must be 'unchanged' or 'error', got {no_blocks!r}")
    return (mask2 != 0).cpu()


def _clusters(m: torch.Tensor, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster index per row (``-1`` for empty rows), clusters numbered by size descending then part id."""
    part = torch.as_tensor(part)
    if part.shape != (m.shape[0],) or part.dtype.is_floating_point or part.dtype == torch.bool:
        raise SelectionError(
            f"part must be an integer tensor of shape ({m.shape[0]},), got {part.dtype} {tuple(part.shape)}"
        )
    part = part.to(torch.long).cpu()
    live = m.any(1)
    if bool((part[live] < 0).any()):
        bad = int(torch.nonzero(live & (part < 0))[0])
        raise SelectionError(
            f"part[{bad}] = {int(part[bad])} for a non-empty row; give every non-empty row a part id >= 0"
        )
    ids, inv, counts = torch.unique(part[live], return_inverse=True, return_counts=True)
    rank = torch.empty_like(counts)
    # sort by (-size, part id): unique() returns ids ascending, so a stable sort on size keeps id order on ties
    rank[torch.sort(-counts, stable=True).indices] = torch.arange(ids.numel())
    cid = torch.full((m.shape[0],), -1, dtype=torch.long)
    cid[live] = rank[inv]
    sizes = torch.zeros(ids.numel(), dtype=torch.long)
    sizes[rank] = counts
    return cid, sizes


def _widths(m: torch.Tensor, cid: torch.Tensor, k: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cluster: the smallest width ``w`` meeting the stopping rule (0 if none) and the column order π."""
    n = m.shape[1]
    live = cid >= 0
    rows = m[live]
    c = cid[live]
    counts = torch.zeros(k, n, dtype=torch.int32).index_add_(0, c, rows.to(torch.int32))
    order = torch.sort(-counts, dim=1, stable=True).indices  # count descending, ties by ascending column
    covered = torch.gather(rows, 1, order[c]).cumsum(1, dtype=torch.int32)  # [r, w-1]: nnz of row in π[0:w]
    uncovered = rows.sum(1, dtype=torch.int32)[:, None] - covered
    worst = torch.zeros(k, n, dtype=torch.int32).scatter_reduce_(
        0, c[:, None].expand(-1, n), uncovered, "amax", include_self=False
    )  # [k, w-1]: the worst row's uncovered nonzeros per cluster
    w = torch.arange(1, n + 1, dtype=torch.float64)
    ok = (w - 1)[None, :] > ratio * worst.to(torch.float64)  # monotone in w: first True is the width
    first = torch.argmax(ok.to(torch.int8), dim=1) + 1
    return torch.where(ok.any(1), first, 0), order


def _blocks(
    cid: torch.Tensor, sizes: torch.Tensor, widths: torch.Tensor, order: torch.Tensor, has_block: torch.Tensor,
    tile: int,
) -> tuple[Block, ...]:  # fmt: skip
    out: list[Block] = []
    for j in torch.nonzero(has_block).flatten().tolist():  # one iteration per cluster (<= parts)
        rows = torch.nonzero(cid == j).flatten()
        cols = order[j, : int(widths[j])].clone()
        r = rows.numel()
        head = tile * (r // tile) if r > tile else r
        out.append(Block(rows=rows[:head], cols=cols))
        if head < r:
            out.append(Block(rows=rows[head:], cols=cols))
    return tuple(out)


def _no_block_reason(nnz: int, sizes: torch.Tensor, widths: torch.Tensor, min_rows: int, n: int) -> str:
    if nnz == 0:
        return "the mask is empty"
    if bool((widths == 0).all()) and n < 2:
        return f"n = {n} column: no width satisfies (w - 1) > ratio * uncovered"
    shown = ", ".join(str(int(s)) for s in sizes[:16]) + (", ..." if sizes.numel() > 16 else "")
    return f"no cluster has more than min_rows = {min_rows} rows (cluster sizes {shown})"


def block_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    blocks: Sequence[Block],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference execution of a regrouped conv: ``Σ_b scatter_{R_b}(W[R_b, C_b] · im2col(x)[C_b, :])`` (+ bias).

    Equals ``conv2d(x, weight * M', bias, stride, padding, dilation)`` for ``M'`` the union of the blocks
    (invariant I.15); output channels in no block are zero (plus bias). Plain PyTorch, groups = 1, for tests.
    """
    cout, cin, kh, kw = weight.shape
    if x.dim() != 4 or x.shape[1] != cin:
        raise SelectionError(
            f"block_forward needs x [N, {cin}, H, W] for weight {tuple(weight.shape)}, got {tuple(x.shape)}"
        )
    stride, padding, dilation = (_pair(v) for v in (stride, padding, dilation))
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, cin*kh*kw, L]
    oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    w2 = weight.reshape(cout, -1)
    out = x.new_zeros(x.shape[0], cout, cols.shape[2])
    for b in blocks:
        out[:, b.rows] = torch.matmul(w2[b.rows][:, b.cols], cols[:, b.cols])  # [r, w] @ [N, w, L]
    if bias is not None:
        out = out + bias[None, :, None]
    return out.reshape(x.shape[0], cout, oh, ow)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
