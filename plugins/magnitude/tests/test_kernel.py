"""CSR kernels compute F.linear / F.conv2d of the masked weight; fallback modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from prunekit_magnitude import CsrConv2d, CsrKernel, CsrLayout, CsrLinear, DenseMasked

from prunekit import LayoutError, Selection
from prunekit.records import LayerInfo

# torch calls its CSR tensors "beta" once per process; pytest resets the plugin's import-time filter
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def build(info: LayerInfo, w: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, fallback: str):
    lay = CsrLayout().prunekit_transform_layout(layer=info, weight=w * mask, selection=Selection(mask=mask))
    return CsrKernel().prunekit_build_kernel(layer=info, layout=lay, bias=bias, params=CsrKernel.Params(fallback=fallback))


@pytest.mark.parametrize("fallback", ["never", "always"])
@pytest.mark.parametrize("shape", [(13, 7), (1, 5), (33, 65)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_dense(fallback: str, shape: tuple[int, int], with_bias: bool) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.7
    bias = torch.randn(shape[0], generator=g) if with_bias else None
    compiled = build(LayerInfo("fc", "linear", shape, with_bias), w, mask, bias, fallback)
    assert compiled.kernel == ("csr" if fallback == "never" else "dense-fallback")
    assert isinstance(compiled.module, CsrLinear if fallback == "never" else DenseMasked)
    for b in (1, 2, 3, 4):
        x = torch.randn(b, shape[1], generator=g)
        with torch.no_grad():
            assert rel_err(compiled.module(x), F.linear(x, w * mask, bias)) <= 1e-5
    x3 = torch.randn(2, 3, shape[1], generator=g)  # extra leading dims
    assert rel_err(compiled.module(x3), F.linear(x3, w * mask, bias)) <= 1e-5


CONVS = [
    # (cout, cin, kh, kw), stride, padding, dilation, input hw
    ((6, 3, 3, 3), (1, 1), (1, 1), (1, 1), (9, 11)),
    ((5, 4, 5, 3), (2, 1), (2, 0), (1, 1), (13, 8)),
    ((7, 2, 3, 3), (1, 2), (0, 1), (2, 1), (10, 10)),
    ((3, 1, 1, 1), (1, 1), (0, 0), (1, 1), (4, 5)),
]


@pytest.mark.parametrize("fallback", ["never", "always"])
@pytest.mark.parametrize("case", range(len(CONVS)))
def test_conv_matches_dense(fallback: str, case: int) -> None:
    shape, stride, padding, dilation, hw = CONVS[case]
    g = torch.Generator().manual_seed(case)
    w = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.6
    mask[0] = False  # an empty output channel
    bias = torch.randn(shape[0], generator=g)
    info = LayerInfo("c", "conv2d", shape, True, stride, padding, dilation)
    compiled = build(info, w, mask, bias, fallback)
    assert isinstance(compiled.module, CsrConv2d if fallback == "never" else DenseMasked)
    for b in (1, 2, 3, 4):
        x = torch.randn(b, shape[1], *hw, generator=g)
        ref = F.conv2d(x, w * mask, bias, stride, padding, dilation)
        y = compiled.module(x)
        assert y.shape == ref.shape
        assert rel_err(y, ref) <= 1e-5


def test_all_pruned_layer_outputs_bias() -> None:
    w = torch.randn(4, 6)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    bias = torch.randn(4)
    compiled = build(LayerInfo("fc", "linear", (4, 6), True), w, mask, bias, "never")
    x = torch.randn(3, 6)
    assert torch.equal(compiled.module(x), bias.expand(3, 4))


def test_grouped_conv_falls_back_with_reason() -> None:
    shape = (8, 2, 3, 3)
    w = torch.randn(shape)
    mask = torch.rand(shape) > 0.5
    info = LayerInfo("dw", "conv2d", shape, False, padding=(1, 1), groups=4)
    compiled = build(info, w, mask, None, "never")
    assert compiled.kernel == "dense-fallback" and "groups = 4" in compiled.reason
    x = torch.randn(2, 8, 6, 6)
    assert rel_err(compiled.module(x), F.conv2d(x, w * mask, None, 1, 1, 1, 4)) <= 1e-5


def test_auto_measures_and_explains() -> None:
    shape = (64, 96)
    w = torch.randn(shape)
    mask = torch.rand(shape) > 0.9
    compiled = build(LayerInfo("fc", "linear", shape), w, mask, None, "auto")
    assert compiled.kernel in ("csr", "dense-fallback")
    assert "ms vs dense" in compiled.reason and "break-even" in compiled.reason
    x = torch.randn(2, 96)
    assert rel_err(compiled.module(x), F.linear(x, w * mask)) <= 1e-5


def test_auto_probe_fits_a_kernel_larger_than_probe_hw() -> None:
    shape = (3, 2, 9, 9)
    w = torch.randn(shape)
    mask = torch.rand(shape) > 0.5
    info = LayerInfo("big", "conv2d", shape, False, dilation=(2, 2))
    lay = CsrLayout().prunekit_transform_layout(layer=info, weight=w * mask, selection=Selection(mask=mask))
    compiled = CsrKernel().prunekit_build_kernel(layer=info, layout=lay, bias=None, params=CsrKernel.Params(probe_hw=4))
    x = torch.randn(1, 2, 20, 20)
    assert rel_err(compiled.module(x), F.conv2d(x, w * mask, None, 1, 0, 2)) <= 1e-5


def test_bad_params_and_layout() -> None:
    with pytest.raises(LayoutError, match="fallback"):
        CsrKernel.Params(fallback="sometimes")
    from prunekit import Layout

    with pytest.raises(LayoutError, match="csr layout"):
        CsrKernel().prunekit_build_kernel(layer=LayerInfo("x", "linear", (2, 2)), layout=Layout("bsr", (2, 2), {}), bias=None, params=None)
