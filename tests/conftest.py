"""Host test fixtures: tiny in-test components registered as if installed, and registry files."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import attrs
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit.cli
import prunekit.pipeline
from prunekit import CompiledLayer, Layout, ScheduleDecision, Selection, hookimpl
from prunekit.plugins import ComponentInfo

# --import-mode=importlib puts no test folder on sys.path: the fuzzing tests' shared helpers (fuzzlog.py) live here
sys.path.insert(0, str(Path(__file__).parent))


class Once:
    """Prune to the target at step 0 and never again."""

    @hookimpl
    def prunekit_schedule(self, step, target):
        return ScheduleDecision(step=step, sparsity=target if step == 0 else 0.0, update=step == 0, final=True)


class Ramp:
    """Linear ramp over `length` steps, updating every step."""

    @attrs.define
    class Params:
        length: int = 2

    @hookimpl
    def prunekit_schedule(self, step, target, params):
        t = min(1.0, (step + 1) / params.length)
        return ScheduleDecision(step=step, sparsity=target * t, update=step < params.length, final=step + 1 >= params.length)


class Abs:
    """|w| of the masked weight."""

    @hookimpl
    def prunekit_score(self, weight, mask):
        return weight.abs() if mask is None else weight.abs() * mask


class TopK:
    """Keep the highest scores per layer; optional soft masks."""

    @attrs.define
    class Params:
        soft: bool = False
        decay: float = 0.0

    @hookimpl
    def prunekit_select_mask(self, weight, scores, sparsity, params):
        k = int(round(sparsity * weight.numel()))
        mask = torch.ones(weight.numel(), dtype=torch.bool)
        if k:
            mask[scores.flatten().argsort()[:k]] = False
        return Selection(mask=mask.view_as(weight), perms=(None,) * weight.ndim, block=(1,) * weight.ndim,
                         soft=params.soft, pruned_decay=params.decay)


class DenseLayout:
    """Stores the masked weight as is."""

    @hookimpl
    def prunekit_transform_layout(self, weight, selection):
        w = (weight * selection.mask).contiguous()
        return Layout(format="dense", dense_shape=tuple(w.shape), tensors={"w": w})


class Functional(nn.Module):
    def __init__(self, layer, w, bias):
        super().__init__()
        self.layer, self.w, self.bias = layer, w, bias

    def forward(self, x):
        if self.layer.kind == "linear":
            return F.linear(x, self.w, self.bias)
        return F.conv2d(x, self.w, self.bias, self.layer.stride, self.layer.padding, self.layer.dilation)


class DenseKernel:
    """Runs the stored weight with torch.nn.functional."""

    @hookimpl
    def prunekit_build_kernel(self, layer, layout, bias):
        return CompiledLayer(Functional(layer, layout.tensors["w"], bias), kernel="test-dense")


class WrongBiasKernel:
    """Like DenseKernel but adds 1 to the bias: a kernel that is wrong by a visible amount."""

    @hookimpl
    def prunekit_build_kernel(self, layer, layout, bias):
        wrong = (bias + 1.0) if bias is not None else None
        return CompiledLayer(Functional(layer, layout.tensors["w"], wrong), kernel="test-wrong-bias")


class BlockOnlyLayout:
    """Refuses a selection without a 4-row block shape (as a 1xN layout would)."""

    @hookimpl
    def prunekit_transform_layout(self, layer, weight, selection):
        from prunekit import LayoutError

        if tuple(selection.block[:1]) != (4,):
            raise LayoutError(f"layer {layer.name}: block {selection.block} is not a 4-row block; use a 1x4 select")
        return Layout(format="dense", dense_shape=tuple(weight.shape), tensors={"w": weight * selection.mask})


class Boom:
    """A score component with a bug."""

    @hookimpl
    def prunekit_score(self, weight):
        return weight.undefined_attribute


class Nothing:
    """A score component that forgets to return."""

    @hookimpl
    def prunekit_score(self, weight):
        weight.abs()


class TwoFour:
    """Keeps the 2 largest of every 4 consecutive weights along the input axis; names its pattern."""

    @hookimpl
    def prunekit_select_mask(self, weight, scores):
        s = scores.reshape(-1, 4)
        keep = torch.zeros_like(s, dtype=torch.bool)
        keep.scatter_(1, s.topk(2, dim=1).indices, True)
        return Selection(mask=keep.view_as(weight), block=(1,) * weight.ndim, pattern="2:4")


class Lottery:
    """Snapshot at `rewind_at`, prune at the start of rounds of `length` steps, rewind after each prune."""

    @attrs.define
    class Params:
        rewind_at: int = 1
        length: int = 2

    @hookimpl
    def prunekit_schedule(self, step, target, params):
        first = step % params.length == 0 and step > 0
        return ScheduleDecision(step=step, sparsity=target if first else 0.0, update=first, final=False,
                                rewind=first, snapshot=step == params.rewind_at)


class _EP:
    def __init__(self, obj):
        self.obj = obj

    def load(self):
        return self.obj


FAKES = {
    ("schedule", "once"): Once,
    ("schedule", "ramp"): Ramp,
    ("score", "abs"): Abs,
    ("select", "topk"): TopK,
    ("layout", "dense"): DenseLayout,
    ("kernel", "dense"): DenseKernel,
    ("kernel", "wrong-bias"): WrongBiasKernel,
    ("layout", "block-only"): BlockOnlyLayout,
    ("score", "boom"): Boom,
    ("score", "nothing"): Nothing,
    ("select", "two-four"): TwoFour,
    ("schedule", "lottery"): Lottery,
}


@pytest.fixture
def fake_components(monkeypatch):
    comps = {k: ComponentInfo(k[0], k[1], "prunekit-test", "0", f"tests:{v.__name__}", _EP(v)) for k, v in FAKES.items()}
    monkeypatch.setattr(prunekit.pipeline, "installed_components", lambda: comps)
    monkeypatch.setattr(prunekit.cli, "installed_components", lambda: comps)
    return comps


@pytest.fixture
def write_registry(tmp_path):
    def write(body: str) -> Path:
        p = tmp_path / "registry.toml"
        p.write_text(textwrap.dedent(body))
        return p

    return write


BASIC = """
default = "basic"
[pipelines.basic]
schedule = "once"
score = "abs"
select = "topk"
layout = "dense"
kernel = "dense"
[pipelines.basic.params]
sparsity = 0.5

[pipelines.nokernel]
schedule = "ramp"
score = "abs"
select = "topk"
[pipelines.nokernel.params]
sparsity = 0.6
length = 3

[pipelines.uninstalled]
schedule = "once"
score = "abs"
select = "fancy"
[distributions.prunekit-fancy]
path = "plugins/fancy"
provides = ["select.fancy"]
"""


@pytest.fixture
def basic_registry(write_registry):
    return write_registry(BASIC)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.dw(torch.relu(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return SmallNet()
