"""Refill / Refill+ (prunekit_lth.refill): method notes C and invariants I.5-I.7."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from prunekit_lth.refill import as_rows, channel_scores, criterion_needs, refill
from torch import nn

from prunekit.calibration import as_calibration, collect
from prunekit.errors import SelectionError
from prunekit.records import LayerStats

RHOS = (0.0, 0.1, 0.2, 0.5, 0.9, 1.0)


def expected_k(mask2: torch.Tensor, rho: float) -> int:
    cout, n = mask2.shape
    nu = Fraction(int(mask2.sum()), n)
    return min(cout, math.floor(nu + (cout - nu) * Fraction(rho)))


def imp_like(cout: int, n: int, density: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A magnitude-threshold mask of a random weight whose rows have different scales (as IMP leaves them)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, n, generator=g) * torch.rand(cout, 1, generator=g).mul(3).add(0.1)
    thresh = w.abs().flatten().kthvalue(max(1, int((1 - density) * w.numel()))).values
    return w, w.abs() > thresh


def random_mask(cout: int, n: int, density: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cout, n, generator=g), torch.rand(cout, n, generator=g) < density


CASES = [(kind, cout, n, d, s) for kind in ("imp", "random") for cout, n, d, s in
         ((16, 27, 0.3, 0), (64, 72, 0.5, 1), (33, 9, 0.8, 2), (8, 100, 0.05, 3))]  # fmt: skip


def make(kind: str, cout: int, n: int, d: float, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (imp_like if kind == "imp" else random_mask)(cout, n, d, s)


@pytest.mark.parametrize("case", CASES)
def test_exact_rows_are_all_or_nothing_and_count_is_k(case) -> None:
    w, m = make(*case)
    scores = channel_scores("l1", w, m, None)
    for rho in RHOS:
        res = refill(m, scores, rho)
        rowsum = res.mask.sum(1)
        n = m.shape[1]
        assert bool(((rowsum == 0) | (rowsum == n)).all()), "I.5: every row all-zero or all-one"
        assert res.k == expected_k(m, rho) == int(res.keep.sum()) == int((rowsum == n).sum())
        assert torch.equal(res.keep, rowsum == n)
        assert res.partial == ()


@pytest.mark.parametrize("case", CASES)
def test_kept_set_is_top_k_by_l1(case) -> None:
    w, m = make(*case)
    l1 = (w * m).abs().sum(1)  # the masked trained weights' l1, by hand
    scores = channel_scores("l1", w, m, None)
    assert torch.allclose(scores, l1.double(), rtol=1e-6)
    for rho in RHOS:
        res = refill(m, scores, rho)
        kept, dropped = l1[res.keep], l1[~res.keep]
        if kept.numel() and dropped.numel():
            assert float(kept.min()) >= float(dropped.max()), "I.6: every kept channel's l1 >= every dropped one's"
        order = sorted(range(len(scores)), key=lambda c: (-float(scores[c]), c))
        assert sorted(torch.nonzero(res.keep).flatten().tolist()) == sorted(order[: res.k])


def test_ties_go_to_the_lowest_index() -> None:
    m = torch.zeros(10, 4, dtype=torch.bool)
    m[:, :2] = True  # nu = 5, every channel scores the same
    res = refill(m, torch.ones(10), 0.0)
    assert torch.nonzero(res.keep).flatten().tolist() == [0, 1, 2, 3, 4]
    # K' = 5: four channels score 2, then three tie at 1 for the last place: the lowest index (4) wins
    scores = torch.tensor([0.0, 2.0, 2.0, 2.0, 1.0, 2.0, 1.0, 0.5, 1.0, 0.0])
    res = refill(m, scores, 0.0)
    assert torch.nonzero(res.keep).flatten().tolist() == [1, 2, 3, 4, 5]
    res = refill(m, scores.flip(0), 0.0)
    assert torch.nonzero(res.keep).flatten().tolist() == [1, 4, 6, 7, 8]  # 2s at 4, 6, 7, 8; 1s tie at 1, 3, 5


@pytest.mark.parametrize("case", CASES)
def test_density_within_one_row_and_monotone_in_rho(case) -> None:
    w, m = make(*case)
    cout, n = m.shape
    scores = channel_scores("l1", w, m, None)
    base = int(m.sum()) / (cout * n)
    res0 = refill(m, scores, 0.0)
    assert res0.density_before == pytest.approx(base)
    assert abs(res0.density_after - base) <= 1 / cout + 1e-12, "I.7: within one row of nu/Cout"
    assert res0.density_after <= base + 1e-12  # floor: never over the IMP budget
    prev_d, prev_keep = -1.0, torch.zeros(cout, dtype=torch.bool)
    for rho in [i / 20 for i in range(21)]:
        res = refill(m, scores, rho)
        assert res.density_after >= prev_d, "I.7: density non-decreasing in rho"
        assert bool((res.keep | ~prev_keep).all()), "kept sets nested as rho grows"
        prev_d, prev_keep = res.density_after, res.keep
    assert bool(refill(m, scores, 1.0).mask.all()), "I.7: rho = 1 is fully dense"


def test_rho_one_fills_even_empty_rows() -> None:
    m = torch.zeros(6, 5, dtype=torch.bool)
    m[0, :3] = True  # five empty rows (the reference leaves those empty, H.1)
    assert bool(refill(m, channel_scores("remain", torch.ones(6, 5), m, None), 1.0).mask.all())


def test_k_zero_keeps_no_channel() -> None:
    m = torch.zeros(8, 10, dtype=torch.bool)
    m[3, :4] = True  # nu = 0.4 < 1
    res = refill(m, torch.arange(8.0), 0.0)
    assert res.k == 0 and not bool(res.mask.any()), "exact mode does not resurrect a channel"
    ref = refill(m, torch.arange(8.0), 0.0, mode="reference", generator=torch.Generator().manual_seed(0))
    assert ref.k == 1 and bool(ref.mask[7].all()), "the reference keeps the top (tied-at-tau) channel"


@pytest.mark.parametrize("case", CASES)
def test_reference_mode_keeps_k_plus_one_without_ties(case) -> None:
    _w, m = make(*case)
    scores = torch.randn(m.shape[0], generator=torch.Generator().manual_seed(9))  # distinct: no ties at tau
    assert scores.unique().numel() == scores.numel()
    for rho in RHOS:
        res = refill(m, scores, rho, mode="reference", generator=torch.Generator().manual_seed(1))
        k = expected_k(m, rho)
        assert res.k == min(k + 1, m.shape[0])
        rowsum = res.mask.sum(1)
        assert bool(((rowsum == 0) | (rowsum == m.shape[1])).all()), "no ties: no partial rows"


def test_reference_mode_tied_rows_keep_partial_rows_and_pick_from_generator() -> None:
    m = torch.zeros(8, 10, dtype=torch.bool)
    for c, cnt in enumerate((10, 10, 9, 4, 4, 4, 1, 0)):
        m[c, :cnt] = True
    scores = channel_scores("remain", torch.ones(8, 10), m, None)  # 42 weights: nu = 4.2, K' = 4
    picks = set()
    for seed in range(12):
        res = refill(m, scores, 0.0, mode="reference", generator=torch.Generator().manual_seed(seed))
        # tau = 4th smallest count = 4: rows > 4 full, rows < 4 empty, one of the rows tied at 4 full
        assert bool(res.mask[:3].all()) and not bool(res.mask[6:].any())
        tied_full = [c for c in (3, 4, 5) if bool(res.mask[c].all())]
        assert len(tied_full) == 1
        for c in {3, 4, 5} - set(tied_full):
            assert torch.equal(res.mask[c], m[c]), "the other tied rows keep their original row (quirk)"
        assert res.partial == tuple(sorted({3, 4, 5} - set(tied_full)))
        again = refill(m, scores, 0.0, mode="reference", generator=torch.Generator().manual_seed(seed))
        assert torch.equal(again.mask, res.mask), "the draw comes from the generator"
        picks.add(tied_full[0])
    assert len(picks) > 1


@pytest.mark.parametrize("case", CASES)
def test_budget_mode_matches_the_budget(case) -> None:
    w, m = make(*case)
    cout, n = m.shape
    nnz = int(m.sum())
    scores = channel_scores("l1", w, m, None)
    for rho in RHOS:
        res = refill(m, scores, rho, mode="budget")
        want = min(cout * n, math.floor(nnz + (cout * n - nnz) * Fraction(rho)))
        assert int(res.mask.sum()) == want, "C.4: the unstructured parameter count, exactly"
        assert res.k == want // n
        rowsum = res.mask.sum(1)
        part = torch.nonzero((rowsum > 0) & (rowsum < n)).flatten().tolist()
        assert len(part) <= 1 and tuple(part) == res.partial
        if part:
            c = part[0]
            cols = want - res.k * n
            assert bool(res.mask[c, :cols].all()) and not bool(res.mask[c, cols:].any()), "first frac*n columns"
            order = sorted(range(cout), key=lambda i: (-float(scores[i]), i))
            assert order[res.k] == c, "the partial row is the next one by rank"
    assert int(refill(m, scores, 0.0, mode="budget").mask.sum()) == nnz


def test_meta_is_json_able() -> None:
    import json

    w, m = make(*CASES[0])
    res = refill(m, channel_scores("l1", w, m, None), 0.2, mode="budget")
    meta = json.loads(json.dumps(res.meta()))
    assert meta["kept_channels"] == res.k and meta["refill_mode"] == "budget" and meta["rho"] == 0.2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -0.1}, "rho"),
        ({"rho": 1.5}, "rho"),
        ({"rho": float("nan")}, "rho"),
        ({"mode": "fast"}, "mode"),
    ],
)
def test_invalid_arguments(kwargs, match) -> None:
    m = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(SelectionError, match=match):
        refill(m, torch.ones(4), **kwargs)


def test_invalid_shapes_and_values() -> None:
    m = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(SelectionError, match="one per output channel"):
        refill(m, torch.ones(5))
    with pytest.raises(SelectionError, match="row view"):
        refill(torch.ones(4, 3, 2, dtype=torch.bool), torch.ones(4))
    with pytest.raises(SelectionError, match="0/1"):
        refill(torch.full((4, 3), 0.5), torch.ones(4))
    with pytest.raises(SelectionError, match="NaN"):
        refill(m, torch.tensor([1.0, float("nan"), 0.0, 1.0]))
    assert refill(torch.ones(4, 3), torch.ones(4)).k == 4  # a 0/1 float mask is accepted


# ---------------------------------------------------------------------------------------- criteria


def test_remain_and_l1_criteria_by_hand() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 3, 3, 3, generator=g)
    m = torch.rand(6, 3, 3, 3, generator=g) < 0.4
    assert torch.equal(channel_scores("remain", w, m, None), m.reshape(6, -1).sum(1).double())
    hand = torch.tensor([sum(abs(float(w[c].flatten()[j])) for j in range(27) if m[c].flatten()[j]) for c in range(6)])
    assert torch.allclose(channel_scores("l1", w, m, None), hand.double(), rtol=1e-6)
    assert torch.allclose(channel_scores("l1", w, None, None), w.abs().sum((1, 2, 3)).double(), rtol=1e-6)


def test_criterion_needs() -> None:
    assert criterion_needs("l1") == set() == criterion_needs("remain")
    assert criterion_needs("fm-l1") == {"activations"} == criterion_needs("fm-l2")
    assert criterion_needs("saliency") == {"activations", "grads"}
    with pytest.raises(SelectionError, match="unknown"):
        criterion_needs("taylor")


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(5, 4, 3, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def _fm_setup() -> tuple[TwoConv, torch.Tensor, torch.Tensor, dict[str, LayerStats]]:
    torch.manual_seed(0)
    model = TwoConv().eval()
    x, y = torch.randn(6, 3, 9, 9), torch.randint(0, 3, (6,))
    stats = collect(model, {"a": model.a, "b": model.b}, as_calibration([(x, y)]), {"activations", "grads"})
    return model, x, y, stats


def test_feature_map_criteria_are_per_channel_and_per_layer() -> None:
    model, x, y, stats = _fm_setup()
    ya = model.a(x).detach()
    yb = model.b(torch.relu(model.a(x))).detach()
    for name, out in (("a", ya), ("b", yb)):
        w = getattr(model, name).weight
        hand_l1 = torch.tensor([out[:, c].abs().sum() for c in range(out.shape[1])])
        hand_l2 = torch.tensor([out[:, c].square().sum().sqrt() for c in range(out.shape[1])])
        assert torch.allclose(channel_scores("fm-l1", w, None, stats[name]).float(), hand_l1, rtol=1e-5)
        assert torch.allclose(channel_scores("fm-l2", w, None, stats[name]).float(), hand_l2, rtol=1e-5)
        # the reference's view(C, -1) without a transpose mixes samples and channels (H.1): not ours
        broken = out.reshape(out.shape[1], -1).abs().sum(1)
        assert not torch.allclose(channel_scores("fm-l1", w, None, stats[name]).float(), broken, rtol=1e-3)
    assert channel_scores("fm-l1", model.b.weight, None, stats["b"]).numel() == 4, "layer b scored by its own output"


def test_saliency_by_hand() -> None:
    model, x, y, stats = _fm_setup()
    ya = model.a(x)
    ya.retain_grad()
    out = model.head(torch.relu(model.b(torch.relu(ya))).mean((2, 3)))
    nn.functional.cross_entropy(out, y).backward()
    hand = (ya * ya.grad).sum((2, 3)).abs().sum(0).detach()
    got = channel_scores("saliency", model.a.weight, None, stats["a"]).float()
    assert torch.allclose(got, hand, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("criterion", ["fm-l1", "fm-l2", "saliency"])
def test_missing_stats_is_one_clear_error(criterion) -> None:
    w = torch.randn(4, 2, 3, 3)
    with pytest.raises(SelectionError, match=r"layer conv7: .*needs = .*calibration batches"):
        channel_scores(criterion, w, None, None, "conv7")
    partial = LayerStats(name="conv7", batches=1, samples=2, output_abs=torch.ones(4), output_sq=torch.ones(4))
    if criterion == "saliency":
        with pytest.raises(SelectionError, match="'grads'"):
            channel_scores(criterion, w, None, partial)
    with pytest.raises(SelectionError, match="another layer"):
        channel_scores("fm-l1", torch.randn(5, 2, 3, 3), None, partial)


def test_refill_with_feature_map_scores_keeps_the_strongest_outputs() -> None:
    model, x, _y, stats = _fm_setup()
    w = model.a.weight.detach()
    m = torch.ones_like(w, dtype=torch.bool)
    m[:, 1:] = False  # density 1/3 -> nu = 5/3 -> K' = 1
    res = refill(as_rows(m), channel_scores("fm-l1", w, m, stats["a"]), 0.0)
    hand = model.a(x).detach().abs().sum((0, 2, 3))
    assert res.k == 1 and int(torch.nonzero(res.keep)) == int(hand.argmax())
