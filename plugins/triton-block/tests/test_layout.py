"""The triton-block layout holds exactly W*mask, with both permutations folded into its index arrays."""

import pytest
import torch
from prunekit_triton.layout import TritonBlockLayout, densify, pack
from prunekit_triton.synthetic import random_block_selection

from prunekit.errors import LayoutError
from prunekit.records import LayerInfo, Selection

CASES = [
    # (kind, weight shape, block, uniform, permute)
    ("linear", (48, 64), (16, 16), True, True),
    ("linear", (64, 96), (32, 32), False, True),
    ("linear", (128, 128), (64, 64), True, False),
    ("linear", (40, 37), (4, 1), True, False),
    ("linear", (64, 50), (32, 1), False, True),
    ("conv2d", (32, 12, 3, 3), (16, 1, 3, 3), True, True),
    ("conv2d", (24, 12, 3, 3), (8, 1, 1, 1), False, False),
    ("conv2d", (64, 64, 3, 3), (32, 32, 3, 3), True, True),
    ("conv2d", (64, 64, 1, 1), (32, 32, 1, 1), False, True),
    ("conv2d", (40, 16, 3, 3), (16, 1, 0, 0), True, False),  # Cout not a multiple of the block; 0 = full dim
]


def _layer(kind, shape):
    return LayerInfo("l", kind, shape)


@pytest.mark.parametrize(("kind", "shape", "block", "uniform", "permute"), CASES)
def test_densify_gives_back_the_masked_weight_exactly(kind, shape, block, uniform, permute):
    g = torch.Generator().manual_seed(1)
    layer = _layer(kind, shape)
    sel = random_block_selection(layer, block, 0.6, uniform=uniform, permute=permute, generator=g)
    w = torch.randn(shape, generator=g)
    lay = pack(layer, w, sel)
    assert torch.equal(densify(lay), w * sel.mask)
    assert lay.meta["kept"] == int(sel.mask.sum())
    # padding never points at a real column with a non-zero value
    cols, vals = lay.tensors["cols"], lay.tensors["values"]
    assert (vals[cols < 0] == 0).all()


def test_any_mask_is_exact_even_when_not_block_shaped():
    g = torch.Generator().manual_seed(2)
    layer = _layer("conv2d", (20, 6, 3, 3))
    mask = torch.rand(20, 6, 3, 3, generator=g) > 0.7
    w = torch.randn(20, 6, 3, 3, generator=g)
    lay = pack(layer, w, Selection(mask=mask, block=(16, 1, 3, 3)))
    assert torch.equal(densify(lay), w * mask)
    assert lay.meta["fill"] < 1.0  # the union of a row-block's columns stores zeros for the others


def test_tetris_conv_chunks_hold_one_tap_of_32_channels_and_fill_completely():
    g = torch.Generator().manual_seed(3)
    layer = _layer("conv2d", (64, 64, 3, 3))
    sel = random_block_selection(layer, (32, 32, 3, 3), 0.5, permute=True, generator=g)
    lay = pack(layer, torch.randn(64, 64, 3, 3, generator=g), sel)
    cols = lay.tensors["cols"].long()
    assert lay.meta["bk"] == 32 and lay.meta["fill"] == 1.0
    assert (cols >= 0).all()
    taps = cols % 9
    assert (taps == taps[:, :1]).all(), "a chunk must not mix taps: order inside a block is (kh, kw, cin)"
    chans = cols // 9
    p1 = sel.perms[1]
    slots = torch.argsort(p1)[chans]  # permuted slot of each gathered channel
    assert ((slots // 32) == (slots[:, :1] // 32)).all(), "a chunk stays inside one 32-channel block"


def test_linear_bxb_chunks_are_permuted_blocks():
    g = torch.Generator().manual_seed(4)
    layer = _layer("linear", (64, 64))
    sel = random_block_selection(layer, (32, 32), 0.5, permute=True, generator=g)
    lay = pack(layer, torch.randn(64, 64, generator=g), sel)
    p0, p1 = sel.perms[0], sel.perms[1]
    assert lay.meta["bk"] == 32 and lay.meta["chunks"] == 2  # 2 row-blocks x 1 kept 32x32 block
    blocks = {tuple(p1[j * 32 : (j + 1) * 32].tolist()) for j in range(2)}
    for c in lay.tensors["cols"]:
        assert tuple(c.tolist()) in blocks  # reads input column p1[slot]
    rows = {tuple(r.tolist()) for r in lay.tensors["rows"]}
    assert rows == {tuple(p0[:32].tolist()), tuple(p0[32:].tolist())}  # writes output row p0[slot]


def test_uniform_rows_give_a_uniform_layout_and_nonuniform_rows_go_longest_first():
    g = torch.Generator().manual_seed(5)
    layer = _layer("linear", (128, 256))
    u = pack(layer, torch.randn(128, 256, generator=g), random_block_selection(layer, (32, 1), 0.75, generator=g))
    assert u.meta["uniform"] and u.meta["chunks_per_row"] == 2  # 64 kept of 256 -> 2 chunks of 32
    sel = random_block_selection(layer, (16, 1), 0.8, uniform=False, generator=g)
    n = pack(layer, torch.randn(128, 256, generator=g), sel)
    nch = n.tensors["crow"].diff()
    assert not n.meta["uniform"]
    assert (nch[:-1] >= nch[1:]).all()


def test_storage_shrinks_with_sparsity():
    g = torch.Generator().manual_seed(6)
    layer = _layer("linear", (256, 256))
    sel = random_block_selection(layer, (32, 32), 0.75, generator=g)
    lay = pack(layer, torch.randn(256, 256, generator=g), sel)
    assert lay.nbytes < 0.3 * lay.dense_nbytes


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ((), "Selection.block is empty"),
        ((-1, 1), "negative extent"),
        ((16, 1, 3), r"\[16, 1, 3\] has 3 entries but the weight \[256, 32\] has 2 dims"),
    ],
)
def test_bad_block_shapes_raise_layout_error(block, match):
    layer = _layer("linear", (256, 32))
    with pytest.raises(LayoutError, match=match):
        pack(layer, torch.randn(256, 32), Selection(mask=torch.ones(256, 32, dtype=torch.bool), block=block))


def test_odd_and_tall_block_heights_pack_exactly():
    g = torch.Generator().manual_seed(7)
    layer = _layer("linear", (256, 32))
    for block, bm in (((24, 8), 24), ((256, 32), 64), ((0, 16), 64)):
        sel = random_block_selection(layer, block, 0.5, uniform=False, generator=g)
        w = torch.randn(256, 32, generator=g)
        lay = pack(layer, w, sel)
        assert lay.meta["bm"] == bm
        assert torch.equal(densify(lay), w * sel.mask)


def test_bad_permutation_and_chunk_raise_layout_error():
    layer = _layer("linear", (32, 32))
    bad = Selection(mask=torch.ones(32, 32, dtype=torch.bool), perms=(torch.zeros(32, dtype=torch.long), None), block=(16, 16))
    with pytest.raises(LayoutError, match="not a permutation"):
        pack(layer, torch.randn(32, 32), bad)
    with pytest.raises(LayoutError, match="chunk = 8"):
        TritonBlockLayout.Params(chunk=8)


def test_grouped_conv_is_refused():
    layer = LayerInfo("dw", "conv2d", (16, 1, 3, 3), groups=16)
    sel = Selection(mask=torch.ones(16, 1, 3, 3, dtype=torch.bool), block=(16, 1, 3, 3))
    with pytest.raises(LayoutError, match="grouped conv"):
        pack(layer, torch.randn(16, 1, 3, 3), sel)


def test_auto_chunk_follows_blocks_and_avoids_padding_for_short_1xn_rows():
    g = torch.Generator().manual_seed(8)
    layer = _layer("linear", (64, 32))
    short = pack(layer, torch.randn(64, 32, generator=g), random_block_selection(layer, (32, 1), 0.75, generator=g))
    assert short.meta["bk"] == 16 and short.meta["fill"] == 0.5  # 8 kept columns: one chunk of 16, not 32
    long = _layer("linear", (64, 512))
    lay = pack(long, torch.randn(64, 512, generator=g), random_block_selection(long, (32, 1), 0.75, generator=g))
    assert lay.meta["bk"] == 32 and lay.meta["fill"] == 1.0
    sq = pack(long, torch.randn(64, 512, generator=g), random_block_selection(long, (64, 64), 0.5, generator=g))
    assert sq.meta["bk"] == 64
