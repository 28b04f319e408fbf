"""IMP with rewinding (method doc B) through the real host: invariants I.1-I.4 and I.17."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from prunekit_lth.imp import IMPSchedule, round_sparsity
from torch import nn

from prunekit import PrunekitError
from prunekit.models import ResNetDigits
from prunekit.pipeline import Pipeline

ROUNDS, LENGTH, REWIND = 3, 2, 1
TARGET = round_sparsity(ROUNDS, 0.2)  # 0.488


def _registry(tmp_path: Path, select: str = "lth-imp", extra: str = "") -> Path:
    reg = tmp_path / "registry.toml"
    reg.write_text(
        f'[pipelines.t]\nschedule = "lth-imp"\nscore = "lth-l1"\nselect = "{select}"\n[pipelines.t.params]\n'
        f"sparsity = {TARGET}\nrounds = {ROUNDS}\nround_length = {LENGTH}\nrewind_step = {REWIND}\n"
        f"epochs = {(ROUNDS + 1) * LENGTH}\n{extra}\n"
    )
    return reg


def _perturb(model: nn.Module, seed: int) -> None:
    """Stand-in for a training epoch: every parameter and BN buffer moves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.endswith(".mask"):
                t.add_(0.05 * torch.randn(t.shape, generator=g))


def _run(tmp_path: Path, select: str = "lth-imp", extra: str = "", stop: int | None = None):
    torch.manual_seed(0)
    model = ResNetDigits(10, 1)
    pipe = Pipeline.load("t", _registry(tmp_path, select, extra))
    pipe.attach(model)
    total = (ROUNDS + 1) * LENGTH if stop is None else stop
    masks, snapshots, decisions = [], {}, []
    for step in range(total):
        d = pipe.step(step, total_steps=(ROUNDS + 1) * LENGTH)
        decisions.append(d)
        if d.snapshot:
            snapshots[step] = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".mask")}
        if d.update:
            masks.append({n: st.selection.mask.clone() for n, st in pipe.layers.items()})
        _perturb(model, 100 + step)
    return pipe, model, masks, snapshots, decisions


def test_schedule_timeline_snapshot_then_prune_and_rewind_every_round():
    sched, p = IMPSchedule(), IMPSchedule.Params(rounds=3, round_length=2, rewind_step=1)
    ds = [sched.prunekit_schedule(s, 8, TARGET, p) for s in range(8)]
    assert [d.step for d in ds if d.snapshot] == [1]
    assert [d.step for d in ds if d.update] == [2, 4, 6] == [d.step for d in ds if d.rewind]
    assert [round(d.sparsity, 4) for d in ds if d.update] == [0.2, 0.36, round(TARGET, 4)]
    assert [d.final for d in ds] == [False] * 6 + [True] * 2
    with pytest.raises(PrunekitError, match=r"\(3 \+ 1\) \* 2 = 8 steps"):
        sched.prunekit_schedule(0, 7, TARGET, p)
    with pytest.raises(PrunekitError, match="reaches sparsity 0.4880, not the pipeline's sparsity 0.75"):
        sched.prunekit_schedule(0, 8, 0.75, IMPSchedule.Params(rate=0.2))
    with pytest.raises(PrunekitError, match="rewind_step = 2 must fall in round 0"):
        IMPSchedule.Params(rewind_step=2)


def test_I1_density_is_0_8_to_the_k_each_round_removes_20_percent_of_the_remaining_and_masks_nest(tmp_path):
    pipe, _, masks, _, _ = _run(tmp_path)
    total = sum(m.numel() for m in masks[0].values())
    kept_prev = total
    for k, round_masks in enumerate(masks, start=1):
        kept = sum(int(m.sum()) for m in round_masks.values())
        assert abs(kept / total - 0.8**k) <= 1.0 / total
        assert abs((kept_prev - kept) - round(0.2 * kept_prev)) <= 1
        if k > 1:
            for name, m in round_masks.items():
                assert not (m & ~masks[k - 2][name]).any(), f"round {k} un-pruned weights of {name}"
        kept_prev = kept
    assert pipe.sparsity() == pytest.approx(TARGET, abs=1.0 / total)


def test_I2_global_magnitude_order_of_every_prune(tmp_path):
    torch.manual_seed(0)
    model = ResNetDigits(10, 1)
    pipe = Pipeline.load("t", _registry(tmp_path))
    pipe.attach(model)
    prev = {n: torch.ones_like(st.module.weight, dtype=torch.bool) for n, st in pipe.layers.items()}
    for step in range((ROUNDS + 1) * LENGTH):
        weights = {n: st.module.parametrizations.weight.original.detach().abs().clone() for n, st in pipe.layers.items()}
        d = pipe.step(step, total_steps=(ROUNDS + 1) * LENGTH)
        if d.update:
            kept = torch.cat([weights[n][pipe.layers[n].selection.mask] for n in weights])
            newly = torch.cat([weights[n][prev[n] & ~pipe.layers[n].selection.mask] for n in weights])
            assert newly.numel() > 0 and kept.min() >= newly.max()  # one pooled threshold over every layer
            prev = {n: st.selection.mask.clone() for n, st in pipe.layers.items()}
            densities = {n: float(st.selection.mask.float().mean()) for n, st in pipe.layers.items()}
            assert max(densities.values()) - min(densities.values()) > 0.01  # global: layer densities differ
        _perturb(model, step)


def test_I3_stem_head_and_batchnorm_never_masked_and_pruned_weights_get_no_gradient(tmp_path):
    pipe, model, _, _, _ = _run(tmp_path)
    assert "conv1" not in pipe.layers and "fc" not in pipe.layers
    assert set(pipe.left_dense) >= {"conv1", "fc"}
    assert set(pipe.layers) == {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d) or name in ("conv1", "fc"):
            assert not hasattr(mod, "parametrizations")
    model.train()
    model(torch.randn(4, 1, 16, 16)).square().mean().backward()
    for st in pipe.layers.values():
        grad = st.module.parametrizations.weight.original.grad
        assert torch.all(grad[~st.selection.mask] == 0) and torch.any(grad[st.selection.mask] != 0)


def test_linear_layers_join_the_prunable_set_only_when_selected(tmp_path):
    class WithHidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 8, 3)
            self.hidden = nn.Linear(8 * 14 * 14, 32)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.hidden(torch.flatten(self.c(x), 1))))

    for extra, pruned in (("", False), ("linear = true", True)):
        pipe = Pipeline.load("t", _registry(tmp_path, extra=extra))
        pipe.attach(WithHidden())
        pipe.prune(0.5)
        sel = pipe.layers["hidden"].selection
        assert bool((~sel.mask).any()) == pruned
        if not pruned:
            assert "prunes convs" in sel.dense_reason


def test_I4_rewind_restores_every_parameter_and_buffer_of_epoch_r_and_effective_is_snapshot_times_mask(tmp_path):
    pipe, model, masks, snapshots, _ = _run(tmp_path, stop=2 * LENGTH + 1)  # through round 1's prune at step 4
    snap = snapshots[REWIND]
    # step 4 pruned and rewound, then _perturb moved everything: undo by re-running the rewind
    pipe.rewind()
    state = model.state_dict()
    for k, v in snap.items():
        assert torch.equal(state[k], v), k
    for name, st in pipe.layers.items():
        raw = snap[f"{name}.parametrizations.weight.original"]
        assert torch.equal(st.module.weight.detach(), raw * st.selection.mask)


def test_lt_variant_rewinds_to_the_initialisation(tmp_path):
    torch.manual_seed(0)
    model = ResNetDigits(10, 1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    reg = _registry(tmp_path).read_text().replace(f"rewind_step = {REWIND}", "rewind_step = 0")
    (tmp_path / "lt.toml").write_text(reg)
    pipe = Pipeline.load("t", tmp_path / "lt.toml")
    pipe.attach(model)
    for step in range(LENGTH + 1):
        pipe.step(step, total_steps=(ROUNDS + 1) * LENGTH)
        if step < LENGTH:
            _perturb(model, step)
    state = model.state_dict()
    for k, v in init.items():
        if not k.endswith(".mask") and k in state:
            assert torch.equal(state[k], v), k


def test_I17_imp_and_post_transform_density_reported_over_the_prunable_set(tmp_path):
    pipe, model, _, _, _ = _run(tmp_path, select="lth-refill")
    prunable = sum(math.prod(st.info.weight_shape) for st in pipe.layers.values())
    kept = sum(int(st.selection.mask.sum()) for st in pipe.layers.values())
    assert pipe.sparsity() == pytest.approx(1 - kept / prunable)  # stem and head not counted
    for st in pipe.layers.values():
        m = st.selection.meta
        assert {"imp_density", "density"} <= set(m)
        assert m["density"] == pytest.approx(float(st.selection.mask.float().mean()))
        assert m["imp_density"] != m["density"] or st.selection.mask.all()
    imp = sum(st.selection.meta["imp_density"] * math.prod(st.info.weight_shape) for st in pipe.layers.values()) / prunable
    assert imp == pytest.approx(1 - TARGET, abs=1e-3)
