"""The fallback rule with the real input size (LayerInfo.input_shape): batch and spatial size decide."""

from __future__ import annotations

import attrs
import torch
from prunekit_cpu1xn.kernel import Cpu1xN, build, decide, time_rule
from prunekit_cpu1xn.layout import pack_1xn
from prunekit_cpu1xn.synthetic import random_selection
from prunekit_cpu1xn.testing import conv_layer


def test_time_rule_is_monotone_in_sparsity_and_sees_the_input():
    layer = conv_layer("L2b", 128, 128, 3)
    speeds = [time_rule(16, 1 - s, layer, (1, 128, 28, 28))[2] for s in (0.2, 0.5, 0.75, 0.9)]
    assert speeds == sorted(speeds)
    assert time_rule(16, 0.25, layer, (1, 128, 28, 28))[0]  # 3x3 at 75 %: packed
    # MobileNetV2's first expansion (K = 16) at 50 %: writing the output costs as much as dense's work
    thin = conv_layer("m112e", 16, 96, 1)
    packed, reason, _ = time_rule(16, 0.5, thin, (1, 16, 112, 112))
    assert not packed and "input (1, 16, 112, 112)" in reason
    # a stride-2 layer pays for its copy: dearer than the same layer at stride 1
    assert time_rule(16, 0.5, conv_layer("S", 256, 512, 1, 2), (8, 256, 56, 56))[2] < time_rule(
        16, 0.5, conv_layer("L", 256, 512, 1, 1), (8, 256, 28, 28))[2]


def test_build_uses_the_input_shape_when_the_host_gives_it():
    gen = torch.Generator().manual_seed(0)
    layer = conv_layer("m112e", 16, 96, 1)
    sel = random_selection(layer, 16, 0.5, generator=gen)
    layout = pack_1xn(layer, torch.randn(layer.weight_shape, generator=gen) * sel.mask, sel)
    assert "tiny layer" in decide(layer, layout, "auto")[1]  # no input size: the shape-only rule
    with_input = attrs.evolve(layer, input_shape=(1, 16, 112, 112))
    built = build(with_input, layout, None, Cpu1xN.Params())
    assert built.kernel == "dense-fallback" and "predicted speed-up" in built.reason
