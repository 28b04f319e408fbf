"""The kernel component: fallback without GPU/interpreter, clear errors, and a whole pipeline compiled."""

import copy

import attrs
import pytest
import torch
import torch.nn.functional as F
from prunekit_triton.build import TritonBlockKernel
from prunekit_triton.layout import TritonBlockLayout, pack
from prunekit_triton.modules import TritonBlockConv2d, TritonBlockLinear
from prunekit_triton.synthetic import random_block_selection
from torch import nn

import prunekit.pipeline
from prunekit import ScheduleDecision, hookimpl
from prunekit.errors import LayoutError, PrunekitError
from prunekit.pipeline import Pipeline
from prunekit.plugins import ComponentInfo
from prunekit.records import LayerInfo, Layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _packed(layer, block=(16, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    sel = random_block_selection(layer, block, 0.5, generator=g)
    w = torch.randn(layer.weight_shape, generator=g)
    return pack(layer, w, sel), w * sel.mask


@pytest.fixture
def no_gpu_no_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_without_gpu_or_interpreter_build_falls_back_to_dense_with_a_warning(kind, no_gpu_no_interpreter):
    if kind == "linear":
        layer = LayerInfo("fc", "linear", (32, 24), has_bias=True)
        x = torch.randn(5, 24)
    else:
        layer = LayerInfo("conv", "conv2d", (32, 4, 3, 3), has_bias=True, stride=(2, 2), padding=(1, 1))
        x = torch.randn(2, 4, 7, 7)
    lay, wm = _packed(layer, (16, 1) if kind == "linear" else (16, 1, 3, 3))
    bias = torch.randn(32)
    with pytest.warns(RuntimeWarning, match="no CUDA device and TRITON_INTERPRET is not set"):
        out = TritonBlockKernel().prunekit_build_kernel(layer=layer, layout=lay, bias=bias, params=None)
    assert out.kernel == "dense-fallback" and "TRITON_INTERPRET" in out.reason
    ref = F.linear(x, wm, bias) if kind == "linear" else F.conv2d(x, wm, bias, 2, 1)
    assert torch.allclose(out.module(x), ref, rtol=1e-5, atol=1e-5)


def test_triton_module_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    layer = LayerInfo("fc", "linear", (32, 24))
    lay, _ = _packed(layer)
    mod = TritonBlockLinear(layer, lay, None, "ieee", 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(LayoutError, match="set TRITON_INTERPRET=1"):
        mod(torch.randn(3, 24))


def test_build_rejects_foreign_or_mismatched_layouts_and_bias():
    layer = LayerInfo("fc", "linear", (32, 24), has_bias=True)
    lay, _ = _packed(layer)
    k = TritonBlockKernel()
    foreign = Layout(format="csr", dense_shape=(32, 24), tensors={})
    with pytest.raises(LayoutError, match="got a 'csr' layout"):
        k.prunekit_build_kernel(layer=layer, layout=foreign, bias=None, params=None)
    other = LayerInfo("fc2", "linear", (32, 48))
    with pytest.raises(LayoutError, match="re-pack it for this layer"):
        k.prunekit_build_kernel(layer=other, layout=lay, bias=None, params=None)
    with pytest.raises(LayoutError, match="bias is torch.float16"):
        k.prunekit_build_kernel(layer=layer, layout=lay, bias=torch.zeros(32, dtype=torch.float16), params=None)
    dbl = attrs.evolve(lay, tensors={**lay.tensors, "values": lay.tensors["values"].double()})
    with pytest.raises(LayoutError, match="float32, float16 or bfloat16"):
        k.prunekit_build_kernel(layer=layer, layout=dbl, bias=None, params=None)


@pytest.mark.parametrize(("field", "value", "match"), [("precision", "fp32", "precision = 'fp32'"), ("tile_p", 24, "tile_p = 24")])
def test_params_are_validated(field, value, match):
    with pytest.raises(PrunekitError, match=match):
        TritonBlockKernel.Params(**{field: value})


# ------------------------------------------------------------------ a whole pipeline, with in-test selects


class Once:
    @hookimpl
    def prunekit_schedule(self, step, target):
        return ScheduleDecision(step=step, sparsity=target, update=step == 0, final=True)


class Zero:
    @hookimpl
    def prunekit_score(self, weight):
        return torch.zeros_like(weight)


class RandomBlocks:
    """Random permuted block masks: b x b (or TETRIS conv blocks), or 1xN rows."""

    @attrs.define
    class Params:
        rows: int = 16
        cols: int = 16
        uniform: bool = True
        permute: bool = True

    @hookimpl
    def prunekit_select_mask(self, layer, sparsity, params, generator):
        block = (params.rows, params.cols) if layer.kind == "linear" else (params.rows, params.cols, 0, 0)
        return random_block_selection(layer, block, sparsity, uniform=params.uniform, permute=params.permute, generator=generator)


class _EP:
    def __init__(self, obj):
        self.obj = obj

    def load(self):
        return self.obj


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(32 * 3 * 3, 32)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


REGISTRY = """
[pipelines.blocks]
schedule = "once"
score = "zero"
select = "random-blocks"
layout = "triton-block"
kernel = "triton-block"
[pipelines.blocks.params]
sparsity = 0.5
rows = {rows}
cols = {cols}
uniform = {uniform}
precision = "ieee"
"""


@pytest.mark.parametrize(("rows", "cols", "uniform"), [(16, 16, "false"), (16, 1, "true")])
def test_pipeline_compiles_every_layer_to_the_same_function(monkeypatch, tmp_path, rows, cols, uniform):
    fakes = {("schedule", "once"): Once, ("score", "zero"): Zero, ("select", "random-blocks"): RandomBlocks,
             ("layout", "triton-block"): TritonBlockLayout, ("kernel", "triton-block"): TritonBlockKernel}
    comps = {k: ComponentInfo(k[0], k[1], "test", "0", "t", _EP(v)) for k, v in fakes.items()}
    monkeypatch.setattr(prunekit.pipeline, "installed_components", lambda: comps)
    reg = tmp_path / "registry.toml"
    reg.write_text(REGISTRY.format(rows=rows, cols=cols, uniform=uniform))
    torch.manual_seed(0)
    model = Net().eval()
    pipe = Pipeline.load("blocks", reg)
    pipe.attach(model)
    pipe.step(0)
    pipe.finalize()
    dense = copy.deepcopy(model).to(DEVICE)
    x = torch.randn(2, 16, 6, 6, device=DEVICE)
    ref = dense(x)
    states = pipe.compile()
    model.to(DEVICE)  # the Triton modules run on CUDA, or on the CPU interpreter
    assert all(s.compiled.kernel.startswith("triton-block/") for s in states)
    assert isinstance(model.conv1, TritonBlockConv2d) and isinstance(model.fc, TritonBlockLinear)
    assert pipe.sparsity() == pytest.approx(0.5, abs=0.02)
    assert all(s.layout.nbytes < s.layout.dense_nbytes for s in states)
    with torch.no_grad():
        y = model(x)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5
