"""prunekit.memory and the memory-lean ONNX Runtime baseline of `prunekit bench` (benches/reliability.py
measures the whole commands' peaks)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from prunekit import baselines
from prunekit.memory import peak_rss_bytes, release


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_is_in_bytes_and_release_runs():
    big = torch.ones(8 << 20)  # 32 MiB, touched: resident now
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    # bytes (KiB would be 1024x too small); the kernel updates the high-water mark lazily, hence 0.9
    assert 0.9 * rss <= peak_rss_bytes() < 64 * rss
    del big
    release()


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    net[1].running_mean.uniform_(-1, 1)  # buffers too must reach the graph, not only the parameters
    net[1].running_var.uniform_(0.5, 2)
    with torch.no_grad():
        net[0].weight[:4] = 0  # pruned rows: the masked dense model's zeros
    return net.eval()


def test_onnxruntime_baseline_with_external_weights_matches_eager():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net, x = _net(), torch.randn(2, 3, 6, 6)
    got = baselines.build(("eager", "onnxruntime"), net, x, threads=1, log=pytest.fail)
    assert set(got) == {"eager", "onnxruntime"}
    with torch.inference_mode():
        ref = net(x)
    out = torch.as_tensor(got["onnxruntime"].run())
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
