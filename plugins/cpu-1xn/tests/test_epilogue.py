"""Fused epilogues (prunekit.fusion chains) computed in the kernel's store, against the torch reference."""

from __future__ import annotations

import random

import pytest
import torch
from prunekit_cpu1xn.kernel import Cpu1xN, build
from prunekit_cpu1xn.layout import pack_1xn
from prunekit_cpu1xn.synthetic import random_selection
from prunekit_cpu1xn.testing import reference, rel_err, require_kernel

from prunekit.fusion import apply_epilogue, every_chain, parse_epilogue
from prunekit.records import LayerInfo

ISAS = ("avx512", "avx2") if int(require_kernel().isa()) == 512 else ("avx2",)
CHAINS = ["bias", "add", "relu", "relu6", "bias+relu", "bias+add+relu", "add+relu6", "bias+add",
          "bias+relu+maxpool3s2p1", "relu+maxpool2s2p0", "maxpool3s1p1", "bias+add+relu+maxpool3s2p1"]  # fmt: skip


def _case(i: int) -> dict:
    rnd = random.Random(500 + i)
    k = rnd.choice([1, 3, 3, 5])
    stride = rnd.choice([1, 1, 2])
    return dict(
        n=rnd.choice([4, 8, 16, 32]), cout=rnd.randint(3, 70), cin=rnd.randint(1, 40), k=k, stride=stride,
        pad=rnd.choice([k // 2, k // 2, 0]), h=rnd.randint(k + 2, 20), w=rnd.randint(k + 2, 21), batch=rnd.randint(1, 3),
        sparsity=rnd.choice([0.0, 0.5, 0.9]), runs=rnd.random() < 0.7, permute=rnd.random() < 0.5,
        bias=rnd.random() < 0.5, chain=CHAINS[i % len(CHAINS)], isa=ISAS[i % len(ISAS)],
    )  # fmt: skip


@pytest.mark.parametrize("i", range(36))
def test_fused_conv_matches_conv_then_epilogue(i: int) -> None:
    c = _case(i)
    gen = torch.Generator().manual_seed(i)
    layer = LayerInfo(
        name="conv", kind="conv2d", weight_shape=(c["cout"], c["cin"], c["k"], c["k"]), has_bias=c["bias"],
        stride=(c["stride"],) * 2, padding=(c["pad"],) * 2, epilogue=c["chain"],
    )  # fmt: skip
    sel = random_selection(layer, c["n"], c["sparsity"], runs=c["runs"], permute=c["permute"], generator=gen)
    w = torch.randn(layer.weight_shape, generator=gen)
    b = torch.randn(c["cout"], generator=gen) if c["bias"] else None
    built = build(layer, pack_1xn(layer, w, sel), b, Cpu1xN.Params(fallback="never", isa=c["isa"]))
    assert built.fused is not None and built.kernel == f"cpu-1xn/{c['isa']}"
    built.module.poison_output = True
    ep = parse_epilogue(c["chain"])
    x = torch.randn(c["batch"], c["cin"], c["h"], c["w"], generator=gen)
    y0 = reference(layer, x, w * sel.mask, b)
    args = []
    if ep.bias:
        args.append(torch.randn(c["cout"], generator=gen))
    if ep.add:
        args.append(torch.randn(y0.shape, generator=gen))
    with torch.inference_mode():
        got = built.fused(x, *args)
        assert rel_err(built.module(x), y0) <= 1e-5  # the plain module is still the layer alone
    assert rel_err(got, apply_epilogue(y0, ep, *args)) <= 1e-5, c


@pytest.mark.parametrize("chain", ["bias+relu+maxpool3s2p1", "bias+add+relu6", "add+relu+maxpool2s2p1", "bias"])
def test_dense_layer_gets_a_one_pass_epilogue(chain: str) -> None:
    """A layer kept dense (here: dense layout) with an epilogue: F.conv2d, then the epilogue op in one pass."""
    gen = torch.Generator().manual_seed(3)
    layer = LayerInfo(name="stem", kind="conv2d", weight_shape=(24, 3, 7, 7), stride=(2, 2), padding=(3, 3), epilogue=chain)
    from prunekit.records import Selection

    w = torch.randn(layer.weight_shape, generator=gen)
    sel = Selection(mask=torch.ones_like(w, dtype=torch.bool), dense_reason="first conv (keep_first_dense)")
    built = build(layer, pack_1xn(layer, w, sel), None, Cpu1xN.Params())
    assert built.kernel == "dense-fallback" and built.fused is not None
    x = torch.randn(2, 3, 33, 30, generator=gen)
    y0 = reference(layer, x, w, None)
    ep = parse_epilogue(chain)
    args = ([torch.randn(24, generator=gen)] if ep.bias else []) + ([torch.randn(y0.shape, generator=gen)] if ep.add else [])
    with torch.inference_mode():
        assert rel_err(built.fused(x, *args), apply_epilogue(y0, ep, *args)) <= 1e-5


def test_fused_module_falls_back_where_the_kernel_cannot_take_the_call() -> None:
    gen = torch.Generator().manual_seed(4)
    layer = LayerInfo(name="c", kind="conv2d", weight_shape=(16, 8, 3, 3), padding=(1, 1), epilogue="bias+add+relu")
    sel = random_selection(layer, 16, 0.5, generator=gen)
    w = torch.randn(layer.weight_shape, generator=gen)
    built = build(layer, pack_1xn(layer, w, sel), None, Cpu1xN.Params(fallback="never"))
    x = torch.randn(1, 8, 6, 6, generator=gen)
    shift = torch.randn(16, generator=gen)
    y0 = reference(layer, x, w * sel.mask, None)
    for residual in (torch.randn(1, 16, 1, 1, generator=gen), torch.randn(y0.shape, generator=gen).to(torch.float64)):
        with torch.inference_mode():  # broadcast residual, float64 residual: computed in torch, same answer
            got = built.fused(x, shift, residual)
        assert rel_err(got, apply_epilogue(y0, "bias+add+relu", shift, residual).to(got.dtype)) <= 1e-5


def test_every_chain_is_in_the_declared_set() -> None:
    assert Cpu1xN.epilogues == every_chain()
    assert "bias+add+relu" in Cpu1xN.epilogues and "bias+relu+maxpool*" in Cpu1xN.epilogues
