"""Physically sliced export (prunekit_lth.slicing): I.8, the sliced network equals the masked one."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from prunekit_lth.slicing import slice_model
from torch import nn

from prunekit.errors import PrunekitError


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial beta, gamma, running mean and var, so BN(0) = beta - gamma*mu/sigma is not 0 (nor always > 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model.eval()


def masked_by_hand(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, k in keep.items():
            w = mods[name].weight
            w.mul_(k.view(-1, 1, 1, 1).to(w.dtype))
    return ref.eval()


def random_keep(model: nn.Module, names: list[str], frac: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    return {n: torch.rand(mods[n].out_channels, generator=g) < frac for n in names}


def assert_exact(model: nn.Module, sliced: nn.Module, keep: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    ref = masked_by_hand(model, keep)
    with torch.no_grad():
        want, got = ref(x), sliced.eval()(x)
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= 1e-5, f"sliced network differs from the masked one: rel err {err:.2e}"


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = BasicBlock(16, 16, 1)
        self.block2 = BasicBlock(16, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block2(self.block1(self.stem(x)))), 1))


def test_small_resnet_is_exact_and_report_adds_up() -> None:
    torch.manual_seed(0)
    model = randomise_bn(SmallResNet(), seed=1)
    names = ["block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "block2.downsample.0"]
    keep = random_keep(model, names, 0.5, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 16, 16)
    sliced, report = slice_model(model, keep, example=x)
    assert_exact(model, sliced, keep, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "the input model is left unchanged"
    smods = dict(sliced.named_modules())
    for ls in report.layers:
        assert ls.removed == int((~keep[ls.name]).sum())
        assert ls.sliced + ls.kept_for_exactness + ls.kept_for_groups + ls.residual_coupled + ls.unsupported == ls.removed
        assert ls.channels_after == ls.channels_before - ls.sliced == smods[ls.name].out_channels
    # conv1 of a block feeds conv2 through bn1/relu only: sliceable; conv2 / downsample reach the residual add
    for name in ("block1.conv2", "block2.conv2", "block2.downsample.0"):
        assert report.layer(name).residual_coupled == report.layer(name).removed > 0
    c1 = report.layer("block2.conv1")
    assert c1.sliced > 0
    assert smods["block2.bn1"].num_features == c1.channels_after
    assert smods["block2.conv2"].in_channels == c1.channels_after
    # after BN + ReLU a removed channel is max(0, BN(0)); zero-padded 3x3 consumers take only the zeros
    bn, k = model.block2.bn1, keep["block2.conv1"]
    const = torch.relu(bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))
    assert c1.sliced == int((~k & (const == 0)).sum()) and c1.kept_for_exactness == int((~k & (const != 0)).sum())
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    assert c1.macs_after < c1.macs_before and c1.params_after < c1.params_before


def test_torchvision_resnet18_is_exact() -> None:
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.resnet18(weights=None), seed=3)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]
    keep = random_keep(model, names, 0.6, seed=4)
    x = torch.randn(1, 3, 64, 64)
    sliced, report = slice_model(model, keep, example=x)
    assert_exact(model, sliced, keep, x)
    conv1s = [ls for ls in report.layers if ls.name.endswith(".conv1")]
    assert sum(ls.sliced for ls in conv1s) > 0 and sum(ls.kept_for_exactness for ls in conv1s) > 0
    for ls in report.layers:
        if ls.name.endswith(("conv2", "downsample.0")):
            assert ls.sliced == 0 and ls.residual_coupled == ls.removed
    assert report.params_after < report.params_before and report.macs_after < report.macs_before


class VGGish(nn.Module):
    """Convs with biases; a 1x1 (no padding) consumer and a flatten -> Linear consumer exercise the bias fold."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(),  # 0 -> consumer 2: 3x3 zero padding
            nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),  # 2 -> consumer 4: 1x1, no padding
            nn.Conv2d(16, 16, 1), nn.Tanh(), nn.MaxPool2d(2),  # 4 -> consumer 7: 3x3 valid (no padding)
            nn.Conv2d(16, 8, 3), nn.ReLU(), nn.AvgPool2d(2),  # 7 -> flatten (2x2) -> Linear
        )
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(8 * 2 * 2, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def test_vgg_chain_with_biases_folds_constants() -> None:
    torch.manual_seed(5)
    model = VGGish().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.normal_(0, 1)  # removed channels output relu(b) / tanh(b): many non-zero constants
    names = ["features.0", "features.2", "features.4", "features.7"]
    keep = random_keep(model, names, 0.5, seed=6)
    x = torch.randn(4, 3, 12, 12)
    sliced, report = slice_model(model, keep, example=x)
    assert_exact(model, sliced, keep, x)
    r0, r2, r4, r7 = (report.layer(n) for n in names)
    # features.0 -> zero-padded 3x3: only channels with relu(b) == 0 go; the others stay for exactness
    b0 = model.features[0].bias
    assert r0.sliced == int((~keep["features.0"] & (b0 <= 0)).sum()) and r0.folded == 0
    assert r0.kept_for_exactness == int((~keep["features.0"] & (b0 > 0)).sum()) > 0
    # 1x1 and valid 3x3 consumers and the Linear take every removed channel, folding its constant
    for r in (r2, r4, r7):
        assert r.sliced == r.removed > 0 and r.folded > 0
    smods = dict(sliced.named_modules())
    assert smods["classifier.1"].in_features == 4 * r7.channels_after
    assert smods["features.4"].bias is not None


class DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(4, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.pw2 = nn.Conv2d(12, 8, 1, bias=False)
        self.gconv = nn.Conv2d(8, 6, 3, padding=0, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.pw1(x))))))
        return self.gconv(torch.relu(self.pw2(x)))


def test_depthwise_and_grouped_consumers() -> None:
    torch.manual_seed(7)
    model = randomise_bn(DepthwiseNet(), seed=8)
    keep = {"pw1": torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0, 1], dtype=torch.bool),
            "pw2": torch.tensor([1, 0, 0, 0, 1, 1, 0, 1], dtype=torch.bool)}  # fmt: skip
    x = torch.randn(2, 4, 9, 9)
    sliced, report = slice_model(model, keep, example=x)
    assert_exact(model, sliced, keep, x)
    r1, r2 = report.layer("pw1"), report.layer("pw2")
    # through the zero-padded depthwise conv only channels that are 0 after relu(bn1) stay constant
    bn = model.bn1
    c = torch.relu(bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))
    assert r1.sliced == int((~keep["pw1"] & (c == 0)).sum()) > 0
    assert sliced.dw.groups == sliced.dw.in_channels == sliced.dw.out_channels == r1.channels_after
    assert sliced.bn2.num_features == sliced.pw2.in_channels == r1.channels_after
    # grouped consumer (2 groups of 4 inputs): pw2 removes 3 + 1, so each group may lose only 1
    assert r2.sliced == 2 and r2.kept_for_groups == 2
    assert sliced.gconv.in_channels == 6 and sliced.gconv.groups == 2


def test_unsupported_consumers_are_reported_not_sliced() -> None:
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3)
            self.b = nn.Conv2d(3, 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x), self.b(x)], 1)

    model = Cat().eval()
    keep = {"a": torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.bool)}
    sliced, report = slice_model(model, keep)
    assert report.layer("a").unsupported == 3 and "cat" in report.layer("a").reason
    assert sliced.a.out_channels == 6 and report.macs_before is None
    assert_exact(model, sliced, keep, torch.randn(1, 3, 7, 7))


def test_bad_keep_is_a_clear_error() -> None:
    model = SmallResNet().eval()
    with pytest.raises(PrunekitError, match="bool \\[16\\]"):
        slice_model(model, {"block1.conv1": torch.ones(15, dtype=torch.bool)})
    with pytest.raises(PrunekitError, match="Conv2d"):
        slice_model(model, {"fc": torch.ones(10, dtype=torch.bool)})
    with pytest.raises(PrunekitError, match="no such module"):
        slice_model(model, {"nope": torch.ones(3, dtype=torch.bool)})
