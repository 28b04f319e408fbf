"""SUBP: uniform rows, the Z(e) rounding, sampled regrowth, BPAR invariants, soft masks, pipeline runs."""

from __future__ import annotations

import copy

import pytest
import torch
from prunekit_subp.scores import BPAR, BPARParams, ScoreParams, SubpL1, SubpL2, bpar
from prunekit_subp.select import SelectParams, UniformSelect
from torch import nn

from prunekit.errors import PrunekitError, SelectionError
from prunekit.masking import raw_weight
from prunekit.records import LayerInfo


def conv_info(cout: int = 64, cin: int = 32, k: int = 3, name: str = "conv", groups: int = 1) -> LayerInfo:
    return LayerInfo(name=name, kind="conv2d", weight_shape=(cout, cin // groups, k, k), groups=groups)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def l1(info, w, mask=None, **kw):  # noqa: ANN001, ANN003, ANN201
    return SubpL1().prunekit_score(layer=info, weight=w, mask=mask, params=ScoreParams(**kw))


def select(info, w, scores, sparsity, target, seed=0, **kw):  # noqa: ANN001, ANN003, ANN201
    return UniformSelect().prunekit_select_mask(
        layer=info,
        weight=w,
        scores=scores,
        sparsity=sparsity,
        target=target,
        params=SelectParams(**kw),
        generator=gen(seed),
    )


def block_keep(mask: torch.Tensor, n: int) -> torch.Tensor:
    """[R, Cin] block decisions; asserts every block is all kept or all pruned."""
    cout, cin = mask.shape[:2]
    g = mask.reshape(cout // n, n, cin, -1)
    assert torch.equal(g.all(dim=(1, 3)), g.any(dim=(1, 3))), "a block is partly pruned"
    return g.all(dim=(1, 3))


def z_of(p: float, p_e: float, cin: int) -> int:
    return int(p * cin) - int((p - p_e) * cin)


# ------------------------------------------------------------------ uniform selection


@pytest.mark.parametrize(("n", "p", "p_e"), [(16, 0.75, 0.5), (4, 0.9, 0.9), (8, 0.5, 0.1), (32, 0.75, 0.75)])
def test_every_row_zeroes_exactly_z_blocks(n: int, p: float, p_e: float) -> None:
    info, w = conv_info(64, 40), torch.randn(64, 40, 3, 3, generator=gen(n))
    sel = select(info, w, l1(info, w, n=n), p_e, p, n=n)
    keep = block_keep(sel.mask, n)
    zeros = (~keep).sum(1)
    assert torch.all(zeros == z_of(p, p_e, 40)), zeros
    assert sel.block == (n, 1, 3, 3)
    assert sel.meta["zero_blocks_per_row"] == z_of(p, p_e, 40)
    assert sel.soft and sel.pruned_decay == 2e-4


def test_z_reproduces_the_reference_rounding_not_floor() -> None:
    # Cin = 64, p = 60/128, cubic ramp at epoch 11 of 10..180: p_e * Cin ~ 1e-5, yet one block per row goes
    p = 60 / 128
    p_e = p * ((11 - 10) / 170) ** 3
    assert int(p_e * 64) == 0 and z_of(p, p_e, 64) == 1
    info, w = conv_info(32, 64), torch.randn(32, 64, 3, 3, generator=gen(1))
    keep = block_keep(select(info, w, l1(info, w), p_e, p).mask, 16)
    assert torch.all((~keep).sum(1) == 1)


def test_pruning_alone_takes_each_rows_lowest_scores() -> None:
    info, w = conv_info(64, 32), torch.randn(64, 32, 3, 3, generator=gen(2))
    s = l1(info, w)
    keep = block_keep(select(info, w, s, 0.75, 0.75).mask, 16)
    k = int(0.75 * 32)
    for r in range(4):
        assert set(torch.nonzero(~keep[r]).flatten().tolist()) == set(torch.argsort(s[r])[:k].tolist())


def test_regrowth_is_a_subset_of_the_pruned_candidates_and_all_at_zero() -> None:
    info, w = conv_info(64, 32), torch.randn(64, 32, 3, 3, generator=gen(3))
    s = l1(info, w)
    final = block_keep(select(info, w, s, 0.75, 0.75).mask, 16)
    partial = block_keep(select(info, w, s, 0.3, 0.75).mask, 16)
    assert torch.all(partial | ~final == True)  # noqa: E712  kept at the end => kept now
    assert (partial & ~final).any()  # and something was regrown
    assert select(info, w, s, 0.0, 0.75).mask.all()  # p_e = 0: every candidate regrows


def test_regrowth_is_seeded_and_prefers_higher_scores() -> None:
    info, w = conv_info(64, 32), torch.randn(64, 32, 3, 3, generator=gen(4))
    s = l1(info, w)
    a, b, c = (select(info, w, s, 0.4, 0.75, seed=k).mask for k in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # 512 identical rows of 8 blocks: prune 6, regrow 3; the best candidate must come back more often
    grid_scores = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 5.0, 9.0, 9.0]).repeat(512, 1)
    info8 = LayerInfo(name="fc", kind="linear", weight_shape=(512 * 4, 8))
    keep = select(info8, torch.zeros(512 * 4, 8), grid_scores, 0.375, 0.75, n=4).mask[::4]
    assert torch.all(keep[:, 6:]) and torch.all((~keep[:, :6]).sum(1) == 3)
    freq = keep[:, :6].float().mean(0)
    assert freq[5] > freq[0] + 0.1


def test_v2_freezes_the_mask_once_the_ramp_ends() -> None:
    info, w = conv_info(32, 32), torch.randn(32, 32, 3, 3, generator=gen(7))
    first = select(info, w, l1(info, w), 0.75, 0.75).mask
    # V2 scores W*mask: masked blocks score 0 and stay pruned whatever the raw weights do
    w2 = w.clone()
    w2[~first] *= 100.0
    again = select(info, w2, l1(info, w2, first), 0.75, 0.75, seed=9).mask
    assert torch.equal(first, again)
    assert not torch.equal(first, select(info, w2, l1(info, w2, first, scoring="v1"), 0.75, 0.75).mask)


def test_l2_and_linear_blocks() -> None:
    info = LayerInfo(name="fc1", kind="linear", weight_shape=(32, 24))
    w = torch.randn(32, 24, generator=gen(8))
    s = SubpL2().prunekit_score(layer=info, weight=w, mask=None, params=ScoreParams(n=16))
    torch.testing.assert_close(s[1, 3], w[16:, 3].norm())
    sel = select(info, w, s, 0.5, 0.5)
    assert sel.block == (16, 1)
    assert torch.all((~block_keep(sel.mask, 16)).sum(1) == 12)


def test_hard_option_and_parameters() -> None:
    info, w = conv_info(32, 16), torch.randn(32, 16, 3, 3)
    sel = select(info, w, l1(info, w), 0.5, 0.5, hard=True)
    assert not sel.soft and sel.pruned_decay == 0.0
    with pytest.raises(SelectionError, match="n = 12"):
        SelectParams(n=12)
    with pytest.raises(SelectionError, match="scoring"):
        ScoreParams(scoring="v3")
    with pytest.raises(SelectionError, match="tau"):
        SelectParams(tau=0.0)


# ------------------------------------------------------------------ BPAR


def bpar_loop(b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Straight transcription of B.3 for one row of blocks [Cin, E] (mask all ones, row not all zero)."""
    l1n = b.abs().sum(1)
    a = l1n / l1n.sum()
    u = [x / x.norm() if x.norm() > 0 else torch.zeros_like(x) for x in b]
    c = torch.tensor([sum(abs(float(ui @ un)) for un in u) for ui in u])
    ch = c / c.sum()
    ch[ch == 0] = 1.0
    return a - alpha * ch


def test_bpar_matches_the_formula_and_its_invariants() -> None:
    info, w = conv_info(32, 12, 1), torch.randn(32, 12, 1, 1, generator=gen(10))
    s = BPAR().prunekit_score(layer=info, weight=w, mask=None, params=BPARParams())
    blocks = w.reshape(2, 16, 12).transpose(1, 2)
    for r in range(2):
        torch.testing.assert_close(s[r], bpar_loop(blocks[r], 1.0), rtol=1e-5, atol=1e-6)
    a = BPAR().prunekit_score(layer=info, weight=w, mask=None, params=BPARParams(alpha=0.0))
    torch.testing.assert_close(a.sum(1), torch.ones(2))  # sum_j a_j = 1 per row
    # masked blocks score exactly -alpha (V2)
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[:16, 3] = False
    mask[16:, 7] = False
    sm = BPAR().prunekit_score(layer=info, weight=w, mask=mask, params=BPARParams(alpha=0.7))
    assert sm[0, 3] == -0.7 and sm[1, 7] == -0.7
    assert sm[0, 3] < sm[0].masked_fill(torch.arange(12) == 3, 9).min()


def test_bpar_prunes_a_duplicated_block_first() -> None:
    # one row of 4 blocks of 4 weights: e0 three times, e1 once, all with the same L1
    b = torch.zeros(4, 4, 1, 1)
    b[:, 0] = torch.tensor([1.0, 0, 0, 0]).view(4, 1, 1)
    b[:, 1] = b[:, 0]
    b[:, 2] = b[:, 0]
    b[:, 3] = torch.tensor([0, 1.0, 0, 0]).view(4, 1, 1)
    info = LayerInfo(name="c", kind="conv2d", weight_shape=(4, 4, 1, 1))
    s = BPAR().prunekit_score(layer=info, weight=b, mask=None, params=BPARParams(n=4))
    assert torch.all(s[0, :3] < s[0, 3])
    keep = block_keep(select(info, b, s, 0.25, 0.25, n=4).mask, 4)
    assert keep[0, 3] and (~keep[0, :3]).sum() == 1


def test_bpar_all_zero_row_is_guarded() -> None:
    blocks = torch.zeros(2, 8, 9)
    blocks[1] = torch.randn(8, 9)
    s = bpar(blocks, torch.ones_like(blocks))
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s[0], torch.full((8,), 1 / 8 - 1.0))


# ------------------------------------------------------------------ errors and policies


def test_bad_layers_are_refused_with_the_fix() -> None:
    with pytest.raises(SelectionError, match="layer dw .*groups=8.*exclude"):
        l1(conv_info(8, 8, name="dw", groups=8), torch.randn(8, 1, 3, 3), n=4)
    with pytest.raises(SelectionError, match=r"layer head .*Cout=8 < N=16"):
        l1(conv_info(8, 8, name="head"), torch.randn(8, 8, 3, 3))
    with pytest.raises(SelectionError, match="Cout=24 is not a multiple of N=16.*cout_policy"):
        l1(conv_info(24, 8), torch.randn(24, 8, 3, 3))
    info, w = conv_info(32, 8, name="l3"), torch.randn(32, 8, 3, 3)
    with pytest.raises(SelectionError, match="layer l3: .*leaves no block in a row"):
        select(info, w, l1(info, w), 1.0, 1.0)


def test_ragged_rows_stay_uniform_and_tiny_layers_stay_dense() -> None:
    info, w = conv_info(24, 16), torch.randn(24, 16, 3, 3, generator=gen(11))
    sel = select(info, w, l1(info, w, cout_policy="ragged"), 0.5, 0.5, cout_policy="ragged")
    m = sel.mask.reshape(24, 16, 9)
    assert (m[:16] == m[0]).all() and (m[16:] == m[16]).all()
    assert int((~m[0, :, 0]).sum()) == int((~m[16, :, 0]).sum()) == 8
    info3, w3 = conv_info(16, 3), torch.randn(16, 3, 3, 3)
    tiny = select(info3, w3, l1(info3, w3), 0.3, 0.3)  # int(0.3 * 3) = 0 blocks
    assert tiny.mask.all() and "stays dense" in tiny.meta["note"]


# ------------------------------------------------------------------ soft masks and the pipeline


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.body(torch.relu(self.stem(x)))).mean((2, 3))
        return self.head(torch.relu(self.hidden(x)))


def test_soft_mask_gradient_is_ste_plus_decay(make_pipeline) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = Net()
    pipe = make_pipeline("subp-l1", "n = 16\nsparsity = 0.75")
    assert [i.name for i in pipe.attach(model)] == ["body", "hidden"]  # first and last dense by default
    pipe.step(0)
    pipe.step(1)  # p_e = 0.25 of 0.75: uniform partial mask
    mask = pipe.layers["body"].selection.mask
    assert not mask.all() and pipe.layers["body"].selection.soft
    x = torch.randn(4, 3, 8, 8)
    model(x).square().sum().backward()
    w = raw_weight(model.body)
    # the same loss on a plain model whose body weight is W * mask: its gradient is dL/d(W*mask)
    plain = Net()
    plain.load_state_dict(
        {k: v for k, v in copy.deepcopy(model).state_dict().items() if "parametrizations" not in k}, strict=False
    )
    with torch.no_grad():
        plain.body.weight.copy_(w * mask)
        plain.hidden.weight.copy_(raw_weight(model.hidden) * pipe.layers["hidden"].selection.mask)
    plain(x).square().sum().backward()
    g_eff = plain.body.weight.grad
    torch.testing.assert_close(w.grad[mask], g_eff[mask])
    torch.testing.assert_close(w.grad[~mask], g_eff[~mask] + 2e-4 * w.detach()[~mask])
    assert torch.any(w.grad[~mask] != 0)


def test_soft_pruned_weights_evolve_and_regrow_hard_ones_do_not_change(make_pipeline) -> None:  # noqa: ANN001
    for hard in (False, True):
        torch.manual_seed(1)
        model = Net()
        pipe = make_pipeline("subp-l1", f"n = 16\nsparsity = 0.75\nhard = {str(hard).lower()}")
        pipe.attach(model)
        pipe.step(0)
        pipe.step(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        w = raw_weight(model.body)
        mask = pipe.layers["body"].selection.mask
        before = w.detach().clone()
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 3, 8, 8)).square().mean().backward()
            opt.step()
        moved = (w.detach() != before)[~mask]
        if hard:
            assert not moved.any()
            continue
        assert moved.all()
        # the next rebuild samples regrowth among the blocks pruned to the final count again: blocks pruned
        # now can come back, with the values they evolved to (not re-initialised)
        pipe.step(2)
        regrown = pipe.layers["body"].selection.mask & ~mask
        assert regrown.any()
        torch.testing.assert_close(model.body.weight[regrown], w.detach()[regrown])
        assert torch.all(model.body.weight[regrown] != before[regrown])


def test_pipeline_ramp_is_uniform_every_step_and_seeded(make_pipeline) -> None:  # noqa: ANN001
    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(2)
        model = Net()
        pipe = make_pipeline("bpar", f"n = 16\nsparsity = 0.75\nseed = {seed}")
        pipe.attach(model)
        masks = []
        for e in range(6):
            pipe.step(e)
            sel = pipe.layers["body"].selection
            cin = 16
            target_e = 0.75 * min(e / 3, 1.0)
            zeros = (~block_keep(sel.mask, 16)).sum(1)
            assert torch.all(zeros == z_of(0.75, target_e, cin))
            hidden = (~block_keep(pipe.layers["hidden"].selection.mask.view(32, 32, 1, 1), 16)).sum(1)
            assert torch.all(hidden == z_of(0.75, target_e, 32))
            masks.append(sel.mask.clone())
        return masks

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    assert torch.equal(a[3], a[5])  # the schedule stops updating after its end: masks frozen
    assert a[0].all()  # p_e = 0: all regrown


def test_pipeline_rejects_bad_values_at_load(make_pipeline) -> None:  # noqa: ANN001
    with pytest.raises(PrunekitError, match="n = 7"):
        make_pipeline("bpar", "n = 7")
    with pytest.raises(PrunekitError, match="pruned_decay"):
        make_pipeline("subp-l1", "pruned_decay = -1.0")


def test_registry_sections_load_with_their_params() -> None:
    pytest.importorskip("prunekit_schedules")
    pytest.importorskip("prunekit_onexn")
    from pathlib import Path

    from prunekit.pipeline import Pipeline

    registry = Path(__file__).resolve().parents[3] / "registry.toml"
    subp = Pipeline.load("subp-1x16", registry)
    assert subp.component_params["select"].n == subp.component_params["score"].n == 16
    assert subp.host.keep_first_dense and subp.host.keep_last_dense
    rearranged = Pipeline.load("onexn-rearrange-n16", registry)
    assert rearranged.component_params["score"].rearrange and rearranged.component_params["select"].rearrange
    assert Pipeline.load("onexn-l1-n4", registry).component_params["select"].n == 4
