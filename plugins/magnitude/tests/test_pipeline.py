"""End to end through the host Pipeline: Han rounds, masked training under several optimizers, CSR compile."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.masking import mask_of, raw_weight
from prunekit.pipeline import Pipeline

# torch calls its CSR tensors "beta" once per process; pytest resets the plugin's import-time filter
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

REGISTRY = """
[pipelines.han-test]
schedule = "iterative"
score = "magnitude"
select = "threshold"
layout = "csr"
kernel = "csr"
[pipelines.han-test.params]
sparsity = 0.8
epochs = 6
rounds = 3
round_length = 2
scope = "{scope}"
fallback = "never"
"""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 5 * 5, 20)
        self.fc2 = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def load(tmp_path: Path, scope: str = "layer") -> Pipeline:
    reg = tmp_path / "registry.toml"
    reg.write_text(REGISTRY.format(scope=scope))
    return Pipeline.load("han-test", reg)


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "sgd-weight-decay": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize(("opt_name", "scope"), [(o, "layer") for o in OPTIMIZERS] + [("adamw", "global")])
def test_iterative_rounds_stay_pruned_and_nested(tmp_path: Path, opt_name: str, scope: str) -> None:
    torch.manual_seed(0)
    model = Net()
    pipe = load(tmp_path, scope)
    pipe.attach(model)
    opt = OPTIMIZERS[opt_name](model.parameters())
    x, y = torch.randn(16, 2, 5, 5), torch.randint(0, 4, (16,))
    previous: dict[str, torch.Tensor] = {}
    sparsities = []
    for epoch in range(pipe.epochs):
        decision = pipe.step(epoch, total_steps=pipe.epochs)
        for name, st in pipe.layers.items():
            mask = mask_of(st.module).mask.bool()
            if decision.update:
                t = st.selection.meta["threshold"]
                # B.8-1: right after pruning, every |w| (of the previous effective weight) below t is gone
                w_eff = raw_weight(st.module).detach() * previous.get(name, torch.ones_like(mask))
                assert not bool((mask & (w_eff.abs() < t)).any())
            if name in previous:
                assert bool((mask <= previous[name]).all()), "masks must be nested across rounds"
            previous[name] = mask.clone()
        sparsities.append(pipe.sparsity())
        for _ in range(3):  # train steps with masks fixed
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        for st in pipe.layers.values():
            pruned = ~mask_of(st.module).mask.bool()
            assert bool((st.module.weight.detach()[pruned] == 0).all()), f"{opt_name}: pruned weight revived"
    assert sparsities[0] < sparsities[2] < sparsities[4] == sparsities[5]
    assert sparsities[-1] == pytest.approx(0.8, abs=0.01)

    pipe.finalize()
    reference = copy.deepcopy(model).eval()
    states = pipe.compile()
    assert all(st.compiled.kernel == "csr" for st in states)
    assert all(st.layout.meta["nnz"] == int(st.selection.mask.sum()) for st in states)
    xt = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        ref, got = reference(xt), model(xt)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_state_round_trip_keeps_masks(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Net()
    pipe = load(tmp_path)
    pipe.attach(model)
    pipe.step(0)
    pipe.step(1)
    pipe.step(2)
    pipe.save(tmp_path / "state.pt")
    other = load(tmp_path)
    other.attach(copy.deepcopy(model))
    other.load_state(tmp_path / "state.pt")
    for name in pipe.layers:
        assert torch.equal(pipe.layers[name].selection.mask, other.layers[name].selection.mask)
    # resuming continues nested from the restored masks
    other.step(4)
    for name, st in other.layers.items():
        assert bool((st.selection.mask <= pipe.layers[name].selection.mask).all())
