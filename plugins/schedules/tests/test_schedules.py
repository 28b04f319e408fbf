"""Schedules against the formulas of onexn-and-subp.md B.4 and Han's rounds."""

from __future__ import annotations

import math

import pytest
from prunekit_schedules import Constant, Cos, Cubic, Exp, Iterative, Linear, ramp_ratio, round_sparsity
from prunekit_schedules.ramps import RampParams

from prunekit import PrunekitError

RAMPS = {"linear": Linear, "exp": Exp, "cos": Cos, "cubic": Cubic}

# onexn-and-subp.md B.4, ds = 10, de = 180 (4 decimals; cos at 11 and cubic at 11 given more finely below)
STEPS = [10, 11, 30, 60, 95, 120, 150, 170, 179, 180, 250]
TABLE = {
    "linear": [0, 0.0059, 0.1176, 0.2941, 0.5, 0.6471, 0.8235, 0.9412, 0.9941, 1, 1],
    "cos": [0, 0.00004, 0.0170, 0.1048, 0.2929, 0.4736, 0.7263, 0.9077, 0.9908, 1, 1],
    "exp": [0, 0.0488, 0.6323, 0.9181, 0.9859, 0.9961, 0.9993, 0.9999, 1.0, 1, 1],
    "cubic": [0, 2e-7, 0.0016, 0.0254, 0.125, 0.2709, 0.5585, 0.8337, 0.9825, 1, 1],
}


def decide(kind: str, step: int, start: int, end: int, total: int = 300, target: float = 1.0):
    return RAMPS[kind]().prunekit_schedule(step=step, total_steps=total, target=target, params=RampParams(start, end))


@pytest.mark.parametrize("kind", list(RAMPS))
def test_reference_table(kind: str) -> None:
    for e, want in zip(STEPS, TABLE[kind]):
        got = decide(kind, e, 10, 180).sparsity
        assert got == pytest.approx(want, abs=5e-5), (kind, e)


def test_small_values_exactly() -> None:
    assert ramp_ratio("cos", 11, 10, 180) == pytest.approx(1 - math.cos(math.pi / 340), rel=1e-12)
    assert ramp_ratio("cubic", 11, 10, 180) == pytest.approx((1 / 170) ** 3, rel=1e-12)
    assert ramp_ratio("exp", 11, 10, 180) == pytest.approx((1 - math.exp(-0.05)) / (1 - math.exp(-0.05 * 169)), rel=1e-12)
    assert ramp_ratio("exp", 178, 10, 180) < 1.0 == ramp_ratio("exp", 179, 10, 180)


@pytest.mark.parametrize("kind", list(RAMPS))
def test_one_shot_at_zero(kind: str) -> None:
    d = decide(kind, 0, 0, 0, total=5, target=0.75)
    assert (d.sparsity, d.update, d.final) == (0.75, True, True)
    later = decide(kind, 3, 0, 0, total=5, target=0.75)
    assert (later.sparsity, later.update, later.final) == (0.75, False, True)


@pytest.mark.parametrize("kind", list(RAMPS))
@pytest.mark.parametrize("start", [3, 7])
def test_start_equals_end_is_a_step(kind: str, start: int) -> None:
    got = [decide(kind, e, start, start, total=10, target=0.5) for e in range(10)]
    assert [d.sparsity for d in got] == [0.0] * start + [0.5] * (10 - start)
    assert [d.update for d in got] == [e == start for e in range(10)]
    assert [d.final for d in got] == [e >= start for e in range(10)]


def test_exp_with_one_step_ramp_has_no_nan() -> None:
    vals = [decide("exp", e, 4, 5, total=8, target=0.8).sparsity for e in range(8)]
    assert all(not math.isnan(v) for v in vals)
    assert vals == [0, 0, 0, 0, 0.8, 0.8, 0.8, 0.8]


@pytest.mark.parametrize("kind", list(RAMPS))
@pytest.mark.parametrize(("start", "end"), [(0, 0), (0, 1), (2, 3), (0, 9), (3, 17), (10, 180)])
def test_monotone_bounded_and_pure(kind: str, start: int, end: int) -> None:
    target = 0.9
    vals = [decide(kind, e, start, end, total=200, target=target).sparsity for e in range(200)]
    assert all(0.0 <= v <= target for v in vals)
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert vals[end] == target and all(v == 0.0 for v in vals[:start])
    # purity: asking again, in any order, gives the same answers
    again = [decide(kind, e, start, end, total=200, target=target).sparsity for e in reversed(range(200))]
    assert again[::-1] == vals


@pytest.mark.parametrize("kind", list(RAMPS))
def test_update_window_and_final_flag(kind: str) -> None:
    got = [decide(kind, e, 2, 5, total=8) for e in range(8)]
    assert [d.update for d in got] == [False, False, True, True, True, True, False, False]
    assert [d.final for d in got] == [False] * 5 + [True] * 3


@pytest.mark.parametrize(("start", "end", "total"), [(0, 6, 6), (5, 9, 6), (0, 10, 4)])
def test_window_outside_run_names_keys(start: int, end: int, total: int) -> None:
    with pytest.raises(PrunekitError, match="start.*end.*epochs"):
        decide("cubic", 0, start, end, total=total)


def test_bad_params_rejected() -> None:
    with pytest.raises(PrunekitError, match="end = 2 is before start = 3"):
        RampParams(3, 2)
    with pytest.raises(PrunekitError, match="start = -1"):
        RampParams(-1, 2)


def test_constant() -> None:
    c = Constant()
    p = Constant.Params(at=2)
    got = [c.prunekit_schedule(step=e, total_steps=5, target=0.6, params=p) for e in range(5)]
    assert [d.sparsity for d in got] == [0, 0, 0.6, 0.6, 0.6]
    assert [d.update for d in got] == [False, False, True, False, False]
    assert [d.final for d in got] == [False, False, True, True, True]
    d0 = c.prunekit_schedule(step=0, total_steps=0, target=0.6, params=None)
    assert (d0.sparsity, d0.update, d0.final) == (0.6, True, True)
    with pytest.raises(PrunekitError, match="at = 5"):
        c.prunekit_schedule(step=0, total_steps=5, target=0.6, params=Constant.Params(at=5))


def test_round_sparsity_geometric_and_linear() -> None:
    geo = [round_sparsity(k, 4, 0.9) for k in range(1, 5)]
    # each geometric round removes the same fraction of the survivors
    kept = [1.0] + [1 - s for s in geo]
    ratios = [b / a for a, b in zip(kept, kept[1:])]
    assert ratios == pytest.approx([0.1**0.25] * 4)
    assert geo[-1] == 0.9
    assert [round_sparsity(k, 4, 0.9, "linear") for k in range(1, 5)] == pytest.approx([0.225, 0.45, 0.675, 0.9])
    assert round_sparsity(4, 4, 0.9, "linear") == 0.9


@pytest.mark.parametrize("ramp", ["geometric", "linear"])
def test_iterative_rounds(ramp: str) -> None:
    it = Iterative()
    p = Iterative.Params(rounds=3, round_length=2, ramp=ramp)
    got = [it.prunekit_schedule(step=e, total_steps=8, target=0.8, params=p) for e in range(8)]
    assert [d.update for d in got] == [True, False, True, False, True, False, False, False]
    assert [d.final for d in got] == [False] * 4 + [True] * 4
    s = [d.sparsity for d in got]
    assert s[0] == s[1] < s[2] == s[3] < s[4] == 0.8 == s[7]
    assert all(0 <= v <= 0.8 for v in s)
    assert [it.prunekit_schedule(step=e, total_steps=8, target=0.8, params=p) for e in range(8)] == got


def test_iterative_must_fit_and_validates() -> None:
    with pytest.raises(PrunekitError, match="rounds \\* round_length"):
        Iterative().prunekit_schedule(step=0, total_steps=7, target=0.9, params=Iterative.Params(4, 2))
    with pytest.raises(PrunekitError, match="rounds = 0"):
        Iterative.Params(rounds=0)
    with pytest.raises(PrunekitError, match="ramp"):
        Iterative.Params(ramp="cubic")
    d = Iterative().prunekit_schedule(step=0, total_steps=1, target=0.9, params=Iterative.Params(rounds=1))
    assert (d.sparsity, d.update, d.final) == (0.9, True, True)
