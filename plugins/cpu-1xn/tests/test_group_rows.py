"""pack-1xn ``group_rows``: rows of identical support packed as 1xN block-rows (Structural-LTH Regroup, method doc
E.3), run by the unchanged kernel and equal to the masked dense layer, bias included.

Outputs are poisoned (NaN-filled by the kernel before it writes), so a channel no slot writes shows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from prunekit_cpu1xn import ext
from prunekit_cpu1xn.kernel import Cpu1xN, build, decide
from prunekit_cpu1xn.layout import Pack1xN, densify, pack_1xn, validate
from prunekit_cpu1xn.synthetic import random_selection
from prunekit_cpu1xn.testing import rel_err

from prunekit.errors import LayoutError
from prunekit.records import LayerInfo, Selection


def _isas() -> tuple[str, ...]:
    """Both paths where the CPU has AVX-512; tests that run the kernel skip via ``needs_kernel`` where it
    cannot be built, the layout-only ones still run."""
    try:
        return ("avx512", "avx2") if int(ext.load().isa()) == 512 else ("avx2",)
    except ext.ExtensionUnavailable:
        return ("avx2",)


ISAS = _isas()
kernel = pytest.mark.usefixtures("needs_kernel")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def imp_like_mask(m: int, k: int, density: float, g: torch.Generator) -> torch.Tensor:
    """Global magnitude mask of a weight with row and column scales (IMP masks are correlated like this)."""
    w = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * torch.rand(1, k, generator=g)
    keep = max(1, round(density * m * k))
    mask = torch.zeros(m * k, dtype=torch.bool)
    mask[w.abs().flatten().topk(keep).indices] = True
    return mask.view(m, k)


def regroup_selection(shape: tuple[int, ...], density: float, g: torch.Generator, **kw) -> Selection:
    """A Selection as RegroupSelect returns it: regrouped mask, each block's rows contiguous in perms[0]."""
    regroup = pytest.importorskip("prunekit_lth.regroup").regroup
    m = shape[0]
    res = regroup(imp_like_mask(m, int(torch.tensor(shape[1:]).prod()), density, g), seed=0, **kw)
    assert res.blocks, "the test mask must give blocks"
    in_blocks = torch.cat([b.rows for b in res.blocks])
    rest = torch.ones(m, dtype=torch.bool)
    rest[in_blocks] = False
    order = torch.cat([in_blocks, rest.nonzero().flatten()])
    perms = (order,) + (None,) * (len(shape) - 1)
    return Selection(mask=res.mask.reshape(shape), perms=perms, block=(), pattern="regroup")


def group_mask(shape: tuple[int, ...], groups: list[tuple[int, int]], g: torch.Generator) -> torch.Tensor:
    """Hand-built groups: ``(rows, cols)`` per group, rows scattered over the layer, the other rows all-zero."""
    m = shape[0]
    k = int(torch.tensor(shape[1:]).prod())
    mask = torch.zeros(m, k, dtype=torch.bool)
    rows = torch.randperm(m, generator=g)
    at = 0
    for r, c in groups:
        cols = torch.randperm(k, generator=g)[:c]
        mask[rows[at : at + r, None], cols[None, :]] = True
        at += r
    return mask.reshape(shape)


def compile_grouped(layer: LayerInfo, weight: torch.Tensor, sel: Selection, bias: torch.Tensor | None, n: int,
                    isa: str = "auto"):  # fmt: skip
    lay = pack_1xn(layer, weight, sel, n=n, group_rows=True)
    compiled = build(layer, lay, bias, Cpu1xN.Params(fallback="never", isa=isa))
    assert compiled.kernel.startswith("cpu-1xn/"), compiled.reason
    compiled.module.poison_output = True  # an element the kernel forgets to write stays NaN
    return compiled.module, lay


def check_conv(layer: LayerInfo, sel: Selection, n: int, batches: tuple[int, ...], hw: int, seed: int,
               isa: str = "auto") -> None:  # fmt: skip
    g = _gen(seed)
    w = torch.randn(layer.weight_shape, generator=g)
    bias = torch.randn(layer.weight_shape[0], generator=g) if layer.has_bias else None
    mod, lay = compile_grouped(layer, w, sel, bias, n, isa)
    wm = w * sel.mask
    assert torch.equal(densify(lay), wm)
    for b in batches:
        x = torch.randn(b, layer.weight_shape[1], hw, hw, generator=g)  # fresh input per batch size
        ref = F.conv2d(x, wm, bias, layer.stride, layer.padding, layer.dilation)
        assert rel_err(mod(x), ref) <= 1e-5, (layer, b)


# (Cout, Cin, k, stride, padding, bias, n, regroup kwargs): 64-128 rows as in resnet-digits
REGROUP_CONVS = [
    (64, 16, 3, 1, 1, True, 16, dict(parts=2, tile=16, min_rows=8)),
    (64, 16, 3, 2, 1, False, 8, dict(parts=2, tile=16, min_rows=8)),
    (96, 24, 1, 1, 0, True, 16, dict(parts=3, tile=16, min_rows=8)),
    (96, 24, 1, 2, 0, False, 32, dict(parts=3, tile=32, min_rows=8)),
    (128, 13, 3, 1, 0, True, 4, dict(parts=4, tile=32, min_rows=16)),  # K = 117: odd block widths
    (80, 11, 3, 2, 1, True, 16, dict(parts=4, tile=16, min_rows=4)),  # K = 99; 4 groups, 32 padding slots
]


@kernel
@pytest.mark.parametrize(("cout", "cin", "k", "stride", "pad", "bias", "n", "kw"), REGROUP_CONVS)
def test_regroup_conv_matches_masked_dense(cout, cin, k, stride, pad, bias, n, kw) -> None:
    layer = LayerInfo(name="c", kind="conv2d", weight_shape=(cout, cin, k, k), has_bias=bias,
                      stride=(stride, stride), padding=(pad, pad))  # fmt: skip
    sel = regroup_selection(layer.weight_shape, 0.25, _gen(cout + cin), **kw)
    for i, isa in enumerate(ISAS):
        check_conv(layer, sel, n, (1, 3, 65), 6, seed=i, isa=isa)


@kernel
def test_regroup_order_does_not_matter_identity_and_random_perms() -> None:
    """Groups are found from the supports; perms[0] only orders them."""
    layer = LayerInfo(name="c", kind="conv2d", weight_shape=(64, 10, 3, 3), has_bias=True, padding=(1, 1))
    sel = regroup_selection(layer.weight_shape, 0.3, _gen(7), parts=2, tile=16, min_rows=8)
    for perm in (None, torch.randperm(64, generator=_gen(8))):
        check_conv(layer, Selection(mask=sel.mask, perms=(perm, None, None, None)), 16, (1, 3), 5, seed=9)


@kernel
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("k", "stride", "pad"), [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0), (3, 2, 0)])
def test_hand_built_groups_with_ragged_sizes_odd_widths_and_zero_rows(k, stride, pad, bias) -> None:
    """Group sizes 5, 19 and 16 (not multiples of N = 8 except one), widths 7, 13 and 1, 12 all-zero rows."""
    layer = LayerInfo(name="c", kind="conv2d", weight_shape=(52, 9, k, k), has_bias=bias, stride=(stride, stride),
                      padding=(pad, pad))  # fmt: skip
    g = _gen(10 * k + stride + pad)
    mask = group_mask(layer.weight_shape, [(5, 7), (19, 13), (16, 1)], g)
    check_conv(layer, Selection(mask=mask), 8, (1, 3, 65), 5, seed=k + stride)


def test_group_meta_counts_groups_padding_and_density_exactly() -> None:
    layer = LayerInfo(name="c", kind="conv2d", weight_shape=(52, 9, 3, 3))
    mask = group_mask(layer.weight_shape, [(5, 7), (19, 13), (16, 1)], _gen(11))
    lay = pack_1xn(layer, torch.randn(layer.weight_shape), Selection(mask=mask), n=8, group_rows=True)
    m = lay.meta
    assert m["group_rows"] and m["groups"] == 3 and m["zero_rows"] == 12
    # block-rows: 5 -> 8 (3 pad), 19 -> 24 (5 pad), 16 -> 16, 12 zero rows -> 16 (4 pad, no work: not counted)
    assert m["block_rows"] == 1 + 3 + 2 + 2 and m["padded_slots"] == 3 + 5
    assert m["padded_weights"] == 3 * 7 + 5 * 13  # zeros multiplied by the padding slots of working groups
    stored = 8 * 7 + 24 * 13 + 16 * 1
    assert m["density"] == pytest.approx(stored / (52 * 81))
    assert m["padding_waste"] == pytest.approx((3 * 7 + 5 * 13) / stored)
    assert not m["uniform"] and not m["runs"]
    rows = lay.tensors["out_rows"]
    assert bool((rows[-16:][:12] >= 0).all()) and bool((rows[-4:] < 0).all())  # zero rows last, then padding
    assert not mask.reshape(52, -1)[rows[-16:-4]].any()
    validate(layer, lay, n=8)


def test_groups_follow_first_appearance_in_perms0_and_rows_keep_their_order() -> None:
    layer = LayerInfo(name="fc", kind="linear", weight_shape=(6, 5))
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[[1, 4], 0] = True  # group A = rows 1, 4
    mask[[0, 3, 5], 2:4] = True  # group B = rows 0, 3, 5; row 2 is all-zero
    perm = torch.tensor([5, 2, 4, 0, 3, 1])
    lay = pack_1xn(layer, torch.randn(6, 5), Selection(mask=mask, perms=(perm, None)), n=2, group_rows=True)
    assert lay.tensors["out_rows"].tolist() == [5, 0, 3, -1, 4, 1, 2, -1]


@kernel
@pytest.mark.parametrize("isa", ISAS)
def test_zero_rows_output_exactly_their_bias_or_zero(isa) -> None:
    layer = LayerInfo(name="c", kind="conv2d", weight_shape=(40, 6, 3, 3), has_bias=True, padding=(1, 1))
    g = _gen(12)
    mask = group_mask(layer.weight_shape, [(9, 5)], g)
    zero = ~mask.reshape(40, -1).any(1)
    w, bias = torch.randn(layer.weight_shape, generator=g), torch.randn(40, generator=g)
    x = torch.randn(3, 6, 7, 7, generator=g)
    for b in (bias, None):
        mod, _ = compile_grouped(layer, w, Selection(mask=mask), b, 16, isa)
        y = mod(x)
        want = (b[zero] if b is not None else torch.zeros(int(zero.sum())))[None, :, None, None].expand(3, -1, 7, 7)
        assert torch.equal(y[:, zero], want)
        assert rel_err(y, F.conv2d(x, w * mask, b, 1, 1)) <= 1e-5
    mod, lay = compile_grouped(layer, w, Selection(mask=torch.zeros_like(mask)), bias, 16, isa)  # nothing kept
    assert lay.meta["groups"] == 0 and lay.meta["density"] == 0.0
    assert torch.equal(mod(x), bias[None, :, None, None].expand(3, 40, 7, 7))


@kernel
@pytest.mark.parametrize("isa", ISAS)
def test_linear_regroup_and_hand_built_groups(isa) -> None:
    g = _gen(13)
    layer = LayerInfo(name="fc", kind="linear", weight_shape=(72, 37), has_bias=True)
    sels = [
        regroup_selection(layer.weight_shape, 0.3, g, parts=2, tile=16, min_rows=8),
        Selection(mask=group_mask(layer.weight_shape, [(3, 11), (21, 5), (32, 37)], g)),
    ]
    for sel in sels:
        w, bias = torch.randn(72, 37, generator=g), torch.randn(72, generator=g)
        mod, lay = compile_grouped(layer, w, sel, bias, 16, isa)
        assert torch.equal(densify(lay), w * sel.mask)
        for lead in [(1,), (3,), (65,), (2, 5)]:  # one position (the GEMV path) and many
            x = torch.randn(*lead, 37, generator=g)
            assert rel_err(mod(x), F.linear(x, w * sel.mask, bias)) <= 1e-5


@kernel
@pytest.mark.parametrize(("cout", "n", "runs", "permute"), [(64, 16, True, True), (40, 16, False, True), (36, 4, True, False)])
def test_plain_1xn_selection_gives_the_same_function(cout, n, runs, permute) -> None:
    layer = LayerInfo(name="c", kind="conv2d", weight_shape=(cout, 12, 3, 3), has_bias=True, padding=(1, 1))
    g = _gen(cout + n)
    sel = random_selection(layer, n, 0.7, runs=runs, uniform=False, permute=permute, generator=g)
    w = torch.randn(layer.weight_shape, generator=g)
    grouped = pack_1xn(layer, w, sel, n=n, group_rows=True)
    plain = pack_1xn(layer, w, sel)
    assert torch.equal(densify(grouped), densify(plain))
    assert grouped.meta["runs"] == plain.meta["runs"]
    assert grouped.meta["padded_weights"] == plain.meta["padded_weights"]  # no padding beyond a ragged last row
    check_conv(layer, sel, n, (1, 3), 6, seed=cout)


def test_without_group_rows_a_regroup_selection_is_refused_naming_the_fix() -> None:
    layer = LayerInfo(name="c", kind="conv2d", weight_shape=(64, 16, 3, 3))
    sel = regroup_selection(layer.weight_shape, 0.25, _gen(14), parts=2, tile=16, min_rows=8)
    w = torch.randn(layer.weight_shape)
    with pytest.raises(LayoutError, match="no block shape.*set group_rows = true"):
        Pack1xN().prunekit_transform_layout(layer=layer, weight=w, selection=sel, params=Pack1xN.Params(n=16))
    claimed = Selection(mask=sel.mask, perms=sel.perms, block=(16, 1, 1, 1))  # regroup blocks are not 1x16 here
    with pytest.raises(LayoutError, match="not constant over blocks of N = 16.*set group_rows = true"):
        pack_1xn(layer, w, claimed)
    lay = Pack1xN().prunekit_transform_layout(
        layer=layer, weight=w, selection=sel, params=Pack1xN.Params(n=16, group_rows=True)
    )
    assert lay.meta["group_rows"] and torch.equal(densify(lay), w * sel.mask)


def test_group_rows_needs_n() -> None:
    with pytest.raises(LayoutError, match="group_rows = true needs n"):
        Pack1xN.Params(group_rows=True)
    layer = LayerInfo(name="fc", kind="linear", weight_shape=(8, 8))
    sel = Selection(mask=torch.eye(8, dtype=torch.bool))
    with pytest.raises(LayoutError, match="group_rows = true needs the block height"):
        pack_1xn(layer, torch.randn(8, 8), sel, group_rows=True)
    with pytest.raises(LayoutError, match="N = 3 is not a supported block height"):
        pack_1xn(layer, torch.randn(8, 8), sel, n=3, group_rows=True)


def test_density_counts_padding_so_the_fallback_rule_stays_honest() -> None:
    """Unstructured rows are groups of one: padded to N = 16 the packed work is ~16x the mask's; keep dense."""
    layer = LayerInfo(name="c", kind="conv2d", weight_shape=(128, 64, 3, 3))
    mask = torch.rand(layer.weight_shape, generator=_gen(15)) < 0.25
    lay = pack_1xn(layer, torch.randn(layer.weight_shape), Selection(mask=mask), n=16, group_rows=True)
    assert lay.meta["groups"] == 128 and lay.meta["padded_slots"] == 128 * 15
    assert lay.meta["density"] == pytest.approx(16 * int(mask.sum()) / mask.numel())  # ~4: slower than dense
    packed, reason = decide(layer, lay, "auto")
    assert not packed and "predicted speed-up" in reason
    grouped = group_mask(layer.weight_shape, [(64, 96), (64, 96)], _gen(16))  # 16.7 % density, no padding
    lay2 = pack_1xn(layer, torch.randn(layer.weight_shape), Selection(mask=grouped), n=16, group_rows=True)
    assert lay2.meta["padded_slots"] == 0 and decide(layer, lay2, "auto")[0]


LTH_REGROUP = """
[pipelines.t]
schedule = "lth-imp"
score = "lth-l1"
select = "lth-regroup"
layout = "pack-1xn"
kernel = "cpu-1xn"
[pipelines.t.params]
sparsity = 0.488
rounds = 3
parts = 2
min_rows = 8
tile = 16
n = 8
group_rows = true
fallback = "never"
"""


@kernel
@torch.no_grad()
def test_lth_regroup_pipeline_compiles_to_the_same_function(tmp_path) -> None:
    """The registry keys reach the layout: Regroup selections (block = ()) packed and run on every layer."""
    pytest.importorskip("prunekit_lth")
    import copy

    from prunekit.models import ResNetDigits
    from prunekit.pipeline import Pipeline

    (tmp_path / "registry.toml").write_text(LTH_REGROUP)
    torch.manual_seed(0)
    model = ResNetDigits().eval()
    pipe = Pipeline.load("t", tmp_path / "registry.toml")
    pipe.attach(model)
    pipe.prune(0.488)
    pipe.finalize()
    reference = copy.deepcopy(model)
    pipe.compile()
    for st in pipe.layers.values():
        assert st.selection.block == () and st.selection.pattern.startswith("regroup")
        assert st.compiled.kernel.startswith("cpu-1xn/") and st.layout.meta["group_rows"]
        st.compiled.module.poison_output = True
    x = torch.randn(3, 1, 16, 16)
    assert rel_err(model(x), reference(x)) <= 1e-5
