"""Whole torchvision models through a cpu-1xn pipeline with fusion (BN folded, epilogues in the kernel's store):
the same function as the masked dense eager model (BatchNorm unfolded, trained-like statistics) on fresh
inputs of odd sizes, batch 1 and 8, eager and under torch.compile with freezing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from prunekit_cpu1xn.modules import Packed1xN
from prunekit_cpu1xn.testing import rel_err, trained_like_bn
from torch import nn

from prunekit import fusion
from prunekit.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("needs_kernel")
REGISTRY = Path(__file__).resolve().parents[3] / "registry.toml"


def _fused(name: str, sparsity: float, fallback: str) -> tuple[Pipeline, nn.Module, nn.Module]:
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("prunekit_subp")
    pytest.importorskip("prunekit_schedules")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    trained_like_bn(model, 3)
    reference = copy.deepcopy(model)
    pipe = Pipeline.load("subp-1x16-cpu", REGISTRY)
    pipe.host.keep_first_dense = pipe.host.keep_last_dense = True
    if name.startswith("mobilenet"):  # pointwise convs only, as the 1xN paper
        pipe.host.include = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    pipe.component_params["kernel"].fallback = fallback
    pipe.attach(model)
    pipe.prune(sparsity)
    with torch.no_grad():
        for n, st in pipe.layers.items():
            reference.get_submodule(n).weight.mul_(st.selection.mask)
    pipe.compile(example=torch.randn(1, 3, 64, 64))
    return pipe, model, reference


@pytest.mark.parametrize(("name", "sparsity", "fallback"), [("resnet18", 0.9, "never"), ("mobilenet_v2", 0.75, "auto")])
@torch.no_grad()
def test_fused_model_equals_masked_dense_eager(name: str, sparsity: float, fallback: str) -> None:
    pipe, model, reference = _fused(name, sparsity, fallback)
    assert fusion.installed(model) and pipe.fusion.fused and not pipe.fusion.notes
    assert all(ch.startswith("bias") for ch in pipe.fusion.fused.values())  # every BN shift went into a kernel
    packed = sum(isinstance(m, Packed1xN) for m in model.modules())
    assert packed == (len(pipe.layers) if fallback == "never" else packed) and packed > 0
    for shape in [(1, 3, 64, 64), (8, 3, 45, 51), (1, 3, 37, 33)]:
        x = torch.randn(shape)
        assert rel_err(model(x), reference(x)) <= 1e-4, shape


def test_fused_resnet_under_torch_compile_with_freezing() -> None:
    import torch._inductor.config as inductor_config

    _, model, reference = _fused("resnet18", 0.75, "never")
    x = torch.randn(1, 3, 64, 64)
    torch._dynamo.reset()
    with torch.inference_mode(), inductor_config.patch(freezing=True):
        compiled = torch.compile(model, dynamic=False)
        got = compiled(x)
        again = compiled(x + 1)
        assert rel_err(got, reference(x)) <= 1e-4
        assert rel_err(again, reference(x + 1)) <= 1e-4
    torch._dynamo.reset()
