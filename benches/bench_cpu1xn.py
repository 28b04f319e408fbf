"""pytest-benchmark view of the cpu-1xn kernel (``make bench`` / ``pytest benches/bench_cpu1xn.py --benchmark-only``).

ResNet-50 layer shapes (kernels.md 3.1) at batch 1, 2 threads, 1x16 uniform rows at 75 %: dense F.conv2d on
the same zero-filled weight against the packed layer (activation packing included, weight packing not).
pytest-benchmark runs one benchmark after the other, so for the interleaved protocol and the full table
(batch 1/8, 1/2 threads, N 4/16, sparsity .5/.75/.9, CSR baseline, end-to-end ResNet-50) run
``python benches/cpu1xn_table.py``, which writes benches/results/cpu1xn.md.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from prunekit_cpu1xn.kernel import Cpu1xN, build
from prunekit_cpu1xn.layout import pack_1xn
from prunekit_cpu1xn.synthetic import random_selection
from prunekit_cpu1xn.testing import RESNET50_SHAPES, conv_layer, rel_err

THREADS = 2
SPARSITY = 0.75
N = 16


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _case(shape: tuple) -> tuple:
    sid, cin, cout, k, hw, stride = shape
    layer = conv_layer(sid, cin, cout, k, stride)
    gen = torch.Generator().manual_seed(0)
    sel = random_selection(layer, N, SPARSITY, generator=gen)
    w = torch.randn(layer.weight_shape, generator=gen) * sel.mask
    module = build(layer, pack_1xn(layer, w, sel), None, Cpu1xN.Params(fallback="never")).module
    x = torch.randn(1, cin, hw, hw, generator=gen)
    return layer, w, module, x


@pytest.mark.parametrize("impl", ["dense", "cpu1xn"])
@pytest.mark.parametrize("shape", RESNET50_SHAPES, ids=[s[0] for s in RESNET50_SHAPES])
def test_resnet50_layer(benchmark, shape: tuple, impl: str) -> None:
    layer, w, module, x = _case(shape)
    dense = lambda: F.conv2d(x, w, None, layer.stride, layer.padding)  # noqa: E731
    fn = dense if impl == "dense" else (lambda: module(x))
    benchmark.extra_info.update({"layer": shape[0], "N": N, "sparsity": SPARSITY, "threads": THREADS})
    with torch.inference_mode():
        out = benchmark.pedantic(fn, rounds=30, warmup_rounds=3, iterations=1)
        assert rel_err(out, dense()) <= 1e-5
