"""Score and select: Han's strict |w| < t rule, quantile/std thresholds, layer/global scope, nesting."""

from __future__ import annotations

import math

import pytest
import torch
from prunekit_magnitude import Magnitude, Threshold
from prunekit_magnitude.threshold import quantile_threshold

from prunekit import SelectionError
from prunekit.records import LayerInfo
from prunekit.registry import strict_converter

LIN = LayerInfo("fc", "linear", (40, 30))
CONV = LayerInfo("conv", "conv2d", (8, 3, 3, 3))


def score(w: torch.Tensor, mask: torch.Tensor | None = None, regrow: bool = False) -> torch.Tensor:
    return Magnitude().prunekit_score(weight=w, mask=mask, params=Magnitude.Params(regrow=regrow))


def select(layer, w, s, sparsity, previous=None, target=None, all_scores=None, **params):
    return Threshold().prunekit_select_mask(
        layer=layer,
        weight=w,
        scores=s,
        sparsity=sparsity,
        target=sparsity if target is None else target,
        previous=previous,
        params=Threshold.Params(**params),
        all_scores=all_scores if all_scores is not None else {layer.name: s},
    )


def test_score_is_abs_of_masked_weight() -> None:
    w = torch.randn(4, 5)
    m = torch.rand(4, 5) > 0.5
    assert torch.equal(score(w), w.abs())
    assert torch.equal(score(w, m), (w * m).abs())
    assert torch.equal(score(w, m, regrow=True), w.abs())


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("layer", [LIN, CONV])
def test_quantile_prunes_exactly_below_threshold(layer: LayerInfo, sparsity: float) -> None:
    w = torch.randn(layer.weight_shape, generator=torch.Generator().manual_seed(1))
    sel = select(layer, w, score(w), sparsity)
    t = sel.meta["threshold"]
    pruned = w.abs() < t
    assert torch.equal(sel.mask, ~pruned)  # B.8-1: |w| < t pruned, everything else kept
    n = w.numel()
    assert int((~sel.mask).sum()) == round(sparsity * n)  # no ties in random floats: exact count
    assert sel.meta["achieved_sparsity"] == pytest.approx(sel.sparsity)
    assert sel.block == (1,) * w.dim() and sel.perms == (None,) * w.dim()
    assert sel.mask.dtype == torch.bool and sel.mask.shape == w.shape


def test_ties_stay_within_tolerance_under_the_strict_rule() -> None:
    # many equal magnitudes straddling the quantile: the strict rule (ties = "keep") keeps all of them
    w = torch.tensor([0.1] * 10 + [0.5] * 20 + [0.9] * 10).reshape(4, 10)
    sel = select(LayerInfo("t", "linear", (4, 10)), w, score(w), 0.5, ties="keep")  # k = 20 lands inside the 0.5 run
    n, ties = w.numel(), 20
    assert sel.meta["threshold"] == 0.5
    assert int((~sel.mask).sum()) == 10
    assert abs(sel.sparsity - 0.5) <= (ties + 1) / n
    assert bool((w.abs()[~sel.mask] < 0.5).all())


def test_quantile_threshold_edges() -> None:
    x = torch.tensor([3.0, 1.0, 2.0])
    assert quantile_threshold(x, 0.0) == 0.0
    assert quantile_threshold(x, 1 / 3) == 2.0
    assert math.isinf(quantile_threshold(x, 0.999))


def test_global_scope_one_threshold_across_layers() -> None:
    g = torch.Generator().manual_seed(2)
    small, big = torch.randn(20, 10, generator=g) * 0.1, torch.randn(20, 10, generator=g)
    la, lb = LayerInfo("a", "linear", (20, 10)), LayerInfo("b", "linear", (20, 10), index=1)
    scores = {"a": score(small), "b": score(big)}
    sa = select(la, small, scores["a"], 0.5, all_scores=scores, scope="global")
    sb = select(lb, big, scores["b"], 0.5, all_scores=scores, scope="global")
    assert sa.meta["threshold"] == sb.meta["threshold"]
    pruned = int((~sa.mask).sum()) + int((~sb.mask).sum())
    assert pruned == 200  # 50 % of the pool
    assert sa.sparsity > 0.8 > 0.2 > sb.sparsity  # the small-weight layer takes most of the pruning
    layer_wise = select(la, small, scores["a"], 0.5)
    assert layer_wise.sparsity == 0.5


def test_std_rule_is_han_q_times_std() -> None:
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    sel = select(LIN, w, score(w), 0.9, rule="std", quality=0.8)
    t = 0.8 * float(w.std())
    assert sel.meta["threshold"] == pytest.approx(t)
    assert torch.equal(sel.mask, w.abs() >= sel.meta["threshold"])
    # normal weights: P(|w| < 0.8 sd) ~ 0.58, an outcome of q, not of the requested 0.9
    assert 0.45 < sel.sparsity < 0.7
    # per-layer quality by glob overrides the global q
    sel2 = select(LIN, w, score(w), 0.9, rule="std", quality=0.8, layer_quality={"f*": 0.1})
    assert sel2.meta["threshold"] == pytest.approx(0.1 * float(w.std()))


def test_std_rule_ramps_with_schedule_and_keeps_dense_spread() -> None:
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(4))
    first = select(LIN, w, score(w), 0.45, target=0.9, rule="std", quality=1.0)
    assert first.meta["threshold"] == pytest.approx(0.5 * float(w.std()))
    second = select(LIN, w, score(w, first.mask), 0.9, target=0.9, previous=first, rule="std", quality=1.0)
    assert second.meta["spread"] == first.meta["spread"]
    assert second.meta["threshold"] == pytest.approx(float(w.std()))
    assert bool((second.mask <= first.mask).all()) and second.sparsity > first.sparsity


def test_nested_unless_regrow() -> None:
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(5))
    first = select(LIN, w, score(w), 0.5)
    # weights move: some pruned ones grow large, some kept ones shrink
    w2 = w.clone()
    w2[~first.mask] *= 10.0
    nested = select(LIN, w2, score(w2, first.mask), 0.7, previous=first)
    assert bool((nested.mask <= first.mask).all())
    assert nested.sparsity == pytest.approx(0.7, abs=1 / w.numel())
    regrown = select(LIN, w2, score(w2, first.mask, regrow=True), 0.7, previous=first, regrow=True)
    assert bool((regrown.mask & ~first.mask).any())  # large pruned weights come back


def test_params_from_registry_and_validation() -> None:
    conv = strict_converter()
    p = conv.structure({"scope": "global", "rule": "std", "layer_quality": {"conv1": 0.5}}, Threshold.Params)
    assert p.quality_for("conv1") == 0.5 and p.quality_for("fc1") == 1.0
    with pytest.raises(SelectionError, match="scope"):
        Threshold.Params(scope="net")
    with pytest.raises(SelectionError, match="rule"):
        Threshold.Params(rule="l2")
    with pytest.raises(SelectionError, match="quality"):
        Threshold.Params(quality=-1.0)


def test_block_scores_rejected() -> None:
    w = torch.randn(8, 4)
    with pytest.raises(SelectionError, match="one score per weight"):
        select(LayerInfo("x", "linear", (8, 4)), w, torch.rand(2, 4), 0.5)


def test_std_rule_global_uses_pooled_rms() -> None:
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(20, 10, generator=g) * 0.1, torch.randn(30, 10, generator=g)
    scores = {"a": score(a), "b": score(b)}
    rms = float(torch.cat([a.reshape(-1), b.reshape(-1)]).square().mean().sqrt())
    la, lb = LayerInfo("a", "linear", (20, 10)), LayerInfo("b", "linear", (30, 10), index=1)
    sa = select(la, a, scores["a"], 0.5, all_scores=scores, scope="global", rule="std", quality=0.5)
    sb = select(lb, b, scores["b"], 0.5, all_scores=scores, scope="global", rule="std", quality=0.5)
    assert sa.meta["threshold"] == sb.meta["threshold"] == pytest.approx(0.5 * rms)
    assert torch.equal(sa.mask, a.abs() >= sa.meta["threshold"])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_ties_are_broken_by_index_for_an_exact_count_or_kept_when_asked(scope: str) -> None:
    # 60 % of the scores are exactly 0 (inputs that are always zero give data-aware scores of 0)
    a, b = LayerInfo("a", "linear", (10, 10)), LayerInfo("b", "linear", (10, 10), index=1, count=2)
    sa = torch.cat([torch.zeros(60), torch.rand(40) + 1]).reshape(10, 10)
    sb = torch.cat([torch.zeros(60), torch.rand(40) + 1]).reshape(10, 10)
    all_scores = {"a": sa, "b": sb}
    broken = [Threshold().prunekit_select_mask(info, s, s, 0.5, 0.5, None, Threshold.Params(scope=scope), all_scores)
              for info, s in ((a, sa), (b, sb))]  # fmt: skip
    pruned = sum(int((~sel.mask).sum()) for sel in broken)
    assert pruned == 100  # exactly half of 200, not the 0 the strict rule leaves
    if scope == "layer":
        assert all(int((~sel.mask).sum()) == 50 for sel in broken)
        assert torch.equal(~broken[0].mask.flatten(), torch.arange(100) < 50)  # the first ties in index order
    else:
        assert int((~broken[0].mask).sum()) == 60 and int((~broken[1].mask).sum()) == 40  # layer a comes first
    kept = [Threshold().prunekit_select_mask(info, s, s, 0.5, 0.5, None, Threshold.Params(scope=scope, ties="keep"), all_scores)
            for info, s in ((a, sa), (b, sb))]  # fmt: skip
    assert all(sel.mask.all() for sel in kept)  # strict score < 0: nothing is below the threshold
