"""Calibration statistics: what the host computes for components that declare ``needs``, checked
against references computed by hand (im2col by F.unfold, gradients by autograd)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import PrunekitError
from prunekit.calibration import as_calibration, collect, draw_batches, input_column_sq
from prunekit.masking import attach_mask


class ConvShiftInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        y = self.conv(x)
        y.mul_(2.0).add_(0.5)  # in place on the conv output: the statistics must be of the conv's own output
        return self.fc(torch.flatten(torch.tanh(y), 1))


@pytest.mark.parametrize("stride, padding, dilation, k", [(1, 0, 1, 1), (2, 1, 1, 3), (1, 2, 2, 3), (3, 1, 1, 5)])
def test_input_column_sq_equals_unfold(stride, padding, dilation, k):
    conv = nn.Conv2d(3, 4, k, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 3, 11, 9)
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)  # [B, C*k*k, L]
    got, rows = input_column_sq(conv, x)
    torch.testing.assert_close(got.float(), cols.square().sum((0, 2)), rtol=1e-5, atol=1e-6)
    assert rows == cols.shape[0] * cols.shape[2]


def test_output_and_taylor_statistics_match_hand_computation():
    torch.manual_seed(0)
    model = ConvShiftInplace()
    model.train()
    batches = [(torch.randn(3, 2, 8, 8), torch.randint(0, 4, (3,))) for _ in range(2)]
    stats = collect(model, {"conv": model.conv, "fc": model.fc}, as_calibration(batches), {"activations", "grads"})
    # by hand, on a copy in eval mode: outputs before the in-place ReLU, and their gradients
    ref_abs = ref_sq = ref_taylor = 0.0
    twin = ConvShiftInplace()
    twin.load_state_dict(model.state_dict())
    twin.eval()
    for x, y in batches:
        y_conv = twin.conv(x)
        y_conv.retain_grad()
        F.cross_entropy(twin.fc(torch.flatten(torch.tanh(y_conv * 2.0 + 0.5), 1)), y).backward()
        ref_abs = ref_abs + y_conv.detach().abs().sum((0, 2, 3))
        ref_sq = ref_sq + y_conv.detach().square().sum((0, 2, 3))
        ref_taylor = ref_taylor + (y_conv.detach() * y_conv.grad).sum((2, 3)).abs().sum(0)
    s = stats["conv"]
    torch.testing.assert_close(s.output_abs, ref_abs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.output_sq, ref_sq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.output_taylor, ref_taylor, rtol=1e-4, atol=1e-6)
    assert s.samples == 6 and s.batches == 2 and s.grad.shape == model.conv.weight.shape
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # .grad untouched


def test_statistics_leave_batchnorm_running_stats_alone():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    before = model[1].running_mean.clone()
    collect(model, {"0": model[0]}, as_calibration([torch.randn(4, 2, 8, 8) * 5 + 3]), {"activations"})
    assert torch.equal(model[1].running_mean, before)


def test_gradients_are_of_the_effective_masked_weight():
    lin = nn.Linear(3, 2, bias=False)
    attach_mask(lin, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    stats = collect(lin, {"l": lin}, as_calibration([(x, y)]), {"grads"})
    w_eff = lin.weight.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(F.linear(x, w_eff), y), [w_eff])
    torch.testing.assert_close(stats["l"].grad, g)  # nonzero at pruned positions too: it is dL/dW_eff


def test_grads_without_labels_is_an_error_naming_the_fix():
    with pytest.raises(PrunekitError, match=r"pass \(x, y\) batches"):
        collect(nn.Linear(2, 2), {}, as_calibration([torch.randn(2, 2)]), {"grads"})


def test_bad_calibration_batches_are_one_clear_error():
    with pytest.raises(PrunekitError, match="pass tensors x or"):
        as_calibration(["not a tensor"])
    with pytest.raises(PrunekitError, match="empty"):
        as_calibration([])


def test_draw_batches_is_seeded_and_distinct():
    ds = torch.utils.data.TensorDataset(torch.arange(20.0).reshape(20, 1), torch.arange(20))
    a, b, c = draw_batches(ds, 3, 5, 0), draw_batches(ds, 3, 5, 0), draw_batches(ds, 3, 5, 1)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a.batches, b.batches))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a.batches, c.batches))
    drawn = torch.cat([y for _, y in a.batches])
    assert drawn.unique().numel() == 15  # no sample twice while the data lasts


def test_statistics_are_computed_once_per_mask_update(fake_components, write_registry, small_net, monkeypatch):
    import prunekit.pipeline as pl

    calls = []
    real = pl.collect
    monkeypatch.setattr(pl, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))

    class NeedsActs:
        needs = {"activations"}

    from prunekit.pipeline import Pipeline

    path = write_registry('[pipelines.p]\nschedule = "ramp"\nscore = "abs"\nselect = "topk"\n[pipelines.p.params]\nlength = 2\n')
    pipe = Pipeline.load("p", path)
    pipe.components["score"].needs = {"activations"}  # instance attribute: this pipeline's score needs data
    pipe._needs = {s: pipe._declared_needs(s, o) for s, o in pipe.components.items()}
    forwards = []
    small_net.register_forward_pre_hook(lambda m, a: forwards.append(1))
    pipe.attach(small_net, calibration=[torch.randn(2, 3, 8, 8) for _ in range(3)])
    for step in range(4):
        pipe.step(step, total_steps=4)
    assert len(calls) == 2  # the ramp updates masks at steps 0 and 1 only
    assert len(forwards) == 2 * 3  # one pass of the 3 batches per update, not one per layer
