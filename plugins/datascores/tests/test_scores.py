"""Wanda and Taylor against references computed by hand in the test (im2col by F.unfold, gradients by
autograd on a copy), through the real host: calibration statistics, pipeline, select."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import SelectionError
from prunekit.pipeline import Pipeline

REGISTRY = """
[pipelines.w]
schedule = "once-test"
score = "{score}"
select = "threshold"
[pipelines.w.params]
sparsity = 0.5
{extra}
"""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=2, dilation=2, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)]


@pytest.fixture
def make(tmp_path: Path):
    from prunekit import hookimpl
    from prunekit.plugins import register_component, unregister_component
    from prunekit.records import ScheduleDecision

    class Once:
        @hookimpl
        def prunekit_schedule(self, step, target):  # noqa: ANN001, ANN201
            return ScheduleDecision(step=step, sparsity=target, update=step == 0, final=True)

    register_component("schedule", "once-test", Once, "tests")

    def build(score: str, extra: str = "") -> Pipeline:
        reg = tmp_path / "registry.toml"
        reg.write_text(REGISTRY.format(score=score, extra=extra))
        return Pipeline.load("w", reg)

    yield build
    unregister_component("schedule", "once-test")


def _inputs_by_hand(model: Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        a = torch.relu(model.conv(x))
        b = torch.relu(model.conv2(a))
    return {"conv": x, "conv2": a, "fc": torch.flatten(b, 1)}


def _column_norms_by_hand(model: Net, batches) -> dict[str, torch.Tensor]:
    sq = {"conv": 0.0, "conv2": 0.0, "fc": 0.0}
    for x, _ in batches:
        ins = _inputs_by_hand(model, x)
        for name in ("conv", "conv2"):
            m = getattr(model, name)
            cols = F.unfold(ins[name], m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            sq[name] = sq[name] + cols.double().square().sum((0, 2))  # [Cin*kh*kw], (cin, kh, kw) order
        sq["fc"] = sq["fc"] + ins["fc"].double().square().sum(0)
    return {n: v.sqrt().float() for n, v in sq.items()}


def test_wanda_is_weight_times_input_column_norm(make, batches):
    torch.manual_seed(0)
    model = Net()
    expected = {n: getattr(model, n).weight.detach().abs() * norm.reshape(1, *getattr(model, n).weight.shape[1:])
                for n, norm in _column_norms_by_hand(model, batches).items()}  # fmt: skip
    pipe = make("wanda")
    pipe.attach(model, calibration=batches)
    stats = pipe._stats()
    for name, st in pipe.layers.items():
        score = pipe._call("score", name, layer=st.info, weight=st.module.parametrizations.weight.original.detach(),
                           mask=None, params=None, generator=torch.Generator(), stats=stats[name])  # fmt: skip
        torch.testing.assert_close(score, expected[name], rtol=1e-5, atol=1e-6)
    # the select then prunes the lowest-scoring half of each layer
    pipe.step(0)
    for name, st in pipe.layers.items():
        s, m = expected[name].flatten(), st.selection.mask.flatten()
        assert m.float().mean() == pytest.approx(0.5, abs=1.0 / s.numel())
        assert s[m].min() >= s[~m].max()


def test_wanda_differs_from_magnitude_when_inputs_differ_in_scale(make):
    torch.manual_seed(0)
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    x = torch.ones(8, 4) * torch.tensor([10.0, 1.0, 1.0, 0.1])  # feature 0 is loud, feature 3 quiet
    pipe = make("wanda")
    model = nn.Sequential(lin)
    pipe.attach(model, calibration=[x])
    pipe.step(0)
    kept = pipe.layers["0"].selection.mask
    # magnitude would keep columns 2-3 of row 0; wanda keeps the loud column 0 and drops the quiet one
    assert kept[0].tolist() == [True, False, True, False] and kept[1].tolist() == [True, True, False, False]


def _grads_by_hand(model: Net, batches) -> dict[str, torch.Tensor]:
    twin = copy.deepcopy(model).eval()
    total = {n: torch.zeros_like(getattr(twin, n).weight) for n in ("conv", "conv2", "fc")}
    sq = {n: torch.zeros_like(t) for n, t in total.items()}
    for x, y in batches:
        ws = [getattr(twin, n).weight for n in total]
        gs = torch.autograd.grad(F.cross_entropy(twin(x), y), ws)
        for n, g in zip(total, gs):
            total[n] += g
            sq[n] += g.square()
    return total, sq


@pytest.mark.parametrize("mode", ["first-order", "fisher"])
def test_taylor_matches_autograd_by_hand(make, batches, mode):
    torch.manual_seed(1)
    model = Net()
    grad, grad_sq = _grads_by_hand(model, batches)
    pipe = make("taylor", f'mode = "{mode}"')
    pipe.attach(model, calibration=batches)
    stats = pipe._stats()
    for name, st in pipe.layers.items():
        w = getattr(model, name).parametrizations.weight.original.detach()
        want = (w * grad[name]).abs() if mode == "first-order" else w.square() * grad_sq[name]
        got = pipe._call("score", name, layer=st.info, weight=w, mask=None, params=pipe.component_params["score"],
                         generator=torch.Generator(), stats=stats[name])  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # collecting statistics leaves the parameters' .grad and the model's mode alone
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_taylor_uses_the_masked_weight_after_a_prune(make, batches):
    torch.manual_seed(2)
    model = Net()
    pipe = make("taylor")
    pipe.attach(model, calibration=batches)
    pipe.step(0)
    st = pipe.layers["conv"]
    mask = st.selection.mask
    stats = pipe._stats()
    score = pipe._call("score", "conv", layer=st.info, weight=st.module.parametrizations.weight.original.detach(),
                       mask=mask, params=pipe.component_params["score"], generator=torch.Generator(), stats=stats["conv"])  # fmt: skip
    assert torch.all(score[~mask] == 0) and torch.any(score[mask] > 0)


def test_taylor_without_labels_is_one_clear_error(make):
    pipe = make("taylor")
    with pytest.raises(Exception, match="needs gradients, which need labels"):
        pipe.attach(Net(), calibration=[torch.randn(2, 3, 8, 8)])


def test_missing_calibration_is_one_clear_error(make):
    pipe = make("wanda")
    pipe.attach(Net())
    with pytest.raises(Exception, match="needs calibration data .*set_calibration"):
        pipe.step(0)


def test_score_called_without_stats_names_the_fix():
    from prunekit_datascores import wanda_scores

    from prunekit.records import LayerInfo

    info = LayerInfo("fc", "linear", (2, 3))
    with pytest.raises(SelectionError, match="set_calibration"):
        wanda_scores(info, torch.ones(2, 3), None, None)


def test_grouped_conv_column_norms_follow_their_group():
    from prunekit_datascores.scores import column_norms

    from prunekit.records import LayerInfo

    info = LayerInfo("dw", "conv2d", (4, 1, 1, 1), groups=2)
    norms = column_norms(info, torch.tensor([1.0, 4.0]))  # group 0 reads channel 0, group 1 channel 1
    assert norms.flatten().tolist() == [1.0, 1.0, 2.0, 2.0]
