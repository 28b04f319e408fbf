"""pack-1xn: exact round trip, both forms, runs, folded permutations, and the errors it must raise."""

from __future__ import annotations

import pytest
import torch
from prunekit_cpu1xn.kernel import Cpu1xN, build
from prunekit_cpu1xn.layout import Pack1xN, densify, pack_1xn, validate
from prunekit_cpu1xn.synthetic import random_selection
from prunekit_cpu1xn.testing import rel_err

from prunekit.errors import LayoutError
from prunekit.records import LayerInfo, Selection

CONV = LayerInfo(name="c", kind="conv2d", weight_shape=(40, 12, 3, 3), padding=(1, 1))
FC = LayerInfo(name="fc", kind="linear", weight_shape=(36, 20))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_uniform_form_is_plain_2d_arrays() -> None:
    g = _gen()
    sel = random_selection(CONV, 8, 0.75, uniform=True, generator=g)
    lay = pack_1xn(CONV, torch.randn(CONV.weight_shape, generator=g), sel)
    nbr, nk = 5, 3  # 12 input channels, 25 % kept
    assert lay.meta["uniform"] and lay.meta["runs"] and lay.meta["kept_per_row"] == nk
    assert tuple(lay.tensors["values"].shape) == (nbr, nk, 9, 8)  # one index per run of 3x3 taps
    assert tuple(lay.tensors["indices"].shape) == (nbr, nk)
    assert "row_ptr" not in lay.tensors
    rows = lay.tensors["indices"]
    assert bool((rows[:, 1:] > rows[:, :-1]).all())  # ascending within a block-row


@pytest.mark.parametrize("runs", [True, False])
@pytest.mark.parametrize("permute", [True, False])
def test_densify_is_exactly_weight_times_mask(runs: bool, permute: bool) -> None:
    g = _gen(1)
    sel = random_selection(CONV, 16, 0.6, runs=runs, uniform=False, permute=permute, permute_inputs=True, generator=g)
    w = torch.randn(CONV.weight_shape, generator=g)
    lay = pack_1xn(CONV, w, sel)
    assert lay.meta["runs"] == runs and not lay.meta["uniform"]
    assert torch.equal(densify(lay), w * sel.mask)
    # 40 channels in blocks of 16: the last block-row has 8 padding slots
    assert int((lay.tensors["out_rows"] < 0).sum()) == 8
    t = lay.tensors
    assert lay.nbytes == 4 * t["values"].numel() + 4 * t["indices"].numel() + 8 * (t["row_ptr"].numel() + 48)
    assert lay.nbytes < lay.dense_nbytes


def test_nonuniform_linear_form_is_bsr_with_blocksize_n_by_1() -> None:
    g = _gen(2)
    sel = random_selection(FC, 4, 0.7, uniform=False, permute=True, generator=g)
    w = torch.randn(FC.weight_shape, generator=g)
    lay = pack_1xn(FC, w, sel)
    t = lay.tensors
    bsr = torch.sparse_bsr_tensor(  # values as [nnz, N, 1] blocks
        t["row_ptr"], t["indices"].long(), t["values"][:, 0, :, None], size=(36, 20), check_invariants=True
    )
    perm = sel.perms[0]
    assert torch.equal(bsr.to_dense(), (w * sel.mask)[perm])
    assert torch.equal(t["out_rows"], perm)


@pytest.mark.usefixtures("needs_kernel")
def test_output_permutation_is_folded_not_applied_to_neighbours() -> None:
    """The packed layer writes the original channel order: its output equals the unpermuted layer's."""
    g = _gen(3)
    sel = random_selection(CONV, 4, 0.5, permute=True, permute_inputs=True, generator=g)
    w = torch.randn(CONV.weight_shape, generator=g)
    compiled = build(CONV, pack_1xn(CONV, w, sel), None, Cpu1xN.Params(fallback="never"))
    x = torch.randn(1, 12, 9, 9, generator=g)
    ref = torch.nn.functional.conv2d(x, w * sel.mask, None, 1, 1)
    assert rel_err(compiled.module(x), ref) <= 1e-5


def test_partial_taps_fall_back_to_one_index_per_column() -> None:
    g = _gen(4)
    sel = random_selection(CONV, 8, 0.5, runs=True, generator=g)
    mask = sel.mask.clone()
    mask[:, 0, 0, 0] = False  # one tap of every block dropped: no longer whole runs
    lay = pack_1xn(CONV, torch.randn(CONV.weight_shape, generator=g), Selection(mask=mask, block=(8, 1, 1, 1)))
    assert not lay.meta["runs"] and lay.meta["taps"] == 1


def test_layout_errors_name_the_problem() -> None:
    g = _gen(5)
    w = torch.randn(CONV.weight_shape, generator=g)
    sel4 = random_selection(CONV, 4, 0.5, generator=g)
    with pytest.raises(LayoutError, match="n = 8"):
        pack_1xn(CONV, w, sel4, n=8)
    # the mask was made for N = 4 but the selection claims N = 8
    with pytest.raises(LayoutError, match="not constant over blocks of N = 8"):
        pack_1xn(CONV, w, Selection(mask=sel4.mask, block=(8, 1, 3, 3)))
    with pytest.raises(LayoutError, match="pack-1xn N = 3 is not a supported block height; use one of 2, 4, 8, 16, 32"):
        pack_1xn(CONV, w, Selection(mask=sel4.mask, block=(3, 1, 3, 3)))
    with pytest.raises(LayoutError, match="not a 1xN block"):
        pack_1xn(CONV, w, Selection(mask=sel4.mask, block=(4, 4, 1, 1)))
    with pytest.raises(LayoutError, match="no block shape"):
        pack_1xn(CONV, w, Selection(mask=sel4.mask))
    lay = pack_1xn(CONV, w, sel4)
    # built for another layer shape / another N
    other = LayerInfo(name="o", kind="conv2d", weight_shape=(40, 12, 1, 1))
    with pytest.raises(LayoutError, match="layout built for weight"):
        build(other, lay, None, Cpu1xN.Params())
    with pytest.raises(LayoutError, match="built for N = 4"):
        build(CONV, lay, None, Cpu1xN.Params(n=16))
    bad = type(lay)(format=lay.format, dense_shape=lay.dense_shape, tensors={**lay.tensors}, meta=lay.meta)
    bad.tensors["indices"] = lay.tensors["indices"] + 100
    with pytest.raises(LayoutError, match="outside"):
        validate(CONV, bad)
    with pytest.raises(LayoutError, match="format"):
        validate(CONV, type(lay)(format="csr", dense_shape=lay.dense_shape, tensors=lay.tensors))


def test_skipped_layer_packs_dense_and_stays_dense() -> None:
    w = torch.randn(CONV.weight_shape)
    sel = Selection(mask=torch.ones(CONV.weight_shape, dtype=torch.bool), dense_reason="Cout=40 not a multiple")
    lay = Pack1xN().prunekit_transform_layout(layer=CONV, weight=w, selection=sel, params=None)
    compiled = build(CONV, lay, None, Cpu1xN.Params(fallback="never"))
    assert compiled.kernel == "dense-fallback" and "Cout=40" in compiled.reason
    x = torch.randn(2, 12, 5, 5)
    assert rel_err(compiled.module(x), torch.nn.functional.conv2d(x, w, None, 1, 1)) <= 1e-5
