"""prunekit.fusion: BatchNorm folding, epilogue discovery with torch.fx, the rewritten forward, and the
kernel contract around it (LayerInfo.epilogue, CompiledLayer.fused, the `epilogues` attribute)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import CompiledLayer, fusion, hookimpl
from prunekit.fusion import Epilogue, apply_epilogue, parse_epilogue
from prunekit.pipeline import Pipeline
from prunekit.plugins import ComponentInfo


class Block(nn.Module):
    """A ResNet basic block with a downsample branch, sharing one ReLU module (as torchvision does)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        return self.relu(out)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.block = Block(8, 16, 2)
        self.head = nn.Conv2d(16, 16, 1, bias=True)  # conv with its own bias, then BN, then ReLU6
        self.bnh = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn(self.stem(x))))
        x = self.block(x)
        x = F.relu6(self.bnh(self.head(x)))
        return self.fc(x.mean((2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    for m in net.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return net.eval()


X = torch.randn(2, 3, 19, 17, generator=torch.Generator().manual_seed(1))


def test_chain_vocabulary_parses_orders_and_prefixes():
    ep = parse_epilogue("bias+add+relu+maxpool3s2p1")
    assert (ep.bias, ep.add, ep.act, ep.pool) == (True, True, "relu", (3, 2, 1))
    assert ep.chain == "bias+add+relu+maxpool3s2p1" and ep.tensors == ("bias", "residual")
    assert [p.chain for p in ep.prefixes()] == ["bias+add+relu+maxpool3s2p1", "bias+add+relu", "bias+add", "bias"]
    assert fusion.generic(ep.chain) == "bias+add+relu+maxpool*" and fusion.generic(ep.chain) in fusion.every_chain()
    for bad in ("relu+bias", "add+add", "gelu", "maxpool2s1p2"):
        with pytest.raises(ValueError):
            parse_epilogue(bad)
    assert fusion.best_supported(ep, frozenset({"bias", "bias+add"})).chain == "bias+add"
    assert fusion.best_supported(ep, frozenset({"relu"})) == Epilogue()


def test_apply_epilogue_is_the_ops_in_order():
    y, s, r = torch.randn(2, 4, 6, 6), torch.randn(4), torch.randn(2, 4, 6, 6)
    want = F.max_pool2d(torch.clamp(y + s.view(1, -1, 1, 1) + r, 0, 6), 3, 2, 1)
    assert torch.equal(apply_epilogue(y, "bias+add+relu6+maxpool3s2p1", s, r), want)


@torch.no_grad()
def test_folding_keeps_the_function_the_keys_and_is_idempotent():
    net = _net()
    ref = copy.deepcopy(net)
    keys = set(net.state_dict())
    gm, why = fusion.trace(net)
    assert gm is not None, why
    folded = fusion.fold_batchnorm(net, gm)
    assert folded == {"bn": "stem", "block.bn1": "block.conv1", "block.bn2": "block.conv2",
                      "block.down.1": "block.down.0", "bnh": "head"}  # fmt: skip
    assert set(net.state_dict()) == keys
    assert (net(X) - ref(X)).abs().max() <= 1e-5 * ref(X).abs().max()
    assert fusion.is_folded(net.bn) and bool((net.bnh.bias == 0).all())  # the shift went into head's own bias
    w = net.stem.weight.clone()
    fusion.fold_batchnorm(net, gm)  # a second fold changes nothing
    assert torch.equal(net.stem.weight, w)


@torch.no_grad()
def test_training_mode_batchnorm_is_not_folded():
    net = _net().train()
    gm, _ = fusion.trace(net)
    assert fusion.fold_batchnorm(net, gm) == {}


def test_sites_find_each_convs_chain_and_give_a_shared_add_to_its_first_operand():
    net = _net()
    fplan, why = fusion.plan(net)
    assert fplan is not None, why
    chains = {name: s.epilogue.chain for name, s in fplan.sites.items()}
    assert chains == {
        "stem": "bias+relu+maxpool3s2p1",
        "block.conv1": "bias+relu",
        "block.conv2": "bias+add+relu",  # `out += down(x)`: out is the first operand
        "block.down.0": "bias",  # stops before the add the main branch owns
        "head": "relu6",  # its BN was folded into its own bias: nothing left of the BN
    }


class FusedTorch(nn.Module):
    """A fused module computed with torch ops (what a real kernel does in one call)."""

    def __init__(self, base: nn.Module, chain: str) -> None:
        super().__init__()
        self.base, self.chain = base, chain
        self.calls = 0

    def forward(self, x, *tensors):
        self.calls += 1
        return apply_epilogue(self.base(x), self.chain, *tensors)


class Conv(nn.Module):
    def __init__(self, layer, w, bias):
        super().__init__()
        self.layer, self.w, self.bias = layer, w, bias

    def forward(self, x):
        if self.layer.kind == "linear":
            return F.linear(x, self.w, self.bias)
        return F.conv2d(x, self.w, self.bias, self.layer.stride, self.layer.padding, self.layer.dilation, self.layer.groups)


SEEN: list = []


class FusingKernel:
    """Dense convs that fuse every chain of the vocabulary (and record the LayerInfo they were given)."""

    epilogues = fusion.every_chain()

    @hookimpl
    def prunekit_build_kernel(self, layer, layout, bias):
        SEEN.append(layer)
        w = layout.tensors["w"]
        module = Conv(layer, w, bias)
        fused = FusedTorch(module, layer.epilogue) if layer.epilogue else None
        return CompiledLayer(module, kernel="test-fusing", fused=fused)


class ReluOnlyKernel(FusingKernel):
    epilogues = {"relu"}


class _EP:
    def __init__(self, obj):
        self.obj = obj

    def load(self):
        return self.obj


@pytest.fixture
def fusing(fake_components, write_registry):
    for name, cls in (("fusing", FusingKernel), ("relu-only", ReluOnlyKernel)):
        fake_components[("kernel", name)] = ComponentInfo("kernel", name, "prunekit-test", "0", f"tests:{cls.__name__}", _EP(cls))
    SEEN.clear()
    return write_registry(
        """
        [pipelines.f]
        schedule = "once"
        score = "abs"
        select = "topk"
        layout = "dense"
        kernel = "fusing"
        [pipelines.f.params]
        sparsity = 0.5
        keep_first_dense = true
        [pipelines.relu]
        schedule = "once"
        score = "abs"
        select = "topk"
        layout = "dense"
        kernel = "relu-only"
        [pipelines.plain]
        schedule = "once"
        score = "abs"
        select = "topk"
        layout = "dense"
        kernel = "dense"
        [pipelines.off]
        schedule = "once"
        score = "abs"
        select = "topk"
        layout = "dense"
        kernel = "fusing"
        [pipelines.off.params]
        fuse = false
        """
    )


def _compiled(registry, name):
    net = _net()
    pipe = Pipeline.load(name, registry)
    pipe.attach(net)
    pipe.prune(0.5)
    pipe.finalize()
    ref = copy.deepcopy(net)  # masked dense, BNs folded (the same function as before folding)
    mods = [n for n, _ in net.named_modules()]
    pipe.compile(example=X)
    return pipe, net, ref, mods


@torch.no_grad()
def test_pipeline_fuses_epilogues_and_computes_the_same_function(fusing):
    pipe, net, ref, mods = _compiled(fusing, "f")
    assert fusion.installed(net) and pipe.fusion is not None
    assert pipe.fusion.fused == {"stem": "bias+relu+maxpool3s2p1", "block.conv1": "bias+relu", "block.conv2": "bias+add+relu",
                                 "block.down.0": "bias", "head": "relu6"}  # fmt: skip
    given = {info.name: info.epilogue for info in SEEN}
    assert given["block.conv2"] == "bias+add+relu" and given["stem"] == "bias+relu+maxpool3s2p1"  # stem: offered dense
    assert given["fc"] == ""
    assert pipe.layers["block.conv2"].info.epilogue == "bias+add+relu"
    out = net(X)
    assert (out - ref(X)).abs().max() <= 1e-5 * ref(X).abs().max()
    site = net.prunekit_fusion.site2
    assert site._fused.calls >= 1
    # fusion adds no state and no submodule (the kernel's modules replaced the layers, nothing else did)
    assert not [k for k in net.state_dict() if "fusion" in k]
    assert [n for n, _ in net.named_modules()] == mods
    assert not any(isinstance(m, fusion.FusedSite) for m in net.modules())
    assert isinstance(net.stem, nn.Conv2d)
    # a layer swapped back (as export does for the masked dense ONNX) runs the module there + the epilogue
    compiled = net.block.conv2
    net.block.conv2 = pipe.layers["block.conv2"].module
    assert (net(X) - out).abs().max() <= 1e-5 * out.abs().max()
    net.block.conv2 = compiled
    fusion.uninstall(net)
    assert not fusion.installed(net) and (net(X) - out).abs().max() <= 1e-5 * out.abs().max()


@torch.no_grad()
def test_a_kernel_declaring_less_gets_the_longest_prefix_it_declared(fusing):
    pipe, net, ref, _ = _compiled(fusing, "relu")
    # every chain here starts with a folded BN's bias, or is head's relu6: nothing relu-only declares
    assert pipe.fusion.fused == {}
    assert all(info.epilogue == "" for info in SEEN)
    assert (net(X) - ref(X)).abs().max() <= 1e-5 * ref(X).abs().max()


@torch.no_grad()
def test_kernels_without_epilogues_and_fuse_false_change_nothing(fusing):
    for name in ("plain", "off"):
        net = _net()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        pipe = Pipeline.load(name, fusing)
        pipe.attach(net)
        pipe.prune(0.5)
        pipe.compile(example=X)
        assert pipe.fusion is None and not fusion.installed(net)
        assert torch.equal(net.bn.running_var, before["bn.running_var"])  # not folded
