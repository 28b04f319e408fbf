"""What the reliability fuzzing found in the threshold select (benches/results/reliability.md): NaN/Inf
weights, and a global threshold over an all-zero layer, which used to prune nothing anywhere, silently."""

from __future__ import annotations

import warnings

import prunekit_magnitude.threshold as threshold_module
import pytest
import torch
from prunekit_magnitude import Magnitude, Threshold

from prunekit import SelectionError
from prunekit.pipeline import Pipeline
from prunekit.records import LayerInfo

SparsityShortfall = getattr(threshold_module, "SparsityShortfall", UserWarning)


def infos(shapes: dict[str, tuple[int, ...]]) -> dict[str, LayerInfo]:
    kinds = {2: "linear", 4: "conv2d"}
    return {n: LayerInfo(n, kinds[len(s)], s, index=i, count=len(shapes)) for i, (n, s) in enumerate(shapes.items())}


def select_all(weights: dict[str, torch.Tensor], sparsity: float, **params) -> dict:
    layers = infos({n: tuple(w.shape) for n, w in weights.items()})
    scores = {n: Magnitude().prunekit_score(weight=w, mask=None, params=None) for n, w in weights.items()}
    out = {}
    for n, w in weights.items():
        out[n] = Threshold().prunekit_select_mask(
            layer=layers[n], weight=w, scores=scores[n], sparsity=sparsity, target=sparsity, previous=None,
            params=Threshold.Params(**params), all_scores=scores,
        )  # fmt: skip
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_non_finite_weights_are_a_selection_error_naming_the_layer(value, scope):
    # before: NaN scores failed every `score >= t`, so NaN weights were pruned even at sparsity 0 and a
    # NaN threshold (more NaNs than the quantile's rank) pruned the whole layer; W * mask kept NaN * 0 = NaN
    w = torch.randn(6, 5)
    w[2, 3] = value
    with pytest.raises(SelectionError, match=r"layer fc: 1 of 30 weights are NaN or infinite"):
        select_all({"fc": w}, 0.0, scope=scope)
    if scope == "global":  # one bad layer spoils the pooled threshold: every layer says which
        with pytest.raises(SelectionError, match=r"layer ok: the global threshold pools layer fc"):
            select_all({"ok": torch.randn(4, 4), "fc": w}, 0.5, scope=scope)


def test_non_finite_layer_stays_dense_with_the_reason_through_the_host(tmp_path):
    reg = tmp_path / "registry.toml"
    reg.write_text('[pipelines.p]\nschedule = "constant"\nscore = "magnitude"\nselect = "threshold"\n'
                   '[pipelines.p.params]\nsparsity = 0.5\n')  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    pipe = Pipeline.load("p", reg)
    pipe.attach(model)
    sel = pipe.prune(0.5)
    assert "NaN or infinite" in sel["0"].dense_reason and bool(sel["0"].mask.all())
    assert not sel["2"].dense_reason and int((~sel["2"].mask).sum()) == 8


def test_global_threshold_with_an_all_zero_layer():
    torch.manual_seed(0)
    weights = {"a": torch.randn(8, 8), "zero": torch.zeros(8, 8)}
    # ties = "break" (default): exactly round(0.3 * 128) = 38 pruned, the zeros first (index order), no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsityShortfall)
        sel = select_all(weights, 0.3, scope="global")
    assert sum(int((~s.mask).sum()) for s in sel.values()) == 38
    assert sel["zero"].meta["pooled_achieved_sparsity"] == pytest.approx(38 / 128)
    # ties = "keep" (Han's strict rule): the threshold is 0 and nothing is below it: nothing pruned anywhere.
    # Before, silently; now one warning with both figures, and the pooled figure in meta
    with pytest.warns(SparsityShortfall, match=r"global threshold over 2 layers: achieved sparsity 0.0000, requested 0.3000"):
        sel = select_all(weights, 0.3, scope="global", ties="keep")
    assert all(bool(s.mask.all()) for s in sel.values())
    assert sel["a"].meta["requested_sparsity"] == 0.3 and sel["a"].meta["pooled_achieved_sparsity"] == 0.0


def test_layer_scope_all_zero_layer_warns_under_the_strict_rule_only():
    with pytest.warns(SparsityShortfall, match=r"layer zero: achieved sparsity 0.0000, requested 0.5000"):
        select_all({"zero": torch.zeros(4, 4)}, 0.5, ties="keep")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsityShortfall)
        sel = select_all({"zero": torch.zeros(4, 4)}, 0.5)
    assert sel["zero"].meta["achieved_sparsity"] == 0.5
