"""TETRIS tile matching: the invariants of method doc A.9 on synthetic weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from prunekit_tetris.components import TetrisParams, TetrisSelect
from prunekit_tetris.geometry import plan_blocks
from prunekit_tetris.solvers import exact_assignment, greedy_swaps
from prunekit_tetris.tiling import tile

from prunekit import LayerInfo, SelectionError


def scaled(shape: tuple[int, ...], seed: int, sigma: float = 0.5) -> torch.Tensor:
    """Gaussian weights with log-normal row and column scales: a stand-in for trained layers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    rows = torch.exp(sigma * torch.randn(shape[0], generator=g, dtype=torch.float64))
    cols = torch.exp(sigma * torch.randn(shape[1], generator=g, dtype=torch.float64))
    view = (-1, 1) + (1,) * (len(shape) - 2)
    return w * rows.view(view) * cols.view((1, -1) + (1,) * (len(shape) - 2))


def run(w: torch.Tensor, block: tuple[int, ...], rate: float, **kw):  # noqa: ANN201
    return tile(w.abs(), plan_blocks(tuple(w.shape), block, "error", "t"), rate, **kw)


def permuted(t: torch.Tensor, perms) -> torch.Tensor:  # noqa: ANN001
    for d, p in enumerate(perms):
        if p is not None:
            t = t.index_select(d, p)
    return t


def assert_block_shaped(mask_perm: torch.Tensor, block: tuple[int, ...]) -> None:
    view = []
    for n, b in zip(mask_perm.shape, block):
        view += [n // b, b]
    blocks = mask_perm.reshape(view).float()
    inner = tuple(range(1, 2 * mask_perm.ndim, 2))
    mean = blocks.mean(dim=inner)
    assert torch.all((mean == 0) | (mean == 1)), "mask is not constant on every block in permuted coordinates"


def test_permutation_alone_keeps_the_linear_output():
    w = scaled((64, 48), 0).float()
    res = run(w, (8, 8), 0.6)
    p0, p1 = res.perms
    assert p0 is not None and p1 is not None
    x = torch.randn(5, 48)
    y_perm = F.linear(x[:, p1], w[p0][:, p1])  # permuted kernel reads input column p1[j], writes row p0[r]
    y = torch.empty_like(y_perm)
    y[:, p0] = y_perm
    torch.testing.assert_close(y, F.linear(x, w))
    # the same with the mask: the permuted masked weight computes the masked layer
    wm = w * res.mask
    y_perm = F.linear(x[:, p1], wm[p0][:, p1])
    y[:, p0] = y_perm
    torch.testing.assert_close(y, F.linear(x, wm))


def test_permutation_alone_keeps_the_conv_output():
    w = scaled((32, 16, 3, 3), 1).float()
    res = run(w, (8, 4, 0, 0), 0.5)
    p0, p1 = res.perms[0], res.perms[1]
    assert p0 is not None and p1 is not None and res.perms[2:] == (None, None)
    x = torch.randn(2, 16, 7, 7)
    y_perm = F.conv2d(x[:, p1], w[p0][:, p1], padding=1)
    y = torch.empty_like(y_perm)
    y[:, p0] = y_perm
    # permuted input channels change the fp32 summation order: equal up to rounding, not bit for bit
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "shape,block,rate",
    [((64, 64), (8, 8), 0.75), ((48, 32, 3, 3), (8, 8, 0, 0), 0.6), ((64, 16, 3, 3), (16, 1, 0, 0), 0.5), ((40, 24), (8, 4), 0.3)],
)
def test_mask_is_block_shaped_in_permuted_coordinates_with_exact_counts(shape, block, rate):
    w = scaled(shape, 2)
    res = run(w, block, rate)
    full = tuple(n if b == 0 else b for n, b in zip(shape, block))
    for p in res.perms:
        if p is not None:
            assert torch.equal(p.sort().values, torch.arange(p.numel()))  # a bijection
    assert_block_shaped(permuted(res.mask, res.perms), full)
    nb = res.blocks
    assert res.pruned_blocks == int(np.floor(nb * rate + 1e-9))
    volume = int(np.prod(full))
    assert int(res.mask.sum()) == (nb - res.pruned_blocks) * volume
    # in original coordinates the mask is generally not block-shaped: that is what the perms are for
    assert res.retained >= res.baseline_retained


def test_reordering_gains_a_lot_on_scaled_rows_and_columns():
    w = scaled((256, 256), 3)
    res = run(w, (8, 8), 0.75)
    assert 0.30 < res.baseline_retained < 0.40  # plain 8x8 block pruning, method doc A.9: 0.361
    assert res.retained >= 0.50  # A.9: 0.527 after reordering
    topk = w.abs().flatten().sort(descending=True).values[: int(res.mask.sum())].sum() / w.abs().sum()
    assert res.retained <= float(topk) + 1e-12  # never above unstructured pruning at the same count
    assert all(a >= b - 1e-12 for a, b in zip(res.history, res.history[1:]))  # pruned mass never rises


@pytest.mark.parametrize("seed", range(6))
def test_never_below_plain_block_pruning(seed):
    g = torch.Generator().manual_seed(100 + seed)
    shape = [(32, 48), (64, 16, 3, 3), (96, 40)][seed % 3]
    block = [(8, 8), (8, 4, 0, 0), (16, 8)][seed % 3]
    w = torch.randn(*shape, generator=g, dtype=torch.float64) if seed % 2 else scaled(shape, seed)
    rate = [0.25, 0.5, 0.9][seed % 3]
    for solver in ("greedy", "exact"):
        res = run(w, block, rate, solver=solver)
        plain = run(w, block, rate, reorder=False)
        assert plain.retained == pytest.approx(res.baseline_retained, abs=1e-12)
        assert res.retained >= plain.retained - 1e-12


def test_exact_solver_never_worse_than_greedy():
    # per M-step, same mask: the assignment optimum dominates any sequence of swaps (A.9-5)
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, b = [(16, 4), (24, 8), (40, 8)][trial % 3]
        s = rng.lognormal(size=(n, n // b))
        own = s[np.arange(n), np.arange(n) // b]
        d = own[:, None] - s
        pinned = np.zeros(n, dtype=bool)
        _, g_exact, _ = exact_assignment(d, b, pinned, 0.0)
        _, g_greedy, _ = greedy_swaps(d.copy(), b, pinned, 0.0, 10 * n)
        assert g_exact >= g_greedy - 1e-9
    # and end to end on scaled matrices
    for block, rate in [((8, 8), 0.5), ((8, 8), 0.75), ((8, 8), 0.9), ((16, 16), 0.75)]:
        w = scaled((128, 128), 4)
        assert run(w, block, rate, solver="exact").retained >= run(w, block, rate, solver="greedy").retained - 1e-9


def reference_greedy(s: np.ndarray, b: int, tol: float) -> tuple[np.ndarray, float]:
    """The reference's M-step on the full n x n swap-gain matrix (method doc A.4), for comparison."""
    n = s.shape[0]
    blk = np.arange(n) // b
    big = s[:, blk]  # S[i, j] = mass of slice i placed in slot j (only j's block matters)
    order = np.arange(n)
    total = 0.0
    while True:
        d = np.diag(big)
        g = d[:, None] + d[None, :] - big - big.T
        i, j = np.unravel_index(np.argmax(g), g.shape)
        if not g[i, j] > tol:
            return order, total
        big[[i, j]] = big[[j, i]]
        order[[i, j]] = order[[j, i]]
        total += g[i, j]


def test_greedy_makes_the_references_best_gain_swaps():
    rng = np.random.default_rng(1)
    for n, b in [(16, 4), (32, 8), (30, 5)]:
        s = rng.lognormal(size=(n, n // b))
        own = s[np.arange(n), np.arange(n) // b]
        order, gain, swaps = greedy_swaps(own[:, None] - s, b, np.zeros(n, dtype=bool), 1e-12, 100 * n)
        ref_order, ref_gain = reference_greedy(s.copy(), b, 1e-12)
        assert swaps > 0
        assert gain == pytest.approx(ref_gain, rel=1e-9)
        assert np.array_equal(order, ref_order)
        # local optimality at exit: no remaining pair swap gains anything
        s_new = s[order]
        own_new = s_new[np.arange(n), np.arange(n) // b]
        d_new = own_new[:, None] - s_new
        blk = np.arange(n) // b
        pair = d_new[:, blk] + d_new[:, blk].T
        assert pair.max() <= 1e-9


def test_rate_zero_keeps_everything_and_orders_stay_identity():
    res = run(scaled((32, 32), 5), (8, 8), 0.0)
    assert bool(res.mask.all()) and res.perms == (None, None) and res.pruned_blocks == 0


def test_deterministic():
    w = scaled((64, 32, 3, 3), 6)
    a, b = run(w, (8, 8, 0, 0), 0.7), run(w, (8, 8, 0, 0), 0.7)
    assert torch.equal(a.mask, b.mask)
    assert all((p is None and q is None) or torch.equal(p, q) for p, q in zip(a.perms, b.perms))
    t = torch.ones(16, 16)  # all ties: lower flat index pruned first, as a stable sort would
    res = run(t, (4, 4), 0.5)
    assert res.perms == (None, None)
    assert not res.mask[:8].any() and res.mask[8:].all()


def test_skipped_axes_b1_and_whole():
    w = scaled((64, 24, 3, 3), 7)
    res = run(w, (16, 1, 0, 0), 0.5)  # 1xN-shaped: only the Cout order matters
    assert res.perms[1:] == (None, None, None)
    assert res.perms[0] is not None and res.retained >= res.baseline_retained
    res = run(w, (16, 0, 0, 0), 0.5)
    assert res.perms[1:] == (None, None, None)


def test_long_axes_are_capped_by_memory_bound():
    w = scaled((16, 4096), 8)
    res = run(w, (8, 8), 0.5, max_axis_mib=1)  # 4096 x 512 fp64 = 16 MiB > 1 MiB: input axis not permuted
    assert res.perms[1] is None and "1" in res.meta()["skipped_axes"]
    assert res.retained >= res.baseline_retained


def test_general_path_with_per_tap_blocks():
    # b = 1 on the taps leaves four live axes: the general (non-matrix) EM path
    w = scaled((32, 16, 3, 3), 9)
    res = run(w, (8, 4, 1, 1), 0.6)
    assert res.retained > res.baseline_retained
    assert_block_shaped(permuted(res.mask, res.perms), (8, 4, 1, 1))


def layer(shape: tuple[int, ...], name: str = "l") -> LayerInfo:
    return LayerInfo(name=name, kind="conv2d" if len(shape) == 4 else "linear", weight_shape=shape)


def select(shape, params, sparsity=0.5, w=None):  # noqa: ANN001, ANN201
    w = scaled(shape, 10).float() if w is None else w
    return TetrisSelect().prunekit_select_mask(
        layer=layer(shape), weight=w, scores=w.abs(), sparsity=sparsity, target=sparsity, params=params
    )


def test_nondivisible_error_names_layer_dim_size_block():
    with pytest.raises(SelectionError, match=r"layer l: dim 0 has size 20, not divisible by block 8.*pad.*shrink"):
        select((20, 16), TetrisParams(block=[8, 8]))


def test_nondivisible_pad_pins_zero_slices_to_the_tail():
    sel = select((20, 16), TetrisParams(block=[8, 8], nondivisible="pad"), 0.5)
    assert sel.mask.shape == (20, 16)
    p0 = sel.perms[0]
    if p0 is not None:
        assert p0.numel() == 20 and torch.equal(p0.sort().values, torch.arange(20))
    # padded to 24 rows: 3 x 2 grid, 3 pruned blocks; the real mask is the padded one cut to 20 rows
    assert sel.meta["padded"] == {"0": 4} and sel.meta["pruned_blocks"] == 3
    mask_perm = permuted(sel.mask, sel.perms)
    padded = torch.cat([mask_perm, mask_perm[-1:].expand(4, -1)])  # pad slots share the last block's fate
    assert_block_shaped(padded, (8, 8))


def test_nondivisible_shrink_uses_a_divisor_with_two_blocks():
    sel = select((20, 10), TetrisParams(block=[8, 16], nondivisible="shrink"), 0.5)
    assert sel.block == (5, 5) and sel.meta["shrunk"] == {"0": [8, 5], "1": [16, 5]}
    assert_block_shaped(permuted(sel.mask, sel.perms), (5, 5))


def test_conv_two_entry_block_means_all_taps():
    sel = select((16, 16, 3, 3), TetrisParams(block=[8, 8]))
    assert sel.block == (8, 8, 3, 3) and len(sel.perms) == 4
    assert "8 output x 8 input channels x all 3x3 taps" in sel.meta["pattern"]


def test_params_reject_bad_values():
    with pytest.raises(SelectionError, match="solver"):
        TetrisParams(solver="hungarian")
    with pytest.raises(SelectionError, match="nondivisible"):
        TetrisParams(nondivisible="crop")
    with pytest.raises(SelectionError, match="block"):
        TetrisParams(block=[-1, 8])
    with pytest.raises(SelectionError, match="tol"):
        TetrisParams(tol=2.0)
