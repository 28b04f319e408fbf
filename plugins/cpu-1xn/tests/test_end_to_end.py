"""Whole models: a compiled torchvision ResNet-50, and pipelines with the onexn / subp select plugins."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch
from prunekit_cpu1xn.kernel import Cpu1xN
from prunekit_cpu1xn.layout import Pack1xN
from prunekit_cpu1xn.modules import Packed1xN
from prunekit_cpu1xn.synthetic import random_selection
from prunekit_cpu1xn.testing import rel_err
from torch import nn

from prunekit.pipeline import Pipeline, layer_info

pytestmark = pytest.mark.usefixtures("needs_kernel")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def test_compiled_resnet50_matches_masked_dense() -> None:
    """Every conv but the first pruned 1x16 at 75 % (uniform rows), compiled through the two hooks."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    gen = torch.Generator().manual_seed(1)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]
    pack, kern = Pack1xN(), Cpu1xN()
    compiled = copy.deepcopy(model)
    kernels = set()
    for i, (name, conv) in enumerate(convs):
        info = layer_info(name, conv, i, len(convs))
        sel = random_selection(info, 16, 0.75, permute=i % 2 == 1, generator=gen)
        conv.weight.mul_(sel.mask)  # the reference: masked dense
        layout = pack.prunekit_transform_layout(layer=info, weight=conv.weight, selection=sel, params=None)
        built = kern.prunekit_build_kernel(layer=info, layout=layout, bias=None, params=Cpu1xN.Params())
        kernels.add(built.kernel)
        built.module.poison_output = True
        _replace(compiled, name, built.module)
    assert kernels == {"cpu-1xn/avx512"} or kernels == {"cpu-1xn/avx2"}
    assert sum(isinstance(m, Packed1xN) for m in compiled.modules()) == 52
    for shape in [(1, 3, 64, 64), (2, 3, 45, 51)]:
        x = torch.randn(shape)
        assert rel_err(compiled(x), model(x)) <= 1e-4


def _registry(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "registry.toml"
    path.write_text(textwrap.dedent(body))
    return path


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 24, 3, padding=1)
        self.c2 = nn.Conv2d(24, 40, 3, stride=2, padding=1)  # 40: not a multiple of 16
        self.c3 = nn.Conv2d(40, 64, 1)
        self.c4 = nn.Conv2d(64, 64, 3, padding=2, dilation=2, bias=False)
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.c4(torch.relu(self.c3(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def _run_pipeline(registry: Path, name: str, sparsity: float) -> tuple[Pipeline, nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = _Small().eval()
    pipe = Pipeline.load(name, registry)
    pipe.attach(model)
    pipe.prune(sparsity)
    pipe.finalize()
    reference = copy.deepcopy(model)
    pipe.compile()
    return pipe, reference, model


@pytest.mark.parametrize(
    ("extra", "packed_layers"),
    [
        ('n = 8\nrearrange = true\ncout_policy = "ragged"', {"c2", "c3", "c4", "fc1"}),
        ('n = 16\ngranularity = "tap"\ncout_policy = "skip"', {"c3", "c4", "fc1"}),
    ],
)
@torch.no_grad()
def test_onexn_pipeline_compiles_to_the_same_function(tmp_path: Path, extra: str, packed_layers: set) -> None:
    pytest.importorskip("prunekit_onexn")
    pytest.importorskip("prunekit_schedules")
    reg = _registry(tmp_path, f"""
        [pipelines.t]
        schedule = "constant"
        score = "onexn-l1"
        select = "onexn"
        layout = "pack-1xn"
        kernel = "cpu-1xn"
        [pipelines.t.params]
        fallback = "never"
        {extra}
        """)
    pipe, reference, model = _run_pipeline(reg, "t", 0.75)
    packed = {n for n, st in pipe.layers.items() if st.compiled is not None and st.compiled.kernel.startswith("cpu-1xn/")}
    assert packed == packed_layers
    for name in pipe.layers.keys() - packed:  # left dense: by the select stage (host keeps the layer) or the kernel
        st = pipe.layers[name]
        assert (st.compiled is None and st.selection.dense_reason) or st.compiled.reason
    x = torch.randn(3, 3, 21, 19)
    assert rel_err(model(x), reference(x)) <= 1e-5


@torch.no_grad()
def test_subp_pipeline_uniform_rows_compile_to_the_same_function(tmp_path: Path) -> None:
    pytest.importorskip("prunekit_subp")
    pytest.importorskip("prunekit_schedules")
    reg = _registry(tmp_path, """
        [pipelines.t]
        schedule = "constant"
        score = "subp-l1"
        select = "subp-uniform"
        layout = "pack-1xn"
        kernel = "cpu-1xn"
        [pipelines.t.params]
        n = 8
        cout_policy = "ragged"
        fallback = "never"
        """)
    pipe, reference, model = _run_pipeline(reg, "t", 0.5)
    for st in pipe.layers.values():
        assert st.compiled.kernel.startswith("cpu-1xn/")
        assert st.layout.meta["uniform"] and st.layout.meta["n"] == 8
    x = torch.randn(2, 3, 16, 16)
    assert rel_err(model(x), reference(x)) <= 1e-5


@torch.no_grad()
def test_tetris_pipeline_with_permutations_compiles_to_the_same_function(tmp_path: Path) -> None:
    """TETRIS reorders output and input channels; the packed layers still compute the original layer."""
    pytest.importorskip("prunekit_tetris")
    pytest.importorskip("prunekit_schedules")
    reg = _registry(tmp_path, """
        [pipelines.t]
        schedule = "constant"
        score = "tetris-l1"
        select = "tetris"
        layout = "pack-1xn"
        kernel = "cpu-1xn"
        [pipelines.t.params]
        block = [8, 1, 0, 0]
        include = ["c3", "c4"]
        fallback = "never"
        """)
    pipe, reference, model = _run_pipeline(reg, "t", 0.75)
    for st in pipe.layers.values():
        assert st.compiled.kernel.startswith("cpu-1xn/") and st.layout.meta["n"] == 8
    assert any(st.selection.perm(0) is not None for st in pipe.layers.values())
    x = torch.randn(2, 3, 16, 16)
    assert rel_err(model(x), reference(x)) <= 1e-5
