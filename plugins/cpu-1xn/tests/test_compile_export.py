"""The kernel's ops are torch.library custom ops with fake kernels: the fused model compiles with
torch.compile (inductor, freezing) without graph breaks and exports with torch.export, same answer."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from torch import nn

from prunekit import fusion
from prunekit.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("needs_kernel")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c1 = nn.Conv2d(16, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn0(self.stem(x))))
        y = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.bn2(self.c2(y)) + x)
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def fused(tmp_path):
    pytest.importorskip("prunekit_onexn")
    pytest.importorskip("prunekit_schedules")
    reg = tmp_path / "registry.toml"
    reg.write_text(textwrap.dedent("""
        [pipelines.t]
        schedule = "constant"
        score = "onexn-l1"
        select = "onexn"
        layout = "pack-1xn"
        kernel = "cpu-1xn"
        [pipelines.t.params]
        n = 16
        fallback = "never"
        """))
    torch.manual_seed(0)
    model = _Net().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.bias.data.uniform_(-0.2, 0.2)
    pipe = Pipeline.load("t", reg)
    pipe.attach(model)
    pipe.prune(0.75)
    pipe.finalize()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 29, 31)
    pipe.compile(example=x)
    assert pipe.fusion.fused == {"stem": "bias+relu+maxpool3s2p1", "c1": "bias+relu", "c2": "bias+add+relu"}
    return model, reference, x


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_torch_compile_with_freezing_has_no_graph_break_and_the_same_answer(fused):
    import torch._inductor.config as inductor_config

    model, reference, x = fused
    torch._dynamo.reset()
    with torch.inference_mode():
        want = reference(x)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
        torch._dynamo.reset()
        with inductor_config.patch(freezing=True):
            compiled = torch.compile(model, dynamic=False)
            got = compiled(x)
    assert _err(got, want) <= 1e-5


def test_torch_export_traces_the_custom_ops(fused):
    model, reference, x = fused
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert sum("prunekit_cpu1xn.conv2d" in t for t in targets) == 2
    assert sum("prunekit_cpu1xn.epilogue" in t for t in targets) == 1  # the dense stem's bias + relu + pool
    assert not any("batch_norm" in t or "max_pool" in t for t in targets)
    with torch.inference_mode():
        assert _err(exported.module()(x), reference(x)) <= 1e-5
    assert fusion.installed(model)
