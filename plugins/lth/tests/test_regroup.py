"""Regroup invariants I.9-I.16 (method doc, section I) on random and IMP-like masks, plus block_forward (I.15).

Most tests pass a precomputed ``part`` so they check Regroup itself; the partitioner has its own tests in
test_partition.py. A loop-based oracle written straight from the method doc's section D checks the whole result.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from prunekit_lth.regroup import Block, RegroupResult, block_forward, regroup

from prunekit.errors import SelectionError

RATIO, TILE, MIN_ROWS = 1.5, 32, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors gain nothing from threads, and on a busy 2-core machine spinning workers slow unfold 100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_mask(cout: int, n: int, density: float, seed: int) -> torch.Tensor:
    return torch.rand(cout, n, generator=torch.Generator().manual_seed(seed)) < density


def imp_like_mask(cout: int, n: int, density: float, seed: int) -> torch.Tensor:
    """Magnitude threshold of a weight whose rows and columns have their own scales plus a low-rank interaction."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.randn(cout, 1, generator=g) * 0.6 + torch.randn(1, n, generator=g) * 0.6
    scale = scale + torch.randn(cout, 3, generator=g) @ torch.randn(3, n, generator=g) * 0.4
    score = (torch.randn(cout, n, generator=g) * scale.exp()).abs()
    thr = torch.topk(score.flatten(), int(density * cout * n)).values[-1]
    return score >= thr


def sized_parts(sizes: list[int], seed: int) -> torch.Tensor:
    """A random assignment of ``sum(sizes)`` rows to parts of exactly these sizes."""
    ids = torch.cat([torch.full((s,), p) for p, s in enumerate(sizes)])
    return ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))]


# Cluster sizes exercise every branch of step 6: <= 16 (no block), (16, 32], > 32 with and without a remainder.
SIZES = [70, 64, 40, 33, 20, 17, 16, 9]
MASKS = {
    "random": lambda seed: random_mask(sum(SIZES), 150, 0.25, seed),
    "imp-like": lambda seed: imp_like_mask(sum(SIZES), 150, 0.25, seed),
}


@pytest.fixture(params=["random", "imp-like"])
def case(request) -> tuple[torch.Tensor, torch.Tensor, RegroupResult]:
    m = MASKS[request.param](3)
    part = sized_parts(SIZES, 5)
    return m, part, regroup(m, part=part)


def oracle(m: torch.Tensor, part: torch.Tensor, ratio: float, tile: int, min_rows: int) -> list[tuple[list, list]]:
    """Section D steps 3-6 with the clean rule, one row and one width at a time (slow, obviously right)."""
    rows_nz = [i for i in range(m.shape[0]) if m[i].any()]
    groups: dict[int, list[int]] = {}
    for i in rows_nz:
        groups.setdefault(int(part[i]), []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    n = m.shape[1]
    supp = {i: set(torch.nonzero(m[i]).flatten().tolist()) for i in rows_nz}
    blocks = []
    for _, rows in ordered:
        if len(rows) <= min_rows:
            continue
        cnt = [sum(j in supp[g] for g in rows) for j in range(n)]
        pi = sorted(range(n), key=lambda j: (-cnt[j], j))
        width = next(
            (w for w in range(1, n + 1) if all((w - 1) > ratio * len(supp[g] - set(pi[:w])) for g in rows)), None
        )
        if width is None:
            continue
        cols = pi[:width]
        head = tile * (len(rows) // tile) if len(rows) > tile else len(rows)
        blocks.append((rows[:head], cols))
        if head < len(rows):
            blocks.append((rows[head:], cols))
    return blocks


def union(blocks: tuple[Block, ...], shape: tuple[int, int]) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.bool)
    for b in blocks:
        out[b.rows[:, None], b.cols[None, :]] = True
    return out


# --- the whole result against the oracle --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "imp-like"])
@pytest.mark.parametrize("ratio", [1.5, 0.5])
def test_matches_loop_oracle(kind: str, ratio: float) -> None:
    m = MASKS[kind](11)
    part = sized_parts(SIZES, 2)
    r = regroup(m, part=part, ratio=ratio)
    want = oracle(m, part, ratio, TILE, MIN_ROWS)
    assert [(b.rows.tolist(), b.cols.tolist()) for b in r.blocks] == want
    assert torch.equal(r.mask, union(r.blocks, tuple(m.shape)))


# --- I.9 -------------------------------------------------------------------------------------------------------


def test_i9_blocks_row_disjoint_and_share_one_column_set(case) -> None:
    m, _, r = case
    all_rows = torch.cat([b.rows for b in r.blocks])
    assert all_rows.numel() == torch.unique(all_rows).numel(), "a row lies in two blocks"
    for b in r.blocks:
        assert torch.equal(b.rows, torch.sort(b.rows).values), "block rows must be ascending original indices"
        assert torch.unique(b.cols).numel() == b.cols.numel(), "a column is listed twice in one block"
        expect = torch.zeros(m.shape[1], dtype=torch.bool)
        expect[b.cols] = True
        assert bool((r.mask[b.rows] == expect).all()), "rows of one block must have exactly the block's columns"


# --- I.10 ------------------------------------------------------------------------------------------------------


def test_i10_mask_is_exactly_the_union_of_blocks(case) -> None:
    m, _, r = case
    assert r.mask.dtype == torch.bool and r.mask.shape == m.shape
    assert torch.equal(r.mask, union(r.blocks, tuple(m.shape)))
    assert r.blocks, "the fixture is built to give blocks"


# --- I.11 ------------------------------------------------------------------------------------------------------


def test_i11_rows_in_no_block_are_zero_and_counted(case) -> None:
    m, part, r = case
    in_block = torch.zeros(m.shape[0], dtype=torch.bool)
    for b in r.blocks:
        in_block[b.rows] = True
    assert not bool(r.mask[~in_block].any()), "a row outside every block kept a nonzero"
    small = torch.tensor([s <= MIN_ROWS for s in SIZES])[part] & m.any(1)
    assert torch.equal(~in_block & m.any(1), small), "exactly the rows of clusters with <= min_rows rows are blockless"
    assert r.rows_without_block == int(small.sum()) == sum(s for s in SIZES if s <= MIN_ROWS)
    assert not r.unchanged and r.reason == ""


def test_i11_no_block_at_all_returns_input_unchanged() -> None:
    m = imp_like_mask(64, 90, 0.3, 1)
    r = regroup(m, part=sized_parts([8] * 8, 0))
    assert r.unchanged and r.blocks == ()
    assert torch.equal(r.mask, m) and r.mask is not m
    assert "min_rows" in r.reason and r.rows_without_block == 0
    assert (r.kept_orig, r.dropped, r.refilled) == (int(m.sum()), 0, 0)
    assert r.density_after == r.density_before == pytest.approx(float(m.float().mean()))


# --- I.12 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile,min_rows", [(32, 16), (16, 4), (8, 8)])
def test_i12_block_row_counts(tile: int, min_rows: int) -> None:
    m = random_mask(sum(SIZES), 120, 0.3, 4)
    part = sized_parts(SIZES, 1)
    r = regroup(m, part=part, tile=tile, min_rows=min_rows)
    sizes = sorted(SIZES, reverse=True)
    expected = []
    for s in (s for s in sizes if s > min_rows):
        head = tile * (s // tile) if s > tile else s
        expected += [head] + ([s - head] if head < s else [])
    assert [b.shape[0] for b in r.blocks] == expected
    for i, b in enumerate(r.blocks):
        rows = b.shape[0]
        if rows % tile == 0 or min_rows < rows <= tile:
            continue
        prev = r.blocks[i - 1]  # a remainder follows its tile-multiple sibling and shares its columns
        assert 0 < rows < tile and prev.shape[0] % tile == 0 and prev.shape[0] >= tile
        assert torch.equal(prev.cols, b.cols)
        assert int(prev.rows.max()) < int(b.rows.min()), "the head takes the lowest row indices"


# --- I.13 ------------------------------------------------------------------------------------------------------


def test_i13_accounting(case) -> None:
    m, _, r = case
    kept = int((m & r.mask).sum())
    cells = sum(b.shape[0] * b.shape[1] for b in r.blocks)
    assert r.kept_orig == kept
    assert r.dropped == int(m.sum()) - kept
    assert r.refilled == cells - kept == int((r.mask & ~m).sum())
    assert r.density_before == pytest.approx(int(m.sum()) / m.numel())
    assert r.density_after == pytest.approx(cells / m.numel())
    assert r.dropped > 0 and r.refilled > 0, "fixture masks are unstructured: both must happen"
    meta = r.meta()
    json.dumps(meta)
    assert meta["nnz_after"] == cells and meta["kept_orig"] == kept and meta["blocks"] == len(r.blocks)


# --- I.14 ------------------------------------------------------------------------------------------------------


def test_i14_stopping_rule_holds_and_is_minimal_and_columns_are_a_count_prefix(case) -> None:
    m, _, r = case
    for b in r.blocks:
        w = b.shape[1]
        cluster = torch.cat([c.rows for c in r.blocks if torch.equal(c.cols, b.cols)])  # with a split sibling

        def worst(cols: torch.Tensor, rows: torch.Tensor) -> int:
            inside = torch.zeros(m.shape[1], dtype=torch.bool)
            inside[cols] = True
            return int((m[rows] & ~inside).sum(1).max())

        assert (w - 1) > RATIO * worst(b.cols, b.rows), "chosen width breaks the stopping rule for a block row"
        # the width is the cluster's: minimal over the cluster (head and remainder together)
        assert not ((w - 2) > RATIO * worst(b.cols[: w - 1], cluster)), "width - 1 already satisfies the rule"
        counts = m[cluster].sum(0)
        order = sorted(range(m.shape[1]), key=lambda j: (-int(counts[j]), j))
        assert b.cols.tolist() == order[:w], "columns must be the top-w by in-cluster count, ties ascending"


def test_i14_dense_rows_get_a_block_and_one_column_never_does() -> None:
    """Clean rule: no cluster of dense rows is ever refused (the reference's break defect), w = n qualifies."""
    m = torch.ones(40, 12, dtype=torch.bool)
    m[::3, 5] = False
    r = regroup(m, part=torch.zeros(40, dtype=torch.long))
    w = next(w for w in range(1, 13) if (w - 1) > RATIO * (12 - w))  # the full rows decide: 12 - w uncovered
    assert [b.shape for b in r.blocks] == [(32, w), (8, w)] and r.rows_without_block == 0
    assert 5 not in r.blocks[0].cols.tolist(), "the least shared column comes last in π"
    one = regroup(torch.ones(20, 1, dtype=torch.bool), part=torch.zeros(20, dtype=torch.long))
    assert one.unchanged and "n = 1" in one.reason


# --- I.15 ------------------------------------------------------------------------------------------------------


def _odd(blocks: tuple[Block, ...]) -> tuple[Block, ...]:
    return tuple(Block(rows=b.rows, cols=b.cols[: b.shape[1] - 1 + b.shape[1] % 2]) for b in blocks)


@pytest.mark.parametrize("batch", [1, 3, 65])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
def test_i15_block_forward_equals_masked_conv(batch: int, k: int, stride: int, padding: int) -> None:
    g = torch.Generator().manual_seed(batch * 7 + k)
    cout, cin = 40, 6
    m = imp_like_mask(cout, cin * k * k, 0.35, seed=k)
    m[:, 0] = True  # every row non-empty: one cluster of 40 rows = a 32-row tile + an 8-row remainder
    r = regroup(m, part=torch.zeros(cout, dtype=torch.long), tile=32, min_rows=4)
    assert {b.shape[0] for b in r.blocks} == {32, 8}
    w = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    x = torch.randn(batch, cin, 9, 8, generator=g, dtype=torch.float64)
    odd = _odd(r.blocks)
    assert all(b.shape[1] % 2 == 1 for b in odd)
    for blocks in (r.blocks, odd):
        mask = union(blocks, (cout, cin * k * k)).reshape(w.shape)
        want = F.conv2d(x, w * mask, bias, stride=stride, padding=padding)
        got = block_forward(x, w, blocks, stride=stride, padding=padding, bias=bias)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_i15_dilation_fp32_and_blockless_rows() -> None:
    g = torch.Generator().manual_seed(0)
    m = random_mask(sum(SIZES), 5 * 9, 0.3, 9)
    r = regroup(m, part=sized_parts(SIZES, 3))
    assert r.rows_without_block > 0
    w = torch.randn(sum(SIZES), 5, 3, 3, generator=g)
    x = torch.randn(3, 5, 11, 10, generator=g)
    want = F.conv2d(x, w * r.mask.reshape(w.shape), stride=2, padding=1, dilation=2)
    got = block_forward(x, w, r.blocks, stride=2, padding=1, dilation=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- I.16 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cout", [32, 64, 128])
def test_i16_small_layers_with_balanced_parts_fall_back(cout: int) -> None:
    m = imp_like_mask(cout, 64 * 9, 0.2, 0)
    part = torch.arange(cout) % 8  # 8 balanced parts of cout / 8 <= 16 rows
    r = regroup(m, part=part)
    assert r.unchanged and torch.equal(r.mask, m) and r.blocks == ()
    assert r.clusters == 8 and max(r.cluster_sizes) == cout // 8
    with pytest.raises(SelectionError, match="fewer parts.*smaller min_rows"):
        regroup(m, part=part, no_blocks="error")
    assert not regroup(m, part=torch.arange(cout) % 2, min_rows=cout // 4).unchanged, "fewer parts give blocks"


def test_i16_with_the_real_partitioner() -> None:
    m = imp_like_mask(64, 64 * 9, 0.2, 2)
    r = regroup(m, parts=8, imbalance=0.1)  # parts hold at most floor(1.1 * 8) = 8 rows
    assert r.unchanged and torch.equal(r.mask, m) and r.clusters == 8


def test_empty_mask() -> None:
    m = torch.zeros(48, 20, dtype=torch.bool)
    r = regroup(m, part=torch.zeros(48, dtype=torch.long))
    assert r.unchanged and r.reason == "the mask is empty" and r.clusters == 0
    with pytest.raises(SelectionError, match="no dense block"):
        regroup(m, part=torch.zeros(48, dtype=torch.long), no_blocks="error")


# --- inputs and speed ------------------------------------------------------------------------------------------


def test_part_ids_need_not_be_contiguous_and_empty_rows_are_ignored() -> None:
    m = random_mask(60, 40, 0.3, 0)
    m[[3, 47]] = False
    part = torch.where(torch.arange(60) < 30, 7, 100)
    part[3] = -1
    a = regroup(m, part=part)
    b = regroup(m, part=torch.where(torch.arange(60) < 30, 0, 1))
    assert torch.equal(a.mask, b.mask) and a.cluster_sizes == (29, 29)
    assert not bool(a.mask[[3, 47]].any()) and a.part[[3, 47]].tolist() == [-1, -1]
    bad = part.clone()
    bad[5] = -1
    with pytest.raises(SelectionError, match=r"part\[5\]"):
        regroup(m, part=bad)
    with pytest.raises(SelectionError, match="shape"):
        regroup(m, part=part[:10])


def test_input_is_not_modified_and_float_masks_work() -> None:
    m = random_mask(50, 30, 0.4, 1)
    keep = m.clone()
    part = sized_parts([25, 25], 0)
    r = regroup(m.float(), part=part)
    assert torch.equal(m, keep) and torch.equal(r.mask, regroup(m, part=part).mask)
    with pytest.raises(SelectionError, match="2-D"):
        regroup(m.reshape(50, 3, 10), part=part)


def test_large_layer_is_fast() -> None:
    m = imp_like_mask(512, 4608, 0.2, 0)
    part = torch.arange(512) % 8
    regroup(m, part=part)  # warm-up
    best = float("inf")
    for _ in range(3):  # best of 3: robust to a busy machine, still fails for a loop over rows or columns
        t = time.perf_counter()
        r = regroup(m, part=part)
        best = min(best, time.perf_counter() - t)
    assert best < 1.0, f"regroup of a 512x4608 layer took {best:.2f} s"
    assert len(r.blocks) == 8
