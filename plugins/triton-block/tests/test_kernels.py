"""Kernels against F.linear / F.conv2d with the masked dense weight, on the GPU or Triton's CPU interpreter.

Outputs are allocated NaN-filled (poisoned), so an element the kernel forgets to write fails the test.
Error = max|y - ref| / max|ref|. Bounds: IEEE fp32 1e-5 (the brief's bar); TF32 / 3xTF32 5e-3 (TF32 keeps 10
mantissa bits; the interpreter computes every fp32 dot in full fp32, so there it only checks plumbing); fp16
2e-3 and bf16 1.6e-2 (about 4 units of the format's rounding), against an fp64 reference from the same
half-precision inputs. The interpreter's own bf16 tl.dot is broken, so the kernel upcasts bf16 tiles there.
"""

import pytest
import torch
import torch.nn.functional as F
from prunekit_triton import modules
from prunekit_triton.build import TritonBlockKernel
from prunekit_triton.layout import pack
from prunekit_triton.synthetic import random_block_selection

from prunekit.errors import LayoutError
from prunekit.records import LayerInfo, Selection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {"ieee": 1e-5, "tf32": 5e-3, "tf32x3": 5e-3}
HALF_BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def alloc(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(modules, "alloc_output", alloc)


def rel_err(y, ref):
    assert not torch.isnan(y).any(), "an output element was never written"
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def build(layer, block, sparsity=0.6, uniform=True, permute=False, seed=0, dtype=torch.float32, precision="ieee", sel=None):
    g = torch.Generator().manual_seed(seed)
    sel = sel or random_block_selection(layer, block, sparsity, uniform=uniform, permute=permute, generator=g)
    w = torch.randn(layer.weight_shape, generator=g).to(DEVICE, dtype)
    bias = torch.randn(layer.weight_shape[0], generator=g).to(DEVICE, dtype) if layer.has_bias else None
    lay = pack(layer, w, sel)
    compiled = TritonBlockKernel().prunekit_build_kernel(
        layer=layer, layout=lay, bias=bias, params=TritonBlockKernel.Params(precision=precision)
    )
    assert compiled.kernel.startswith("triton-block/"), compiled.reason
    return compiled.module, w * sel.mask.to(DEVICE), bias


LINEAR = [
    # (out, in, block, uniform, permute, leading input dims)   -- odd P everywhere
    (48, 64, (16, 16), True, True, (3, 7)),
    (64, 96, (32, 32), False, True, (13,)),
    (128, 128, (64, 64), True, False, (5,)),
    (40, 37, (4, 1), True, False, (2, 9)),  # 1x4: padded to a 16-row tile; Cout not a multiple of 16
    (48, 40, (8, 1), False, True, (11,)),
    (64, 50, (16, 1), True, True, (7,)),
    (64, 70, (32, 1), False, False, (19,)),
    (72, 40, (24, 8), False, True, (6,)),  # height 24: 32-row tile, rows past 24 masked
    (256, 32, (256, 32), True, False, (5,)),  # taller than a tile: split into row-blocks of 64
]


@pytest.mark.parametrize(("out", "inp", "block", "uniform", "permute", "lead"), LINEAR)
def test_linear_matches_masked_dense(out, inp, block, uniform, permute, lead):
    layer = LayerInfo("fc", "linear", (out, inp), has_bias=True)
    mod, wm, bias = build(layer, block, uniform=uniform, permute=permute)
    x = torch.randn(*lead, inp, device=DEVICE)
    y = mod(x)
    assert y.shape == (*lead, out)
    assert rel_err(y, F.linear(x, wm, bias)) <= BOUND["ieee"]


CONV = [
    # (Cout, Cin, k, block, stride, padding, dilation, uniform, permute, input H, W)
    (32, 12, 3, (16, 1, 3, 3), (1, 1), (1, 1), (1, 1), True, True, (7, 6)),  # 1x16, runs of 9 taps
    (24, 8, 3, (4, 1, 3, 3), (2, 1), (1, 2), (1, 2), False, False, (9, 7)),  # 1x4 padded; stride/pad/dilation
    (32, 8, 3, (32, 1, 1, 1), (1, 2), (0, 1), (1, 1), True, False, (6, 8)),  # finer 1xN: one column per block
    (64, 64, 3, (32, 32, 3, 3), (1, 1), (1, 1), (1, 1), True, True, (5, 5)),  # TETRIS 32 out x 32 in x 3x3
    (64, 32, 1, (16, 16, 1, 1), (2, 2), (0, 0), (1, 1), False, True, (7, 7)),  # b x b on a 1x1 conv, stride 2
    (40, 16, 3, (16, 1, 3, 3), (1, 1), (2, 2), (2, 2), False, True, (6, 5)),  # Cout % 16 != 0
]


@pytest.mark.parametrize(("cout", "cin", "k", "block", "stride", "padding", "dilation", "uniform", "permute", "hw"), CONV)
def test_conv_matches_masked_dense(cout, cin, k, block, stride, padding, dilation, uniform, permute, hw):
    layer = LayerInfo("conv", "conv2d", (cout, cin, k, k), has_bias=True, stride=stride, padding=padding, dilation=dilation)
    mod, wm, bias = build(layer, block, uniform=uniform, permute=permute)
    x = torch.randn(2, cin, *hw, device=DEVICE)
    y = mod(x)
    ref = F.conv2d(x, wm, bias, stride, padding, dilation)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= BOUND["ieee"]


def test_conv_accepts_non_contiguous_input_and_unbatched_input():
    layer = LayerInfo("conv", "conv2d", (32, 8, 3, 3), has_bias=False, padding=(1, 1))
    mod, wm, _ = build(layer, (16, 1, 3, 3))
    x = torch.randn(2, 5, 6, 8, device=DEVICE).permute(0, 3, 1, 2)  # channels-last view
    assert rel_err(mod(x), F.conv2d(x, wm, None, 1, 1)) <= BOUND["ieee"]
    assert rel_err(mod(x[0]), F.conv2d(x[0], wm, None, 1, 1)) <= BOUND["ieee"]


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_fp32_tf32_precisions_within_stated_bound(precision):
    layer = LayerInfo("fc", "linear", (64, 96), has_bias=True)
    mod, wm, bias = build(layer, (32, 32), precision=precision)
    assert mod.precision == precision
    x = torch.randn(9, 96, device=DEVICE)
    assert rel_err(mod(x), F.linear(x.double(), wm.double(), bias.double())) <= BOUND[precision]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_half_precisions_within_stated_bound(dtype, kind):
    if kind == "linear":
        layer = LayerInfo("fc", "linear", (48, 64), has_bias=True)
        mod, wm, bias = build(layer, (16, 1), dtype=dtype, permute=True)
        x = torch.randn(7, 64, device=DEVICE).to(dtype)
        ref = F.linear(x.double(), wm.double(), bias.double())
    else:
        layer = LayerInfo("conv", "conv2d", (32, 16, 3, 3), has_bias=True, padding=(1, 1))
        mod, wm, bias = build(layer, (32, 16, 3, 3), sparsity=0.5, dtype=dtype, permute=True)
        x = torch.randn(2, 16, 5, 4, device=DEVICE).to(dtype)
        ref = F.conv2d(x.double(), wm.double(), bias.double(), 1, 1)
    y = mod(x)
    assert y.dtype == dtype
    assert rel_err(y, ref) <= HALF_BOUND[dtype]


def test_module_to_half_converts_packed_values_and_still_matches():
    layer = LayerInfo("fc", "linear", (32, 48), has_bias=True)
    mod, wm, bias = build(layer, (32, 1))
    mod = mod.to(torch.float16)
    x = torch.randn(5, 48, device=DEVICE).half()
    ref = F.linear(x.double(), wm.half().double(), bias.half().double())
    assert rel_err(mod(x), ref) <= HALF_BOUND[torch.float16]


def test_fully_pruned_rows_and_layers_output_the_bias():
    layer = LayerInfo("fc", "linear", (32, 40), has_bias=True)
    mask = torch.zeros(32, 40, dtype=torch.bool)
    mask[:16, :8] = True  # row-block 1 keeps nothing
    mod, wm, bias = build(layer, (16, 1), sel=Selection(mask=mask, block=(16, 1)))
    x = torch.randn(6, 40, device=DEVICE)
    y = mod(x)
    assert rel_err(y, F.linear(x, wm, bias)) <= BOUND["ieee"]
    assert torch.equal(y[:, 16:], bias[16:].expand(6, 16))
    empty, _, bias2 = build(layer, (16, 1), sel=Selection(mask=torch.zeros(32, 40, dtype=torch.bool), block=(16, 1)))
    assert torch.equal(empty(x), bias2.expand(6, 32))


def test_mismatched_dtype_is_a_layout_error():
    layer = LayerInfo("fc", "linear", (32, 32), has_bias=False)
    mod, _, _ = build(layer, (16, 16))
    with pytest.raises(LayoutError, match=r"input is torch.float16 but the packed weights are torch.float32"):
        mod(torch.randn(4, 32, device=DEVICE).half())
    with pytest.raises(LayoutError, match="not supported"):
        mod(torch.randn(4, 32, device=DEVICE, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_mismatched_device_is_a_layout_error():
    layer = LayerInfo("fc", "linear", (32, 32), has_bias=False)
    mod, _, _ = build(layer, (16, 16))
    with pytest.raises(LayoutError, match="move the module"):
        mod(torch.randn(4, 32))


@pytest.mark.parametrize(
    ("block", "permute", "kmajor"), [((32, 32), False, False), ((32, 32), True, True), ((16, 1), False, True)]
)
def test_linear_gathers_k_major_for_scattered_columns_and_both_paths_agree(block, permute, kmajor):
    layer = LayerInfo("fc", "linear", (64, 96), has_bias=True)
    mod, wm, bias = build(layer, block, permute=permute)
    # scattered columns (1xN, or blocks over permuted input channels) -> K-major copy of the input;
    # b x b blocks in input order keep runs of columns -> the input as it is
    assert mod.kmajor is kmajor
    x = torch.randn(3, 5, 96, device=DEVICE)
    ref = F.linear(x, wm, bias)
    assert rel_err(mod(x), ref) <= BOUND["ieee"]
    mod.kmajor = not kmajor
    assert rel_err(mod(x), ref) <= BOUND["ieee"]
