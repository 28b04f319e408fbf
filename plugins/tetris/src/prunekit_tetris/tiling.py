"""TETRIS tile matching for one layer: alternate E-steps (prune the lowest-mass blocks for the current
order) and M-steps (reorder each optimisable axis for the current mask) until the pruned mass stops
dropping by more than a relative tolerance, then one final E-step.

Everything is stated on ``A`` = the layer's non-negative scores (``|w|`` for ``tetris-l1``), padded per the
plan, with axes whose block spans the whole dim summed out first (kh, kw of ``[8, 8, 0, 0]``). Sums inside
one block use the scores' dtype (PyTorch's cascade summation: ~1e-7 relative error per block); every sum
across blocks (the cost matrices S, pruned and total mass) is fp64. Work is chunked so that no temporary
exceeds ~``CHUNK`` elements (small slabs are reused by the allocator; large fresh ones page-fault). The
per-axis gain matrix is ``n x n/b`` (``n x n`` for the exact solver); an axis whose matrix would exceed
``max_axis_mib`` is left unpermuted (greedy) or solved greedily (exact), and reported in ``skipped``.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np
import torch

from prunekit_tetris.geometry import BlockPlan
from prunekit_tetris.matrix_em import MatrixEM, block_sum_cols, block_sum_rows
from prunekit_tetris.solvers import exact_assignment, greedy_swaps

CHUNK = 1 << 21  # elements per temporary slab (16 MiB in fp64)
F64 = torch.float64


@attrs.frozen
class TileResult:
    """Outcome for one layer. ``perms[k][slot] = original index`` (None = identity); ``mask`` in the
    original index space; masses are fractions of the layer's total score mass."""

    mask: torch.Tensor
    perms: tuple[torch.Tensor | None, ...]
    blocks: int
    pruned_blocks: int
    retained: float
    baseline_retained: float
    iterations: int
    swaps: int
    history: tuple[float, ...]  # pruned mass (fraction) after each E-step
    skipped: dict[int, str] = attrs.field(factory=dict)
    solver_used: dict[int, str] = attrs.field(factory=dict)

    def meta(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "pruned_blocks": self.pruned_blocks,
            "block_sparsity": self.pruned_blocks / self.blocks if self.blocks else 0.0,
            "retained_l1": round(self.retained, 6),
            "baseline_retained_l1": round(self.baseline_retained, 6),
            "iterations": self.iterations,
            "swaps": self.swaps,
            "skipped_axes": {str(k): v for k, v in self.skipped.items()},
            "solver_per_axis": {str(k): v for k, v in self.solver_used.items()},
        }


def pruned_count(num_blocks: int, rate: float) -> int:
    """floor(NB · r), robust to binary rounding (0.29 · 100 gives 29, not 28)."""
    return min(num_blocks, int(math.floor(num_blocks * rate + 1e-9)))


def _chunk_rows(per_row: int, unit: int) -> int:
    """Rows per slab: about CHUNK elements, a multiple of ``unit``."""
    rows = max(1, CHUNK // max(per_row, 1))
    return max(unit, rows // unit * unit)


def _reduce(a: torch.Tensor, perms: list[torch.Tensor | None], block: tuple[int, ...], keep: int | None) -> torch.Tensor:
    """Permute and block-sum every axis except ``keep`` (left whole, in original order) -> fp64.

    With ``keep=None`` every axis is reduced: the block-sum grid of the permuted tensor.
    """
    axis = 0 if keep is None else keep
    if keep is not None and all(perms[d] is None and block[d] == 1 for d in range(a.ndim) if d != keep):
        return a  # nothing to reduce (1xN-shaped blocks): no fp64 copy of a large layer
    n = a.shape[axis]
    unit = block[axis] if keep is None else 1
    step = _chunk_rows(a.numel() // max(n, 1), unit)
    outs = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        if keep is None and perms[axis] is not None:
            x = a.index_select(axis, perms[axis][start:stop])
        else:
            x = a.narrow(axis, start, stop - start)
        for d in range(a.ndim):
            if d != axis and perms[d] is not None:
                x = x.index_select(d, perms[d])
        for d in reversed(range(a.ndim)):
            if d != keep and block[d] > 1:
                x = x.unflatten(d, (-1, block[d])).sum(d + 1)
        outs.append(x.to(F64))
    return torch.cat(outs, axis)


def _axis_cost(x: torch.Tensor, pruned: torch.Tensor, k: int, perm: torch.Tensor) -> torch.Tensor:
    """S[s, J] = pruned mass of the slice in slot s (along k) if it sat in block J: x_k[perm] @ P_k^T, fp64."""
    xk = x.movedim(k, 0).reshape(x.shape[k], -1)
    pk = pruned.movedim(k, 0).reshape(pruned.shape[k], -1).to(F64)
    step = _chunk_rows(xk.shape[1], 1)
    return torch.cat([xk.index_select(0, perm[i : i + step]).to(F64) @ pk.T for i in range(0, xk.shape[0], step)])


def _e_step(grid: torch.Tensor, p: int) -> tuple[torch.Tensor, float]:
    """Prune the ``p`` lowest-sum blocks (ties: lower flat index first). Returns (pruned grid, pruned mass).

    Same result as a stable sort, in O(NB): the p-th smallest value, everything below it, then the
    lowest-index blocks equal to it.
    """
    flat = grid.reshape(-1)
    if p <= 0:
        return torch.zeros(grid.shape, dtype=torch.bool, device=grid.device), 0.0
    if p >= flat.numel():
        return torch.ones(grid.shape, dtype=torch.bool, device=grid.device), float(flat.sum())
    kth = flat.kthvalue(p).values
    pruned = flat < kth
    need = p - int(pruned.sum())
    ties = (flat == kth).nonzero().flatten()[:need]
    pruned[ties] = True
    return pruned.reshape(grid.shape), float(flat[pruned].sum())


def _phases(solver: str) -> tuple[str, ...]:
    """"exact" runs greedy EM to its fixed point, then EM with exact M-steps from there: every exact M-step
    can only lower the pruned mass, so the result is never worse than greedy's (a cold exact trajectory
    can end in a worse local optimum)."""
    return ("greedy", "exact") if solver == "exact" else ("greedy",)


def _em_general(a, grid, block_t, plan, axes, live, perms, pruned, mass, p, solver, tol_abs, max_iters, max_axis_mib,
                max_swaps_per_slice, used):  # noqa: ANN001, ANN202
    """EM on any number of live axes: each M-step recomputes its reductions (conv blocks with b = 1 taps)."""
    block = list(block_t)
    history: list[float] = []
    iterations = 0
    swaps = 0
    cached: dict[int, tuple[int, torch.Tensor]] = {}  # axis -> (version of the other axes' perms, x_k)
    version = [0] * a.ndim
    for phase in _phases(solver):
        for _ in range(max_iters):
            iterations += 1
            for k in axes:
                key = sum(version) - version[k]
                if k not in cached or cached[k][0] != key:
                    cached[k] = (key, _reduce(a, perms, block_t, k))
                x = cached[k][1]
                perm_k = perms[k] if perms[k] is not None else torch.arange(a.shape[k], device=a.device)
                d = _axis_cost(x, pruned, k, perm_k).cpu().numpy()
                n, b = d.shape[0], block[k]
                own = d[np.arange(n), np.arange(n) // b].copy()
                np.subtract(own[:, None], d, out=d)  # S -> D in place (bounded memory for long axes)
                pinned = np.arange(n) >= plan.shape[k]
                use = "exact" if phase == "exact" and n * n * 8 <= max_axis_mib * 2**20 else "greedy"
                if use == "exact":
                    order, _gain, _ = exact_assignment(d, b, pinned, tol_abs)
                else:
                    order, _gain, _ = greedy_swaps(d, b, pinned, tol_abs, max_swaps_per_slice * n)
                used[k] = use
                moved = int((order // b != np.arange(n) // b).sum())  # slices that changed block
                swaps += moved
                if moved:
                    perms[k] = perm_k.index_select(0, torch.as_tensor(order, device=a.device))
                    version[k] += 1
            # E-step for the new order, from the last axis's reduction (its other axes are unchanged).
            k = axes[-1]
            x = cached[k][1]
            if perms[k] is not None:
                x = x.index_select(k, perms[k])
            new_pruned, new_mass = _e_step(x.unflatten(k, (-1, block[k])).sum(k + 1, dtype=F64), p)
            history.append(new_mass)
            improved = mass - new_mass
            pruned, mass = new_pruned, new_mass
            if not improved > tol_abs:
                break
    return pruned, mass, history, iterations, swaps


def _em_matrix(a, grid, block_t, plan, axes, live, perms, pruned, mass, p, solver, tol_abs, max_iters, max_axis_mib,
               max_swaps_per_slice, used):  # noqa: ANN001, ANN202
    """EM on a matrix (<= 2 live axes) with incremental bookkeeping (``matrix_em``)."""
    dims = live + [None] * (2 - len(live))
    n = [a.shape[d] if d is not None else 1 for d in dims]
    grid, colsum = grid
    em = MatrixEM(
        a.reshape(n[0], n[1]),
        grid,
        colsum,
        tuple(block_t[d] if d is not None else 1 for d in dims),
        tuple(plan.shape[d] if d is not None else 1 for d in dims),
        tuple(d is not None and d in axes for d in dims),
    )
    grid_shape = pruned.shape
    em.set_pruned(pruned.reshape(em.g.shape))
    history: list[float] = []
    iterations = swaps = 0
    for phase in _phases(solver):
        for _ in range(max_iters):
            iterations += 1
            for k, d in enumerate(dims):
                if d is not None and d in axes:
                    swaps += em.m_step(k, phase, tol_abs, max_swaps_per_slice * n[k], max_axis_mib * 2**20)
                    used[d] = em.axes[k].solver
            new_pruned, new_mass = _e_step(em.g, p)
            em.set_pruned(new_pruned)
            history.append(new_mass)
            improved = mass - new_mass
            mass = new_mass
            if not improved > tol_abs:
                break
    for k, d in enumerate(dims):
        if d is not None and d in axes:
            perms[d] = torch.as_tensor(em.axes[k].perm, device=a.device)
    return em.pruned.reshape(grid_shape), mass, history, iterations, swaps


def tile(
    scores: torch.Tensor,
    plan: BlockPlan,
    rate: float,
    reorder: bool = True,
    solver: str = "greedy",
    tol: float = 1e-7,
    max_iters: int = 20,
    max_axis_mib: int = 256,
    max_swaps_per_slice: int = 8,
) -> TileResult:
    """Block-prune ``scores`` at ``rate`` (fraction of blocks), reordering axes first when ``reorder``.

    Runs on CPU (the swap search is numpy); the mask and perms come back on the scores' device.
    """
    a = scores.detach().cpu()
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    if plan.padded != plan.shape:
        pad = []
        for n, p in zip(reversed(plan.shape), reversed(plan.padded)):
            pad += [0, p - n]
        a = torch.nn.functional.pad(a, pad)
    block = list(plan.block)
    # Sum out whole-dim axes (b = n): permuting them cannot change any block sum.
    whole = [d for d in range(a.ndim) if block[d] == a.shape[d] and a.shape[d] > 1]
    if whole:
        a = a.sum(dim=whole, keepdim=True)
        for d in whole:
            block[d] = 1
    block_t = tuple(block)
    nb = plan.num_blocks
    p = pruned_count(nb, rate)
    perms: list[torch.Tensor | None] = [None] * a.ndim

    live = [d for d in range(a.ndim) if a.shape[d] > 1]
    grid_shape = tuple(n // b for n, b in zip(a.shape, block_t))
    colsum = None
    if len(live) <= 2:  # a matrix: one pass gives the column-block sums (X_0) and the grid
        dims = live + [None] * (2 - len(live))
        n2 = [a.shape[d] if d is not None else 1 for d in dims]
        b2 = [block_t[d] if d is not None else 1 for d in dims]
        a2 = a.reshape(n2)
        colsum = block_sum_cols(a2, b2[1]) if b2[1] > 1 else None
        grid = block_sum_rows(colsum if colsum is not None else a2, b2[0]).reshape(grid_shape)
    else:
        grid = _reduce(a, perms, block_t, None)
    if grid.min() < 0:
        raise ValueError("tile() needs non-negative scores")
    total = float(grid.sum())
    tol_abs = tol * total
    pruned, mass = _e_step(grid, p)
    baseline = mass
    history = [mass]
    iterations = swaps = 0
    skipped: dict[int, str] = {}
    used: dict[int, str] = {}
    axes = [d for d in range(a.ndim) if plan.optimisable(d)]
    for k in axes:
        n, b = a.shape[k], block[k]
        if n * (n // b) * 8 > max_axis_mib * 2**20:
            skipped[k] = f"gain matrix {n}x{n // b} fp64 exceeds max_axis_mib={max_axis_mib}"
    axes = [k for k in axes if k not in skipped]
    if reorder and axes and 0 < p < nb and total > 0:
        run = _em_matrix if len(live) <= 2 else _em_general
        pruned, mass, extra, iterations, swaps = run(
            a, (grid, colsum), block_t, plan, axes, live, perms, pruned, mass, p, solver, tol_abs, max_iters, max_axis_mib,
            max_swaps_per_slice, used
        )
        history += extra

    # Mask in original coordinates: original index i of dim d sits in slot inv_d[i], i.e. block inv_d[i] // b_d.
    mask = ~pruned
    out_perms: list[torch.Tensor | None] = []
    for d in reversed(range(a.ndim)):
        n, pd = plan.shape[d], perms[d]
        slot = torch.arange(n, device=a.device)
        if pd is not None:
            inv = torch.empty_like(pd)
            inv[pd] = torch.arange(pd.numel(), device=pd.device)
            slot = inv[:n]
            pd = pd[:n]  # padding is pinned to the tail slots
            if torch.equal(pd, torch.arange(n, device=pd.device)):
                pd = None
        out_perms.insert(0, pd)
        mask = mask.index_select(d, slot // plan.block[d])
    denom = total if total > 0 else 1.0
    return TileResult(
        mask=mask.contiguous().to(scores.device),
        perms=tuple(p if p is None else p.to(scores.device) for p in out_perms),
        blocks=nb,
        pruned_blocks=p,
        retained=1.0 - mass / denom if total > 0 else 1.0,
        baseline_retained=1.0 - baseline / denom if total > 0 else 1.0,
        iterations=iterations,
        swaps=swaps,
        history=tuple(h / denom for h in history),
        skipped=skipped,
        solver_used=used,
    )
