"""Refill / Regroup selects through the real host: the IMP rounds stay plain IMP, the final round
transforms the mask, and the rewound ticket keeps the rewound weights at every kept position (I.7)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prunekit_lth.imp import round_sparsity
from prunekit_lth.refill import as_rows

from prunekit.models import ResNetDigits
from prunekit.pipeline import Pipeline

ROUNDS, LENGTH = 2, 2
TARGET = round_sparsity(ROUNDS, 0.2)


def _pipe(tmp_path: Path, select: str, extra: str = "") -> Pipeline:
    reg = tmp_path / "registry.toml"
    reg.write_text(
        f'[pipelines.t]\nschedule = "lth-imp"\nscore = "lth-l1"\nselect = "{select}"\n[pipelines.t.params]\n'
        f"sparsity = {TARGET}\nrounds = {ROUNDS}\nround_length = {LENGTH}\nrewind_step = 1\n"
        f"epochs = {(ROUNDS + 1) * LENGTH}\n{extra}\n"
    )
    return Pipeline.load("t", reg)


def _drive(pipe: Pipeline, model: torch.nn.Module) -> dict[int, dict[str, torch.Tensor]]:
    total = (ROUNDS + 1) * LENGTH
    masks = {}
    for step in range(total):
        d = pipe.step(step, total_steps=total)
        if d.update:
            masks[step] = {n: st.selection.mask.clone() for n, st in pipe.layers.items()}
        with torch.no_grad():  # a stand-in for training: the weights move every step
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return masks


@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_refill_final_round_gives_whole_channels_and_rewound_weights(tmp_path, rho):
    torch.manual_seed(0)
    model = ResNetDigits(10, 1)
    pipe = _pipe(tmp_path, "lth-refill", f"rho = {rho}")
    pipe.attach(model)
    total = (ROUNDS + 1) * LENGTH
    for step in range(ROUNDS * LENGTH):  # up to the final round
        pipe.step(step, total_steps=total)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    before = {n: st.selection.mask.clone() for n, st in pipe.layers.items()}
    for st in pipe.layers.values():  # the IMP rounds before the last are unstructured
        rows = as_rows(st.selection.mask).sum(1)
        assert ((rows > 0) & (rows < rows.new_tensor(as_rows(st.selection.mask).shape[1]))).any()
    pipe.step(ROUNDS * LENGTH, total_steps=total)  # final: IMP prune, refill, rewind
    snap = pipe.snapshots[1]
    for name, st in pipe.layers.items():
        m2 = as_rows(st.selection.mask)
        n = m2.shape[1]
        assert set(m2.sum(1).unique().tolist()) <= {0, n}  # I.5: every channel all-zero or all-one
        meta = st.selection.meta
        nu = meta["nu"]
        assert meta["kept_channels"] == int(nu + (m2.shape[0] - nu) * rho)  # K' = floor(nu + (Cout - nu) rho)
        assert meta["imp_density"] < float(before[name].float().mean())  # the final round pruned first
        raw = snap[f"{name}.parametrizations.weight.original"]
        eff = st.module.weight.detach()
        assert torch.equal(eff, raw * st.selection.mask)  # I.7: kept = rewound at ALL positions, refilled ones too
        assert st.selection.pattern.startswith("whole output channels")


def test_refill_with_a_feature_map_criterion_declares_and_uses_calibration(tmp_path):
    pipe = _pipe(tmp_path, "lth-refill", 'criterion = "fm-l1"')
    assert pipe.needs == {"activations"}
    assert _pipe(tmp_path, "lth-refill", 'criterion = "saliency"').needs == {"activations", "grads"}
    assert _pipe(tmp_path, "lth-refill").needs == frozenset()
    torch.manual_seed(0)
    model = ResNetDigits(10, 1)
    pipe.attach(model, calibration=[torch.randn(8, 1, 16, 16)])
    pipe.prune(TARGET)  # one-shot final round
    for st in pipe.layers.values():
        assert st.selection.meta["criterion"] == "fm-l1"


def test_regroup_final_round_gives_row_groups_and_a_block_order(tmp_path):
    torch.manual_seed(0)
    model = ResNetDigits(10, 1)
    pipe = _pipe(tmp_path, "lth-regroup", "rows_per_part = 16\nmin_rows = 8\ntile = 16")
    pipe.attach(model)
    masks = _drive(pipe, model)
    final = masks[ROUNDS * LENGTH]
    for name, st in pipe.layers.items():
        meta, sel = st.selection.meta, st.selection
        m2 = as_rows(sel.mask)
        assert meta["blocks"] >= 1, name
        assert {"kept_orig", "dropped", "refilled", "density_before", "density_after", "imp_density"} <= set(meta)
        assert meta["density"] == pytest.approx(float(m2.float().mean()))
        order = sel.perms[0]
        assert torch.equal(torch.sort(order).values, torch.arange(m2.shape[0]))
        # in the block order, rows with one support sit next to each other: each support is one run
        supports = [tuple(m2[r].nonzero().flatten().tolist()) for r in order.tolist()]
        runs = [s for i, s in enumerate(supports) if i == 0 or s != supports[i - 1]]
        assert len(runs) == len(set(runs)), f"{name}: a row group is split in perms[0]"
        assert torch.equal(final[name], sel.mask)


def test_bench_style_one_shot_prune_applies_the_transform(tmp_path):
    torch.manual_seed(0)
    model = ResNetDigits(10, 1)
    pipe = _pipe(tmp_path, "lth-refill")
    pipe.attach(model)
    pipe.prune(0.75)  # no schedule: sparsity == target, so the final transform applies at once
    for st in pipe.layers.values():
        m2 = as_rows(st.selection.mask)
        assert set(m2.sum(1).unique().tolist()) <= {0, m2.shape[1]}
    assert pipe.sparsity() == pytest.approx(0.75, abs=0.05)
