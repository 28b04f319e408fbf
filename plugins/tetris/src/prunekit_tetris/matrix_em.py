"""The EM loop for a weight that is a matrix once whole-dim axes are summed out (every linear layer and
every ``[bo, bi, 0, 0]`` / ``[N, 1, 0, 0]`` conv), with incremental bookkeeping.

For each optimised axis k it keeps ``X_k`` (n_k x B_o: each slice's mass per block of the other axis) and
``S_k = X_k @ Q_k`` (n_k x B_k: each slice's pruned mass if it sat in block J), both fp64 in item order
and stored transposed (``xt``, ``st``) so that every update is a row operation, plus the block-sum grid
``G``. An M-step moves m slices between blocks: ``G`` and the other axis's ``X``
change by those m slices (O(m·n)), its ``S`` by an m-term product (or is recomputed when m is large). An
E-step flips f blocks: each ``S`` changes by f columns of ``X``. The n x n swap-gain matrices of the
reference are never formed (see ``solvers``), and the full GEMMs run once per axis instead of once per
round — VGG16 fc6 with 8x8 blocks needs ~25088 x 3136 fp64 (630 MiB) for its input axis.
"""

from __future__ import annotations

import attrs
import numpy as np
import torch

from prunekit_tetris.solvers import exact_assignment, greedy_swaps

F64 = torch.float64
ROWS = 1 << 21  # elements per temporary slab


def _slabs(n: int, per_row: int) -> tuple[range, int]:
    step = max(1, ROWS // max(per_row, 1))
    return range(0, n, step), step


def _add_rows(target: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """target[idx[j]] += rows[j], repeated indices accumulate (index_put_: far faster here than index_add_)."""
    target.index_put_((idx,), rows, accumulate=True)


@attrs.define
class _Axis:
    k: int
    n: int
    b: int
    real: int  # slices before the padding (pads are pinned to the tail slots)
    perm: np.ndarray  # slot -> item
    opt: bool
    xt: torch.Tensor | None = None  # X_k^T: B_other x n fp64, item order (raw fp32 when the other axis has b = 1)
    st: torch.Tensor | None = None  # S_k^T: B x n fp64, item order; None = stale
    solver: str = ""

    @property
    def nb(self) -> int:
        return self.n // self.b

    def block_of_items(self) -> np.ndarray:
        slot = np.empty(self.n, dtype=np.int64)
        slot[self.perm] = np.arange(self.n)
        return slot // self.b


def block_sum_rows(a: torch.Tensor, b: int) -> torch.Tensor:
    """(n, m) -> (n/b, m) fp64: sums of b consecutive rows, in slabs."""
    rows, step = _slabs(a.shape[0], a.shape[1])
    step = max(b, step // b * b)
    return torch.cat([a[i : i + step].unflatten(0, (-1, b)).sum(1).to(F64) for i in range(0, a.shape[0], step)])


def block_sum_cols(a: torch.Tensor, b: int) -> torch.Tensor:
    """(n, m) -> (n, m/b) fp64: sums of b consecutive columns, in slabs."""
    rows, step = _slabs(a.shape[0], a.shape[1])
    return torch.cat([a[i : i + step].unflatten(1, (-1, b)).sum(2).to(F64) for i in rows])


def _gemm(qt: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """qt (B, M) @ xt (M, n) in fp64, in column slabs (xt may be raw fp32)."""
    out = torch.empty(qt.shape[0], xt.shape[1], dtype=F64)
    cols, step = _slabs(xt.shape[1], xt.shape[0])
    for i in cols:
        out[:, i : i + step] = qt @ xt[:, i : i + step].to(F64)
    return out


class MatrixEM:
    """State of one layer's EM run on a matrix ``a`` (n0 x n1, non-negative)."""

    def __init__(self, a: torch.Tensor, grid: torch.Tensor, colsum: torch.Tensor | None, block: tuple[int, int],
                 real: tuple[int, int], opt: tuple[bool, bool]) -> None:
        self.a = a
        n0, n1 = a.shape
        self.axes = [
            _Axis(0, n0, block[0], real[0], np.arange(n0), opt[0]),
            _Axis(1, n1, block[1], real[1], np.arange(n1), opt[1]),
        ]
        ax0, ax1 = self.axes
        # Identity orders at the start: every reduction is a plain reshape-sum, no gather.
        self.g = grid.reshape(ax0.nb, ax1.nb).clone()  # block sums (fp64), maintained as slices move
        if ax0.opt:
            ax0.xt = colsum.T.contiguous() if ax1.b > 1 else a.T
        if ax1.opt:
            ax1.xt = block_sum_rows(a, ax0.b) if ax0.b > 1 else a
        self.pruned = torch.zeros(self.g.shape, dtype=torch.bool)

    # ------------------------------------------------------------ helpers
    def _q(self, k: int) -> torch.Tensor:
        """Q_k (B_other x B_k) fp64: S_k = X_k @ Q_k, i.e. S_k^T = Q_k^T @ X_k^T."""
        p = self.pruned.to(F64)
        return p.T if k == 0 else p

    def _slices(self, k: int, items: np.ndarray) -> torch.Tensor:
        """Raw slices of ``items`` along axis k as rows (m x n_other), fp64."""
        idx = torch.as_tensor(items)
        return (self.a.index_select(0, idx) if k == 0 else self.a.index_select(1, idx).T).to(F64)

    def _gview(self, k: int) -> torch.Tensor:
        return self.g if k == 0 else self.g.T

    # ------------------------------------------------------------ E-step
    def set_pruned(self, new: torch.Tensor) -> None:
        """Adopt a new pruned grid, updating each S by the flipped blocks (or marking it stale)."""
        flips = (new ^ self.pruned).nonzero()
        sign = torch.where(new[flips[:, 0], flips[:, 1]], 1.0, -1.0).to(F64)
        self.pruned = new
        f = flips.shape[0]
        for ax in self.axes:
            if ax.st is None or f == 0:
                continue
            other_nb = self.axes[1 - ax.k].nb
            if 4 * f >= other_nb * ax.nb:
                ax.st = None  # recomputing is cheaper than f row updates
                continue
            src = flips[:, 1 - ax.k]  # block of the other axis = row of X_k^T
            dest = flips[:, ax.k]  # block of this axis = row of S_k^T
            step = max(1, ROWS // ax.n)
            for i in range(0, f, step):
                upd = ax.xt.index_select(0, src[i : i + step]).to(F64) * sign[i : i + step, None]
                _add_rows(ax.st, dest[i : i + step], upd)

    # ------------------------------------------------------------ M-step
    def m_step(self, k: int, solver: str, tol: float, max_swaps: int, max_bytes: int) -> int:
        ax = self.axes[k]
        if ax.st is None:
            ax.st = _gemm(self._q(k).T, ax.xt)
        d = ax.st.index_select(1, torch.as_tensor(ax.perm)).T.contiguous().numpy()  # S in slot order, n x B
        n, b = ax.n, ax.b
        own = d[np.arange(n), np.arange(n) // b].copy()
        np.subtract(own[:, None], d, out=d)  # D[s, J] = S[s, blk(s)] - S[s, J], in place
        pinned = np.arange(n) >= ax.real
        use = "exact" if solver == "exact" and n * n * 8 <= max_bytes else "greedy"
        ax.solver = use
        if use == "exact":
            order, _gain, _ = exact_assignment(d, b, pinned, tol)
        else:
            order, _gain, _ = greedy_swaps(d, b, pinned, tol, max_swaps)
        del d
        old_blk = ax.block_of_items()
        ax.perm = ax.perm[order]
        new_blk = ax.block_of_items()
        moved = np.flatnonzero(old_blk != new_blk)
        if moved.size:
            self._moved(k, moved, old_blk[moved], new_blk[moved])
        return int(moved.size)

    def _moved(self, k: int, items: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        ax, other = self.axes[k], self.axes[1 - k]
        oi, ni = torch.as_tensor(old), torch.as_tensor(new)
        it = torch.as_tensor(items)
        rows = ax.xt.index_select(1, it).T.to(F64)  # each moved slice's mass per block of the other axis
        gv = self._gview(k)
        _add_rows(gv, ni, rows)
        _add_rows(gv, oi, -rows)
        if not other.opt:
            return
        raw = self._slices(k, items)  # m x n_other
        # X_other[:, blk] gains the slices that entered blk and loses those that left.
        _add_rows(other.xt, ni, raw)
        _add_rows(other.xt, oi, -raw)
        if other.st is not None:
            if 2 * items.size >= ax.nb:
                other.st = None  # cheaper to recompute at its next M-step
            else:
                q = self._q(1 - k)  # B_k x B_other
                other.st += (q.index_select(0, ni) - q.index_select(0, oi)).T @ raw
