"""dense-rows layout and kernel (prunekit_lth.rows): exact against the masked dense layer."""

from __future__ import annotations

import pluggy
import pytest
import torch
import torch.nn.functional as F
from prunekit_lth.refill import channel_scores, refill
from prunekit_lth.rows import FORMAT, RowsKernel, RowsLayout, densify, rule
from torch import nn

import prunekit.hookspecs
from prunekit.errors import LayoutError, PrunekitError
from prunekit.records import LayerInfo, Layout, Selection

TOL = RowsKernel.tolerance


def conv_info(cin=8, cout=12, k=3, stride=1, padding=1, groups=1, bias=True, name="conv") -> LayerInfo:
    return LayerInfo(name=name, kind="conv2d", weight_shape=(cout, cin // groups, k, k), has_bias=bias,
                     stride=(stride, stride), padding=(padding, padding), groups=groups)  # fmt: skip


def row_selection(shape: tuple, keep: torch.Tensor) -> Selection:
    return Selection(mask=keep.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone(), block=(1,) + (0,) * (len(shape) - 1))


def random_keep(cout: int, kept: int, seed: int) -> torch.Tensor:
    keep = torch.zeros(cout, dtype=torch.bool)
    keep[torch.randperm(cout, generator=torch.Generator().manual_seed(seed))[:kept]] = True
    return keep


def compile_rows(layer: LayerInfo, w: torch.Tensor, sel: Selection, bias: torch.Tensor | None, fallback="never"):
    layout = RowsLayout().prunekit_transform_layout(layer=layer, weight=w, selection=sel, params=None)
    return layout, RowsKernel().prunekit_build_kernel(layer=layer, layout=layout, bias=bias, params=RowsKernel.Params(fallback=fallback))


def reference(layer: LayerInfo, x: torch.Tensor, wm: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if layer.kind == "linear":
        return F.linear(x, wm, bias)
    return F.conv2d(x, wm, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert bool(torch.isfinite(y).all())
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def check_layer(layer: LayerInfo, keep: torch.Tensor, inputs, seed=0, fallback="never", expect_kernel="lth-rows"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(layer.weight_shape, generator=g)
    bias = torch.randn(layer.weight_shape[0], generator=g) if layer.has_bias else None
    sel = row_selection(layer.weight_shape, keep)
    wm = w * sel.mask
    layout, compiled = compile_rows(layer, w, sel, bias, fallback)
    assert compiled.kernel == expect_kernel, compiled.reason
    with torch.inference_mode():
        for make in inputs:
            x = make(g)  # fresh random input per call
            y, ref = compiled.module(x), reference(layer, x, wm, bias)
            assert rel_err(y, ref) <= TOL
            removed = ~keep
            if removed.any():  # removed channels hold exactly the bias (or 0)
                cdim = 1 if layer.kind == "conv2d" and x.dim() == 4 else (0 if layer.kind == "conv2d" else -1)
                got = y.movedim(cdim, 0)[removed]
                want = (bias[removed] if bias is not None else torch.zeros(int(removed.sum())))
                assert torch.equal(got, want.view(-1, *([1] * (got.dim() - 1))).expand_as(got))
    return layout, compiled


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_matches_dense(stride, padding, k, bias) -> None:
    layer = conv_info(k=k, stride=stride, padding=padding, bias=bias)
    keep = random_keep(12, 5, seed=stride * 7 + padding * 3 + k)
    inputs = [lambda g, b=b: torch.randn(b, 8, 9, 9, generator=g) for b in (1, 3, 65)]
    check_layer(layer, keep, inputs)


def test_channels_last_and_non_contiguous_inputs() -> None:
    layer = conv_info(k=3, stride=1, padding=1)
    keep = random_keep(12, 7, seed=1)
    inputs = [
        lambda g: torch.randn(3, 8, 10, 10, generator=g).contiguous(memory_format=torch.channels_last),
        lambda g: torch.randn(3, 8, 10, 20, generator=g)[..., ::2],  # strided view
        lambda g: torch.randn(3, 10, 10, 8, generator=g).permute(0, 3, 1, 2),  # permuted
        lambda g: torch.randn(8, 10, 10, generator=g),  # unbatched [C, H, W]
    ]
    _, compiled = check_layer(layer, keep, inputs)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    y = compiled.module(x)
    assert y.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out (like dense)"


@pytest.mark.parametrize("kept", [0, 12])
@pytest.mark.parametrize("fallback", ["never", "auto"])
def test_no_channel_and_every_channel(kept, fallback) -> None:
    layer = conv_info(k=3, stride=2, padding=1)
    keep = random_keep(12, kept, seed=2)
    expect = "dense-fallback" if (kept == 12 and fallback == "auto") else "lth-rows"
    inputs = [lambda g, b=b: torch.randn(b, 8, 9, 9, generator=g) for b in (1, 3)]
    _, compiled = check_layer(layer, keep, inputs, fallback=fallback, expect_kernel=expect)
    if kept == 0:
        assert compiled.module(torch.randn(2, 8, 9, 9)).shape == (2, 12, 5, 5)
        cl = compiled.module(torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last))
        assert cl.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kept", [0, 3, 10, 16])
def test_linear_matches_dense(bias, kept) -> None:
    layer = LayerInfo(name="fc", kind="linear", weight_shape=(16, 20), has_bias=bias)
    inputs = [
        lambda g: torch.randn(5, 20, generator=g),
        lambda g: torch.randn(2, 3, 20, generator=g),
        lambda g: torch.randn(20, generator=g),
        lambda g: torch.randn(65, 40, generator=g)[:, ::2],
    ]
    check_layer(layer, random_keep(16, kept, seed=kept), inputs)


def test_grouped_and_depthwise_convs() -> None:
    inputs = [lambda g, b=b: torch.randn(b, 8, 7, 7, generator=g) for b in (1, 3)]
    # two groups of 6 output channels, 2 kept in each: a thin grouped conv
    keep = torch.zeros(12, dtype=torch.bool)
    keep[[0, 4, 7, 11]] = True
    check_layer(conv_info(groups=2), keep, inputs)
    # the second group empty: only group 0's input channels are read
    keep = torch.zeros(12, dtype=torch.bool)
    keep[[1, 2]] = True
    check_layer(conv_info(groups=2), keep, inputs)
    # depthwise with a few channels kept
    keep = torch.zeros(8, dtype=torch.bool)
    keep[[0, 3, 4]] = True
    check_layer(conv_info(cin=8, cout=8, groups=8), keep, inputs)
    # unequal kept counts per group: exact dense fallback, with the reason
    keep = torch.zeros(12, dtype=torch.bool)
    keep[[0, 1, 7]] = True
    _, compiled = check_layer(conv_info(groups=2), keep, inputs, expect_kernel="dense-fallback")
    assert "unequal" in compiled.reason


def test_layout_tensors_and_densify() -> None:
    layer = conv_info()
    w = torch.randn(layer.weight_shape)
    keep = random_keep(12, 5, seed=3)
    sel = row_selection(layer.weight_shape, keep)
    layout = RowsLayout().prunekit_transform_layout(layer=layer, weight=w, selection=sel, params=None)
    assert layout.format == FORMAT == "dense-rows"
    rows = layout.tensors["rows"]
    assert rows.dtype == torch.int64 and torch.equal(rows, torch.nonzero(keep).flatten())
    assert tuple(layout.tensors["weight"].shape) == (5, 8, 3, 3)
    assert torch.equal(densify(layout), w * sel.mask)
    assert layout.meta["kept"] == 5 and layout.meta["cout"] == 12 and layout.meta["kept_fraction"] == pytest.approx(5 / 12)
    assert layout.nbytes < layout.dense_nbytes


def test_refill_output_feeds_the_layout() -> None:
    layer = conv_info()
    g = torch.Generator().manual_seed(4)
    w = torch.randn(layer.weight_shape, generator=g)
    imp = torch.rand(layer.weight_shape, generator=g) < 0.4
    res = refill(imp.reshape(12, -1), channel_scores("l1", w, imp, None), 0.2)
    sel = Selection(mask=res.mask.reshape(w.shape))
    layout, compiled = compile_rows(layer, w, sel, None)
    assert layout.meta["kept"] == res.k
    x = torch.randn(3, 8, 9, 9, generator=g)
    assert rel_err(compiled.module(x), F.conv2d(x, w * sel.mask, None, 1, 1)) <= TOL


def test_partial_row_mask_is_a_layout_error() -> None:
    layer = conv_info(name="layer3.1.conv2")
    mask = row_selection(layer.weight_shape, random_keep(12, 6, seed=5)).mask
    mask[2, 0, 0, 0] = not bool(mask[2, 0, 0, 0])
    with pytest.raises(LayoutError, match=r"layer3\.1\.conv2: output channel 2 .*pair dense-rows with a refill select"):
        RowsLayout().prunekit_transform_layout(layer=layer, weight=torch.randn(layer.weight_shape), selection=Selection(mask=mask), params=None)


def test_wrong_layout_format_and_shape_are_errors() -> None:
    layer = conv_info(name="conv9")
    other = Layout(format="pack-1xn", dense_shape=layer.weight_shape, tensors={"values": torch.zeros(1)})
    with pytest.raises(LayoutError, match="conv9: layout format 'pack-1xn' is not dense-rows"):
        RowsKernel().prunekit_build_kernel(layer=layer, layout=other, bias=None, params=None)
    w = torch.randn(layer.weight_shape)
    layout = RowsLayout().prunekit_transform_layout(
        layer=layer, weight=w, selection=row_selection(w.shape, random_keep(12, 3, 0)), params=None
    )
    with pytest.raises(LayoutError, match="re-pack"):
        RowsKernel().prunekit_build_kernel(layer=conv_info(cout=10, name="conv9"), layout=layout, bias=None, params=None)
    with pytest.raises(LayoutError, match="do not match"):
        RowsLayout().prunekit_transform_layout(layer=layer, weight=torch.randn(3, 8, 3, 3), selection=Selection(mask=torch.ones(3, 8, 3, 3, dtype=torch.bool)), params=None)


def test_fallback_modes_and_params() -> None:
    layer = conv_info(cin=64, cout=64, name="big")
    keep = random_keep(64, 16, seed=6)
    w = torch.randn(layer.weight_shape)
    sel = row_selection(layer.weight_shape, keep)
    _, always = compile_rows(layer, w, sel, None, fallback="always")
    assert always.kernel == "dense-fallback" and "always" in always.reason
    assert isinstance(always.module, nn.Conv2d) and torch.equal(always.module.weight, w * sel.mask)
    _, auto = compile_rows(layer, w, sel, None, fallback="auto")
    assert auto.kernel == "lth-rows", auto.reason
    thin, why = rule(layer, 64)
    assert not thin and "every output channel" in why
    assert rule(layer, 0)[0]
    with pytest.raises(PrunekitError, match="fallback"):
        RowsKernel.Params(fallback="sometimes")
    with pytest.raises(PrunekitError, match="threshold"):
        RowsKernel.Params(threshold=2.0)
    assert not rule(layer, 40, threshold=0.5)[0] and rule(layer, 30, threshold=0.5)[0]
    assert RowsKernel.tolerance == 1e-5


def test_components_satisfy_the_hook_contract() -> None:
    pm = pluggy.PluginManager(prunekit.hookspecs.PROJECT)
    pm.add_hookspecs(prunekit.hookspecs)
    pm.register(RowsLayout())
    pm.register(RowsKernel())
    layer = conv_info()
    w = torch.randn(layer.weight_shape)
    layout = pm.hook.prunekit_transform_layout(layer=layer, weight=w, selection=row_selection(w.shape, random_keep(12, 4, 1)), params=None)
    compiled = pm.hook.prunekit_build_kernel(layer=layer, layout=layout, bias=None, params=RowsKernel.Params(fallback="never"))
    assert compiled.kernel == "lth-rows"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_dense() -> None:
    layer = conv_info(k=3, stride=2, padding=1)
    w = torch.randn(layer.weight_shape, device="cuda")
    bias = torch.randn(12, device="cuda")
    sel = row_selection(layer.weight_shape, random_keep(12, 5, seed=7))
    sel = Selection(mask=sel.mask.cuda())
    _, compiled = compile_rows(layer, w, sel, bias)
    x = torch.randn(65, 8, 9, 9, device="cuda")
    ref = F.conv2d(x, w * sel.mask, bias, 2, 1)
    assert rel_err(compiled.module(x), ref) <= 1e-4  # TF32 may be on for cuDNN
