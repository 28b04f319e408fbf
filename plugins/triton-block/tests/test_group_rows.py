"""triton-block ``group_rows``: rows of identical support as row-blocks of ``bm`` with gathered columns (Structural-LTH
Regroup, method doc E.3), run by the unchanged kernels and equal to the masked dense layer, bias included.

Outputs are allocated NaN-filled, so an element no program writes fails. Shapes are tiny: on a machine without
a GPU these run on Triton's CPU interpreter.
"""

import pytest
import torch
import torch.nn.functional as F
from prunekit_triton import modules
from prunekit_triton.build import TritonBlockKernel
from prunekit_triton.layout import TritonBlockLayout, densify, pack
from prunekit_triton.synthetic import random_block_selection

from prunekit.errors import LayoutError
from prunekit.records import LayerInfo, Selection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def alloc(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(modules, "alloc_output", alloc)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rel_err(y, ref):
    assert not torch.isnan(y).any(), "an output element was never written"
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def imp_like_mask(m, k, density, g):
    """Global magnitude mask of a weight with row and column scales (IMP masks are correlated like this)."""
    w = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * torch.rand(1, k, generator=g)
    mask = torch.zeros(m * k, dtype=torch.bool)
    mask[w.abs().flatten().topk(max(1, round(density * m * k))).indices] = True
    return mask.view(m, k)


def regroup_selection(shape, density, g, **kw):
    """A Selection as RegroupSelect returns it: regrouped mask, each block's rows contiguous in perms[0]."""
    regroup = pytest.importorskip("prunekit_lth.regroup").regroup
    m = shape[0]
    res = regroup(imp_like_mask(m, int(torch.tensor(shape[1:]).prod()), density, g), seed=0, **kw)
    assert res.blocks, "the test mask must give blocks"
    in_blocks = torch.cat([b.rows for b in res.blocks])
    rest = torch.ones(m, dtype=torch.bool)
    rest[in_blocks] = False
    perms = (torch.cat([in_blocks, rest.nonzero().flatten()]),) + (None,) * (len(shape) - 1)
    return Selection(mask=res.mask.reshape(shape), perms=perms, block=(), pattern="regroup")


def group_mask(shape, groups, g):
    """Hand-built groups: ``(rows, cols)`` per group, rows scattered over the layer, the other rows all-zero."""
    m, k = shape[0], int(torch.tensor(shape[1:]).prod())
    mask = torch.zeros(m, k, dtype=torch.bool)
    rows = torch.randperm(m, generator=g)
    at = 0
    for r, c in groups:
        mask[rows[at : at + r, None], torch.randperm(k, generator=g)[None, :c]] = True
        at += r
    return mask.reshape(shape)


def compiled(layer, sel, bm, seed, bias=None):
    g = _gen(seed)
    w = torch.randn(layer.weight_shape, generator=g).to(DEVICE)
    if bias is None and layer.has_bias:
        bias = torch.randn(layer.weight_shape[0], generator=g).to(DEVICE)
    lay = pack(layer, w, sel, group_rows=True, bm=bm)
    assert torch.equal(densify(lay), w * sel.mask.to(DEVICE))
    out = TritonBlockKernel().prunekit_build_kernel(layer=layer, layout=lay, bias=bias, params=None)
    assert out.kernel.startswith("triton-block/"), out.reason
    return out.module, lay, w * sel.mask.to(DEVICE), bias


def check_conv(layer, sel, bm, seed, hw=5, batches=(1, 3)):
    mod, lay, wm, bias = compiled(layer, sel, bm, seed)
    g = _gen(seed + 1)
    for b in batches:
        x = torch.randn(b, layer.weight_shape[1], hw, hw, generator=g).to(DEVICE)
        ref = F.conv2d(x, wm, bias, layer.stride, layer.padding, layer.dilation)
        assert rel_err(mod(x), ref) <= 1e-5, (layer, b)
    return lay


# (Cout, Cin, k, stride, padding, bias, bm, regroup kwargs)
REGROUP_CONVS = [
    (48, 6, 3, 1, 1, True, 16, dict(parts=2, tile=16, min_rows=8)),
    (48, 6, 3, 2, 0, False, 32, dict(parts=2, tile=16, min_rows=8)),
    (40, 7, 1, 2, 0, True, 16, dict(parts=2, tile=16, min_rows=4)),  # K = 7
    (64, 5, 3, 1, 0, True, 32, dict(parts=2, tile=32, min_rows=8)),  # K = 45: odd block widths
]


@pytest.mark.parametrize(("cout", "cin", "k", "stride", "pad", "bias", "bm", "kw"), REGROUP_CONVS)
def test_regroup_conv_matches_masked_dense(cout, cin, k, stride, pad, bias, bm, kw):
    layer = LayerInfo("c", "conv2d", (cout, cin, k, k), has_bias=bias, stride=(stride, stride), padding=(pad, pad))
    sel = regroup_selection(layer.weight_shape, 0.25, _gen(cout + cin), **kw)
    lay = check_conv(layer, sel, bm, seed=cout)
    assert lay.meta["group_rows"] and lay.meta["groups"] >= 2


@pytest.mark.parametrize(("k", "stride", "pad", "bias"), [(1, 1, 0, True), (1, 2, 0, False), (3, 1, 1, False), (3, 2, 1, True)])
def test_hand_built_groups_with_ragged_sizes_odd_widths_and_zero_rows(k, stride, pad, bias):
    """Groups of 5, 19 and 16 rows (bm = 16), widths 7, 13 and 1, 12 all-zero rows."""
    layer = LayerInfo("c", "conv2d", (52, 3, k, k), has_bias=bias, stride=(stride, stride), padding=(pad, pad))
    mask = group_mask(layer.weight_shape, [(5, 7), (19, 13 if k == 3 else 2), (16, 1)], _gen(k + stride))
    check_conv(layer, Selection(mask=mask), 16, seed=10 + k + stride)


def test_row_blocks_hold_exactly_their_groups_columns_and_meta_counts_padding():
    layer = LayerInfo("c", "conv2d", (52, 3, 3, 3))
    mask = group_mask(layer.weight_shape, [(5, 7), (19, 13), (16, 1)], _gen(3))
    lay = pack(layer, torch.randn(layer.weight_shape), Selection(mask=mask), group_rows=True, bm=16)
    m = lay.meta
    assert m["groups"] == 3 and m["zero_rows"] == 12 and m["block"] == []
    # row-blocks: 5 -> 1 (11 pad), 19 -> 2 (13 pad), 16 -> 1, 12 zero rows -> 1 (no chunk, no work)
    assert m["row_blocks"] == 5 and m["padded_rows"] == 11 + 13
    assert m["padded_weights"] == (11 + 13) * m["bk"]  # one chunk each: 7 / 13 columns fit in one
    t = lay.tensors
    mask2 = mask.reshape(52, -1)
    for rb in range(m["row_blocks"]):
        rows = t["rows"][rb].long()
        real = rows[rows >= 0]
        cols = t["cols"][t["crow"][rb] : t["crow"][rb + 1]].long().flatten()
        support = mask2[real].any(0).nonzero().flatten()
        assert torch.equal(torch.sort(cols[cols >= 0]).values, support)  # gathered-K: exactly the group's columns
        assert bool((mask2[real] == mask2[real[0]]).all())  # a row-block never mixes two groups


def test_zero_rows_and_empty_layers_output_exactly_the_bias():
    layer = LayerInfo("c", "conv2d", (40, 4, 3, 3), has_bias=True, padding=(1, 1))
    mask = group_mask(layer.weight_shape, [(9, 5)], _gen(4))
    zero = ~mask.reshape(40, -1).any(1)
    mod, _, wm, bias = compiled(layer, Selection(mask=mask), 16, seed=5)
    x = torch.randn(3, 4, 5, 5, device=DEVICE)
    y = mod(x)
    assert torch.equal(y[:, zero.to(DEVICE)], bias[zero.to(DEVICE)][None, :, None, None].expand(3, -1, 5, 5))
    assert rel_err(y, F.conv2d(x, wm, bias, 1, 1)) <= 1e-5
    empty, lay, _, bias2 = compiled(layer, Selection(mask=torch.zeros_like(mask)), 32, seed=6)
    assert lay.meta["groups"] == 0 and lay.meta["chunks"] == 0
    assert torch.equal(empty(x), bias2[None, :, None, None].expand(3, 40, 5, 5))


def test_linear_regroup_and_hand_built_groups():
    layer = LayerInfo("fc", "linear", (48, 21), has_bias=True)
    g = _gen(7)
    for sel in (
        regroup_selection(layer.weight_shape, 0.3, g, parts=2, tile=16, min_rows=8),
        Selection(mask=group_mask(layer.weight_shape, [(3, 11), (21, 5), (16, 21)], g)),
    ):
        mod, _, wm, bias = compiled(layer, sel, 16, seed=8)
        for lead in [(1,), (3,), (2, 5)]:
            x = torch.randn(*lead, 21, device=DEVICE)
            assert rel_err(mod(x), F.linear(x, wm, bias)) <= 1e-5


def test_plain_1xn_selection_gives_the_same_function():
    layer = LayerInfo("c", "conv2d", (40, 6, 3, 3), has_bias=True, padding=(1, 1))
    sel = random_block_selection(layer, (16, 1, 3, 3), 0.6, uniform=False, permute=True, generator=_gen(9))
    w = torch.randn(layer.weight_shape)
    assert torch.equal(densify(pack(layer, w, sel, group_rows=True, bm=16)), densify(pack(layer, w, sel)))
    check_conv(layer, sel, 16, seed=9, batches=(3,))


def test_without_group_rows_a_regroup_selection_is_refused_naming_the_fix():
    layer = LayerInfo("c", "conv2d", (48, 6, 3, 3))
    sel = regroup_selection(layer.weight_shape, 0.25, _gen(10), parts=2, tile=16, min_rows=8)
    w = torch.randn(layer.weight_shape)
    hook = TritonBlockLayout().prunekit_transform_layout
    with pytest.raises(LayoutError, match="Selection.block is empty.*set group_rows = true"):
        hook(layer=layer, weight=w, selection=sel, params=TritonBlockLayout.Params())
    lay = hook(layer=layer, weight=w, selection=sel, params=TritonBlockLayout.Params(group_rows=True, bm=16))
    assert lay.meta["bm"] == 16 and torch.equal(densify(lay), w * sel.mask)


@pytest.mark.parametrize("bm", [8, 24, 128])
def test_bm_must_be_a_group_row_block_height(bm):
    with pytest.raises(LayoutError, match=f"bm = {bm} is not a group_rows row-block height; use one of 16, 32, 64"):
        TritonBlockLayout.Params(group_rows=True, bm=bm)
    layer = LayerInfo("fc", "linear", (16, 16))
    with pytest.raises(LayoutError, match="not a group_rows row-block height"):
        pack(layer, torch.randn(16, 16), Selection(mask=torch.eye(16, dtype=torch.bool)), group_rows=True, bm=bm)


LTH_REGROUP = """
[pipelines.t]
schedule = "lth-imp"
score = "lth-l1"
select = "lth-regroup"
layout = "triton-block"
kernel = "triton-block"
[pipelines.t.params]
sparsity = 0.488
rounds = 3
parts = 2
min_rows = 8
tile = 16
group_rows = true
bm = 16
"""


@torch.no_grad()
def test_lth_regroup_pipeline_compiles_to_the_same_function(tmp_path):
    """The registry keys reach the layout: Regroup selections (block = ()) packed and run on every layer."""
    pytest.importorskip("prunekit_lth")
    import copy

    from prunekit.models import ResNetDigits
    from prunekit.pipeline import Pipeline

    (tmp_path / "registry.toml").write_text(LTH_REGROUP)
    torch.manual_seed(0)
    model = ResNetDigits().to(DEVICE).eval()
    pipe = Pipeline.load("t", tmp_path / "registry.toml")
    pipe.attach(model)
    pipe.prune(0.488)
    pipe.finalize()
    reference = copy.deepcopy(model)
    pipe.compile()
    for st in pipe.layers.values():
        assert st.selection.block == () and st.selection.pattern.startswith("regroup")
        assert st.compiled.kernel.startswith("triton-block/") and st.layout.meta["group_rows"]
    x = torch.randn(1, 1, 8, 8, device=DEVICE)  # tiny: the interpreter is slow
    assert rel_err(model(x), reference(x)) <= 1e-5
