"""M-step solvers: reorder one axis with the pruning mask fixed.

Both work on the gain matrix ``D`` of one axis, in slot order: ``D[s, J]`` is how much pruned mass
drops if the slice now in slot ``s`` moved from its block ``blk(s) = s // b`` to block ``J``
(``D[s, J] = S[s, blk(s)] - S[s, J]``, ``S[s, J]`` = that slice's mass under block ``J``'s mask).

Because the mask is constant on blocks, the reference's n x n swap gain
``G[s, t] = S[s,s] + S[t,t] - S[s,t] - S[t,s]`` is ``D[s, blk(t)] + D[t, blk(s)]``: the best swap
between blocks I and J is ``max_{s in I} D[s, J] + max_{t in J} D[t, I]``. The greedy solver keeps
``Mx[I, J] = max_{s in I} D[s, J]`` (B x B) and cached row maxima of ``Mx + Mx^T``, so it makes exactly
the reference's best-gain swaps with O(n·B) memory instead of two n x n matrices.

Both return ``order`` (new slot ``s`` holds the slice from old slot ``order[s]``) and the pruned mass
removed. Pinned slots (padding) never move.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def greedy_swaps(D: np.ndarray, b: int, pinned: np.ndarray, tol: float, max_swaps: int) -> tuple[np.ndarray, float, int]:
    """Best-gain pairwise swaps until no swap gains more than ``tol`` (TETRIS Algorithm 1).

    Works in place on ``D`` (the caller's scratch copy: long axes make it hundreds of MiB).
    """
    n, nb = D.shape
    D[pinned] = -np.inf
    order = np.arange(n)
    mx = D.reshape(nb, b, nb).max(axis=1)
    g = mx + mx.T
    np.fill_diagonal(g, -np.inf)  # swaps inside one block change nothing
    rows = np.arange(nb)
    rowarg = g.argmax(axis=1)
    rowmax = g[rows, rowarg]
    total, swaps = 0.0, 0
    while swaps < max_swaps:
        bi = int(rowmax.argmax())
        gain = float(rowmax[bi])
        if not gain > tol:
            break
        bj = int(rowarg[bi])
        s = bi * b + int(D[bi * b : (bi + 1) * b, bj].argmax())
        t = bj * b + int(D[bj * b : (bj + 1) * b, bi].argmax())
        ds, dt = D[s].copy(), D[t].copy()
        D[s] = dt - dt[bi]  # the slice from t now sits in block bi
        D[t] = ds - ds[bj]
        order[s], order[t] = order[t], order[s]
        total += gain
        swaps += 1
        for blk in (bi, bj):
            mx[blk] = D[blk * b : (blk + 1) * b].max(axis=0)
        for blk in (bi, bj):
            line = mx[blk] + mx[:, blk]
            line[blk] = -np.inf
            g[blk] = line
            g[:, blk] = line
        # Only columns bi and bj changed in the other rows: raise their cached max where a new value beats it,
        # recompute rows whose cached argmax was bi or bj (their max may have dropped; A.8-5).
        stale = (rowarg == bi) | (rowarg == bj)
        stale[[bi, bj]] = True
        cand = np.where(g[:, bi] >= g[:, bj], bi, bj)
        cval = g[rows, cand]
        up = (cval > rowmax) & ~stale
        rowmax[up] = cval[up]
        rowarg[up] = cand[up]
        idx = np.flatnonzero(stale)
        sub = g[idx]
        arg = sub.argmax(axis=1)
        rowarg[idx] = arg
        rowmax[idx] = sub[np.arange(len(idx)), arg]
    return order, total, swaps


def exact_assignment(D: np.ndarray, b: int, pinned: np.ndarray, tol: float) -> tuple[np.ndarray, float, int]:
    """Optimal reassignment of slices to blocks for the fixed mask (linear assignment, n x n costs).

    Slices keep their relative order inside a block (deterministic, and a no-op when nothing improves).
    Pinned slots are the tail of the axis and stay where they are.
    """
    n, _ = D.shape
    real = int((~pinned).sum())
    if pinned[:real].any():
        raise ValueError("pinned slots must be the tail of the axis")
    blk_of_slot = np.arange(real) // b
    cost = -D[:real][:, blk_of_slot]  # cost[s, c]: slice in slot s placed in slot c (only c's block matters)
    rows, cols = linear_sum_assignment(cost)
    gain = float(D[rows, blk_of_slot[cols]].sum())
    order = np.arange(n)
    if not gain > tol:
        return order, 0.0, 0
    new_blk = blk_of_slot[cols]
    order[:real] = rows[np.lexsort((rows, new_blk))]
    moved = int((new_blk != blk_of_slot[rows]).sum())
    return order, gain, moved
