"""Snapshots and rewinding, acted on in one place (Pipeline.step), saved with the state."""

import pytest
import torch
from torch import nn

from prunekit import PrunekitError
from prunekit.pipeline import Pipeline
from prunekit.training import cosine_lr, lr_segments

LOTTERY = """
[pipelines.lt]
schedule = "lottery"
score = "abs"
select = "topk"
[pipelines.lt.params]
sparsity = 0.5
rewind_at = 1
length = 2
epochs = 6
"""


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def _train_a_bit(model, steps=3, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()


def _raw_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".mask")}


def test_rewind_restores_every_parameter_and_buffer_and_keeps_masks(fake_components, write_registry):
    torch.manual_seed(0)
    model = BNNet()
    pipe = Pipeline.load("lt", write_registry(LOTTERY))
    pipe.attach(model)
    pipe.step(0)
    _train_a_bit(model)
    d1 = pipe.step(1)  # snapshot taken here, before step 1 trains
    assert d1.snapshot and not d1.rewind
    snap = _raw_state(model)
    _train_a_bit(model)  # weights and BN running stats move on
    assert not torch.equal(model.bn.running_mean, snap["bn.running_mean"])
    d2 = pipe.step(2)  # prune, then rewind
    assert d2.update and d2.rewind
    after = _raw_state(model)
    assert after.keys() == snap.keys()
    for k in snap:
        assert torch.equal(after[k], snap[k]), k
    for name, st in pipe.layers.items():  # effective weight = snapshot * mask
        mask = st.selection.mask
        raw = snap[f"{name}.parametrizations.weight.original"]
        assert torch.equal(st.module.weight.detach(), raw * mask)
        assert (~mask).any()


def test_a_resumed_run_rewinds_to_the_same_weights(fake_components, write_registry, tmp_path):
    reg = write_registry(LOTTERY)
    torch.manual_seed(0)
    model = BNNet()
    pipe = Pipeline.load("lt", reg)
    pipe.attach(model)
    pipe.step(0)
    pipe.step(1)
    snap = _raw_state(model)
    _train_a_bit(model)
    pipe.save(tmp_path / "state.pt")
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    # a fresh process: another model object, the trained weights restored, the state loaded
    torch.manual_seed(99)
    other = BNNet()
    pipe2 = Pipeline.load("lt", reg)
    pipe2.attach(other)
    other.load_state_dict(trained)
    pipe2.load_state(tmp_path / "state.pt")
    assert pipe2.position == 2 and list(pipe2.snapshots) == [1]
    pipe2.step()  # step 2: prune and rewind
    for k, v in snap.items():
        assert torch.equal(other.state_dict()[k], v), k


def test_plan_refuses_a_rewind_with_no_snapshot_before_it(fake_components, write_registry):
    body = LOTTERY.replace("rewind_at = 1", "rewind_at = 5")  # snapshot after the first rewind at step 2
    pipe = Pipeline.load("lt", write_registry(body))
    with pytest.raises(PrunekitError, match="no snapshot is taken before it"):
        pipe.plan()


def test_rewind_without_snapshot_is_a_clear_error(fake_components, basic_registry, small_net):
    pipe = Pipeline.load("basic", basic_registry)
    pipe.attach(small_net)
    with pytest.raises(PrunekitError, match="no snapshot was taken"):
        pipe.rewind()


def test_learning_rate_restarts_at_every_rewind(fake_components, write_registry):
    pipe = Pipeline.load("lt", write_registry(LOTTERY))
    segments = lr_segments(pipe.plan(6), 6)
    assert segments == [(0, 2), (2, 4), (4, 6)]
    lrs = [cosine_lr(0.1, e, next(s for s in segments if s[0] <= e < s[1])) for e in range(6)]
    assert lrs[0] == lrs[2] == lrs[4] == pytest.approx(0.1) and lrs[1] < 0.1


def test_training_loop_restarts_the_optimizer_after_a_rewind(fake_components, write_registry, monkeypatch):
    import prunekit.training as tr

    made = []
    real = tr.make_optimizer
    monkeypatch.setattr(tr, "make_optimizer", lambda *a, **k: made.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = BNNet()
    pipe = Pipeline.load("lt", write_registry(LOTTERY))
    pipe.attach(model)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))), batch_size=4)
    records = tr.prune_and_finetune(pipe, model, data, data, 6, 0.05, "sgd", progress=False)
    assert len(made) == 3  # epoch 0, and after the rewinds at steps 2 and 4
    assert [r.epoch for r in records] == list(range(6))
