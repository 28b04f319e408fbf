"""CSR layout: bit-exact round trip, storage accounting, break-even sparsity."""

from __future__ import annotations

import pytest
import torch
from prunekit_magnitude import CsrLayout, break_even_sparsity, densify

from prunekit import Selection
from prunekit.records import LayerInfo

# torch calls its CSR tensors "beta" once per process; pytest resets the plugin's import-time filter
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def pack(w: torch.Tensor, mask: torch.Tensor):
    kind = "conv2d" if w.dim() == 4 else "linear"
    info = LayerInfo("l", kind, tuple(w.shape))
    return CsrLayout().prunekit_transform_layout(layer=info, weight=w * mask, selection=Selection(mask=mask))


def cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 9, generator=g)
    m = torch.rand(7, 9, generator=g) > 0.6
    empty_row_col = m.clone()
    empty_row_col[2] = False
    empty_row_col[:, 4] = False
    empty_row_col[6] = False  # last row empty too
    wc = torch.randn(5, 3, 3, 2, generator=g)
    return {
        "random": (w, m),
        "empty row and column": (w, empty_row_col),
        "nnz = 0": (w, torch.zeros(7, 9, dtype=torch.bool)),
        "fully dense": (w, torch.ones(7, 9, dtype=torch.bool)),
        "conv": (wc, torch.rand(wc.shape, generator=g) > 0.5),
    }


@pytest.mark.parametrize("case", list(cases()))
def test_round_trip_bit_exact(case: str) -> None:
    w, m = cases()[case]
    lay = pack(w, m)
    dense = densify(lay)
    assert dense.shape == w.shape and dense.dtype == torch.float32
    assert torch.equal(dense, w * m)
    nnz = int(m.sum())
    t = lay.tensors
    assert t["values"].numel() == t["col_indices"].numel() == nnz == lay.meta["nnz"]
    assert t["col_indices"].dtype == t["crow_indices"].dtype == torch.int32
    assert t["crow_indices"].numel() == w.shape[0] + 1 and int(t["crow_indices"][-1]) == nnz
    assert lay.nbytes == 8 * nnz + 4 * (w.shape[0] + 1)
    # the layout is exactly the torch CSR of the GEMM view
    ref = (w * m).reshape(w.shape[0], -1).to_sparse_csr()
    assert torch.equal(t["crow_indices"].long(), ref.crow_indices()) and torch.equal(t["col_indices"].long(), ref.col_indices())


def test_kept_zero_is_stored_so_nnz_matches_mask() -> None:
    w = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    m = torch.tensor([[True, True], [False, True]])
    lay = pack(w, m)
    assert lay.meta["nnz"] == 3
    assert torch.equal(densify(lay), w * m)


def test_break_even() -> None:
    # CSR int32: 8 bytes per nnz + 4 (M + 1): just above 50 %
    m, k = 1024, 3136
    be = break_even_sparsity(m, k)
    assert be == pytest.approx(0.5 + 4 * (m + 1) / (8 * m * k))
    nnz_at = int((1 - be) * m * k)
    assert 8 * nnz_at + 4 * (m + 1) <= 4 * m * k < 8 * (nnz_at + 2) + 4 * (m + 1)
    assert break_even_sparsity(4, 4, index_bytes=8) > 0.66  # int64 indices cost more
    w = torch.randn(64, 100)
    lay = pack(w, torch.rand(64, 100) > 0.9)
    assert lay.nbytes < lay.dense_nbytes and lay.meta["sparsity"] > lay.meta["break_even_sparsity"]
