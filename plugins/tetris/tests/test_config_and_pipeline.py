"""The reference JSON config (read as is, validated strictly) and the components inside a host Pipeline."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from prunekit_tetris.components import BlockParams, TetrisParams, TetrisSelect
from prunekit_tetris.config import load_config
from torch import nn

import prunekit.pipeline
from prunekit import LayerInfo, PrunekitError, ScheduleDecision, SelectionError, hookimpl
from prunekit.errors import RegistryError
from prunekit.masking import raw_weight
from prunekit.pipeline import Pipeline
from prunekit.plugins import ComponentInfo, installed_components

VGG16_SHAPES = [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 3, 3), (256, 128, 3, 3)] + [
    (256, 256, 3, 3)
] * 2 + [(512, 256, 3, 3)] + [(512, 512, 3, 3)] * 5 + [(4096, 25088), (4096, 4096), (1000, 4096)]


def test_published_config_is_the_reference_table():
    cfg = load_config("published", "vgg16")
    assert len(cfg.block_sizes) == 16
    assert cfg.block_sizes[0] == (8, 0, 0, 0) and cfg.block_sizes[1] == (8, 8, 0, 0) and cfg.block_sizes[13] == (8, 8)
    assert cfg.pruning_rates[0] == 0.42 and cfg.pruning_rates[13] == 0.96 and cfg.pruning_rates[15] == 0.77
    assert load_config("published", "vgg16_bn") == load_config("published", "vgg16_bn")
    assert load_config("published", "alexnet").pruning_rates == (0.16, 0.62, 0.65, 0.63, 0.63, 0.91, 0.91, 0.75)
    for i, shape in enumerate(VGG16_SHAPES):  # every vgg16 entry fits torchvision's layer shapes
        info = LayerInfo(name=f"l{i}", kind="conv2d" if len(shape) == 4 else "linear", weight_shape=shape, index=i, count=16)
        block, rate = cfg.entry(info)
        assert len(block) == len(shape) and 0 <= rate < 1


def info(shape, index=0, count=1, name="features.0"):  # noqa: ANN001, ANN201
    return LayerInfo(name=name, kind="conv2d" if len(shape) == 4 else "linear", weight_shape=shape, index=index, count=count)


def test_config_for_another_architecture_is_one_clear_error():
    cfg = load_config("published", "vgg16")
    with pytest.raises(PrunekitError, match=r"config 'vgg16'.*16 entries but the pipeline selects 7 layers.*another architecture"):
        cfg.entry(info((32, 32, 3, 3), 0, 7, "layer1.conv1"))
    with pytest.raises(SelectionError, match="no architecture 'resnet18'.*alexnet, vgg16, vgg16_bn"):
        TetrisParams(config="published", arch="resnet18")


def test_alexnet_linear_entries_with_four_ints_are_rejected():
    # the published alexnet entry gives [8, 8, 0, 0] for 2-D Linear weights (the reference's zip() truncates)
    cfg = load_config("published", "alexnet")
    with pytest.raises(SelectionError, match=r"entry 5 block_sizes \[8, 8, 0, 0\] has 4 ints but layer classifier.1 \(linear \[4096, 9216\]\) has 2 dims"):
        cfg.entry(info((4096, 9216), 5, 8, "classifier.1"))


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"block_sizes": [[8, 8]], "pruning_rates": [1.0]}, r"entry 0 pruning_rates 1.0 is outside \[0, 1\)"),
        ({"block_sizes": [[8, 8]], "pruning_rates": [-0.1]}, r"entry 0 pruning_rates -0.1 is outside"),
        ({"block_sizes": [[8, -8]], "pruning_rates": [0.5]}, r"entry 0 block_sizes \[8, -8\] must be a list of ints >= 0"),
        ({"block_sizes": [[8, 8]], "pruning_rates": [0.5, 0.5]}, "lists of equal length"),
        ({"block_sizes": [[8, 8]], "pruning_rates": [0.5], "shuffle": True}, "exactly the keys"),
    ],
)
def test_config_validation(tmp_path, entry, message):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"mynet": entry}))
    with pytest.raises(SelectionError, match=message):
        BlockParams(config=str(path), arch="mynet")


def test_config_rates_and_blocks_drive_the_selection(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"two": {"block_sizes": [[4, 0, 0, 0], [8, 4]], "pruning_rates": [0.5, 0.75]}}))
    params = TetrisParams(config=str(path), arch="two")
    w = torch.randn(16, 3, 3, 3)
    sel = TetrisSelect().prunekit_select_mask(layer=info((16, 3, 3, 3), 0, 2), weight=w, scores=w.abs(), sparsity=0.9,
                                              target=0.9, params=params)
    assert sel.block == (4, 3, 3, 3) and sel.meta["pruned_blocks"] == 2 and sel.sparsity == pytest.approx(0.5)
    w = torch.randn(32, 16)
    sel = TetrisSelect().prunekit_select_mask(layer=info((32, 16), 1, 2, "fc"), weight=w, scores=w.abs(), sparsity=0.45,
                                              target=0.9, params=params)
    # a ramping schedule at half the target gets half the configured rate: 0.375 of 16 blocks -> 6
    assert sel.meta["pruned_blocks"] == 6 and sel.meta["config"].endswith("two#1")


# ------------------------------------------------------------------ inside a host pipeline


class Once:
    @hookimpl
    def prunekit_schedule(self, step, target):  # noqa: ANN001, ANN201
        return ScheduleDecision(step=step, sparsity=target if step == 0 else 0.0, update=step == 0, final=True)


class _EP:
    def __init__(self, obj):  # noqa: ANN001
        self.obj = obj

    def load(self):  # noqa: ANN201
        return self.obj


@pytest.fixture
def registry(tmp_path, monkeypatch):
    comps = dict(installed_components())
    comps[("schedule", "once-test")] = ComponentInfo("schedule", "once-test", "test", "0", "tests:Once", _EP(Once))
    monkeypatch.setattr(prunekit.pipeline, "installed_components", lambda: comps)

    def write(select: str, params: str) -> str:
        path = tmp_path / "registry.toml"
        path.write_text(textwrap.dedent(f"""
            [pipelines.t]
            schedule = "once-test"
            score = "tetris-l1"
            select = "{select}"
            [pipelines.t.params]
            """) + textwrap.dedent(params))
        return str(path)

    return write


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):  # noqa: ANN001, ANN201
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("select", ["tetris", "blocks"])
def test_pipeline_masks_conv_and_linear_and_persists_perms(registry, tmp_path, select):
    torch.manual_seed(0)
    net = Net()
    pipe = Pipeline.load("t", registry(select, "sparsity = 0.75\nblock = [8, 8]\n"))
    infos = pipe.attach(net)
    assert [i.name for i in infos] == ["conv2", "fc1"]  # host_defaults: first conv and classifier stay dense
    sels = pipe.prune(0.75)
    for name, mod in (("conv2", net.conv2), ("fc1", net.fc1)):
        sel = sels[name]
        assert sel.sparsity == pytest.approx(0.75)
        # the effective weight is the masked weight: Linear layers honour their masks too
        eff = mod.weight
        assert torch.equal(eff == 0, ~sel.mask | (raw_weight(mod) == 0))
        assert_block_shaped_perm(sel)
        if select == "blocks":
            assert all(p is None for p in sel.perms)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = net(x)
        ref = F.linear(torch.relu(F.linear(_features(net, x), raw_weight(net.fc1) * sels["fc1"].mask, net.fc1.bias)),
                       net.fc2.weight, net.fc2.bias)
    torch.testing.assert_close(out, ref)
    pipe.save(tmp_path / "state.pt")
    again = Pipeline.load("t", registry(select, "sparsity = 0.75\nblock = [8, 8]\n"))
    again.attach(Net())
    again.load_state(tmp_path / "state.pt")
    for name, sel in sels.items():
        got = again.layers[name].selection
        assert torch.equal(got.mask, sel.mask)
        assert all((p is None and q is None) or torch.equal(p, q) for p, q in zip(got.perms, sel.perms))


def _features(net: Net, x: torch.Tensor) -> torch.Tensor:
    x = F.max_pool2d(torch.relu(net.conv1(x)), 2)
    x = F.max_pool2d(torch.relu(F.conv2d(x, raw_weight(net.conv2) * net.conv2.parametrizations.weight[0].mask, net.conv2.bias,
                                         padding=1)), 2)
    return x.flatten(1)


def assert_block_shaped_perm(sel) -> None:  # noqa: ANN001
    m = sel.mask
    for d, p in enumerate(sel.perms):
        if p is not None:
            m = m.index_select(d, p)
    view = []
    for n, b in zip(m.shape, sel.block):
        view += [n // b, b]
    mean = m.reshape(view).float().mean(dim=tuple(range(1, 2 * m.ndim, 2)))
    assert torch.all((mean == 0) | (mean == 1))


def test_pipeline_param_errors_name_the_key(registry):
    with pytest.raises(RegistryError, match="solver"):
        Pipeline.load("t", registry("tetris", 'solver = "hungarian"\n'))
    with pytest.raises(RegistryError, match="unknown parameter.*solver"):
        Pipeline.load("t", registry("blocks", 'solver = "exact"\n'))


def test_pipeline_with_published_config_on_the_wrong_model(registry):
    pipe = Pipeline.load("t", registry("tetris", 'config = "published"\narch = "vgg16"\nkeep_first_dense = false\nkeep_last_dense = false\n'))
    pipe.attach(Net())
    with pytest.raises(PrunekitError, match="16 entries but the pipeline selects 4 layers"):
        pipe.prune(0.5)
