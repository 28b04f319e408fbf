"""The packed kernel computes F.conv2d / F.linear of the masked weight, over many random shapes."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from prunekit_cpu1xn.synthetic import random_selection
from prunekit_cpu1xn.testing import compile_layer, reference, rel_err, require_kernel

from prunekit.records import LayerInfo

NS = (2, 4, 8, 16, 32)
ISAS = ("avx512", "avx2") if int(require_kernel().isa()) == 512 else ("avx2",)


def _conv_case(i: int, rnd: random.Random) -> dict:
    k = rnd.choice([1, 1, 3, 3, 2, 5, (1, 3), (3, 1)])
    kh, kw = (k, k) if isinstance(k, int) else k
    stride = rnd.choice([(1, 1), (1, 1), (2, 2), (1, 2), (3, 2)])
    dil = rnd.choice([(1, 1), (1, 1), (1, 1), (2, 2), (2, 1)]) if kh * kw > 1 else (1, 1)
    pad = (rnd.randint(0, (kh - 1) * dil[0]), rnd.randint(0, (kw - 1) * dil[1]))
    h = rnd.randint(max(1, dil[0] * (kh - 1) + 1 - 2 * pad[0]), 23)
    w = rnd.randint(max(1, dil[1] * (kw - 1) + 1 - 2 * pad[1]), 23)
    return dict(
        n=NS[i % len(NS)],
        cout=rnd.randint(1, 75),  # rarely a multiple of N or of a tile
        cin=rnd.randint(1, 37),
        kh=kh, kw=kw, stride=stride, pad=pad, dil=dil, h=h, w=w,
        batch=rnd.randint(1, 8),
        sparsity=rnd.choice([0.0, 0.3, 0.5, 0.75, 0.9, 0.97]),
        runs=rnd.random() < 0.7,
        uniform=rnd.random() < 0.5,
        permute=rnd.random() < 0.6,
        permute_inputs=rnd.random() < 0.3,
        bias=rnd.random() < 0.7,
        isa=ISAS[i % len(ISAS)],
    )  # fmt: skip


CONV_CASES = [_conv_case(i, random.Random(1000 + i)) for i in range(240)]


@pytest.mark.parametrize("chunk", range(8))
def test_conv_matches_dense(chunk: int) -> None:
    """240 random convs (every N, odd sizes, strides, padding, dilation, permutations, both ISAs)."""
    gen = torch.Generator().manual_seed(chunk)
    for case in CONV_CASES[chunk::8]:
        c = dict(case)
        layer = LayerInfo(
            name="conv", kind="conv2d", weight_shape=(c["cout"], c["cin"], c["kh"], c["kw"]), has_bias=c["bias"],
            stride=c["stride"], padding=c["pad"], dilation=c["dil"],
        )  # fmt: skip
        sel = random_selection(
            layer, c["n"], c["sparsity"], runs=c["runs"], uniform=c["uniform"], permute=c["permute"],
            permute_inputs=c["permute_inputs"], generator=gen,
        )  # fmt: skip
        weight = torch.randn(layer.weight_shape, generator=gen)
        bias = torch.randn(c["cout"], generator=gen) if c["bias"] else None
        compiled = compile_layer(layer, weight, sel, bias, isa=c["isa"])
        assert compiled.kernel == f"cpu-1xn/{c['isa']}"
        x = torch.randn(c["batch"], c["cin"], c["h"], c["w"], generator=gen)
        for _ in range(2):  # fresh input each run; outputs poisoned each run
            x = torch.randn_like(x)
            y = compiled.module(x)
            ref = reference(layer, x, weight * sel.mask, bias)
            err = rel_err(y, ref)
            assert err <= 1e-5, (case, err)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("isa", ISAS)
def test_linear_matches_dense(n: int, isa: str) -> None:
    gen = torch.Generator().manual_seed(n)
    rnd = random.Random(n)
    for _ in range(6):
        out_f, in_f = rnd.randint(1, 90), rnd.randint(1, 70)
        layer = LayerInfo(name="fc", kind="linear", weight_shape=(out_f, in_f), has_bias=True)
        sel = random_selection(layer, n, rnd.choice([0.5, 0.75, 0.9]), uniform=rnd.random() < 0.5,
                               permute=rnd.random() < 0.5, generator=gen)  # fmt: skip
        weight, bias = torch.randn(out_f, in_f, generator=gen), torch.randn(out_f, generator=gen)
        compiled = compile_layer(layer, weight, sel, bias, isa=isa)
        for lead in [(1,), (rnd.randint(2, 40),), (3, 5)]:
            x = torch.randn(*lead, in_f, generator=gen)
            assert rel_err(compiled.module(x), F.linear(x, weight * sel.mask, bias)) <= 1e-5


def test_resnet50_layer_shapes() -> None:
    """The benchmark's layer shapes at batch 2 (P-tile tails, block-row splits at real sizes)."""
    gen = torch.Generator().manual_seed(3)
    for cin, cout, k, hw, stride in [(64, 64, 3, 56, 1), (1024, 256, 1, 14, 1), (512, 512, 3, 7, 1),
                                     (256, 512, 1, 56, 2), (128, 128, 3, 56, 2), (512, 2048, 1, 7, 1)]:  # fmt: skip
        layer = LayerInfo(name="r50", kind="conv2d", weight_shape=(cout, cin, k, k), has_bias=False,
                          stride=(stride, stride), padding=(k // 2, k // 2))  # fmt: skip
        for n in (4, 16):
            sel = random_selection(layer, n, 0.75, generator=gen)
            weight = torch.randn(layer.weight_shape, generator=gen)
            compiled = compile_layer(layer, weight, sel, None)
            x = torch.randn(2, cin, hw, hw, generator=gen)
            assert rel_err(compiled.module(x), reference(layer, x, weight * sel.mask, None)) <= 1e-5


def test_thread_count_does_not_change_the_answer() -> None:
    """Each output element is summed in one fixed order whatever the partition: bitwise equal."""
    gen = torch.Generator().manual_seed(5)
    layer = LayerInfo(name="c", kind="conv2d", weight_shape=(96, 40, 3, 3), padding=(1, 1))
    sel = random_selection(layer, 8, 0.6, uniform=False, generator=gen)
    compiled = compile_layer(layer, torch.randn(layer.weight_shape, generator=gen), sel, None)
    x = torch.randn(3, 40, 17, 19, generator=gen)
    torch.set_num_threads(1)
    y1 = compiled.module(x)
    torch.set_num_threads(2)
    y2 = compiled.module(x)
    assert torch.equal(y1, y2)
