"""1xN block pruning: geometry, scores, selection, rearrangement, policies and the pipeline end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from prunekit_onexn.geometry import SUPPORTED_N, filter_order
from prunekit_onexn.params import OneXNParams
from prunekit_onexn.scores import BlockL1, BlockL2, BlockRandom
from prunekit_onexn.select import OneXNSelect
from torch import nn

from prunekit.errors import PrunekitError, SelectionError
from prunekit.masking import raw_weight
from prunekit.records import LayerInfo


def conv_info(cout: int = 64, cin: int = 32, k: int = 3, name: str = "conv", groups: int = 1) -> LayerInfo:
    return LayerInfo(name=name, kind="conv2d", weight_shape=(cout, cin // groups, k, k), groups=groups)


def select(layer, weight, scores, sparsity, params):  # noqa: ANN001, ANN201
    return OneXNSelect().prunekit_select_mask(
        layer=layer, weight=weight, scores=scores, sparsity=sparsity, params=params
    )


def l1(layer, weight, params):  # noqa: ANN001, ANN201
    return BlockL1().prunekit_score(layer=layer, weight=weight, params=params)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_block_shaped(mask: torch.Tensor, n: int, width: int) -> None:
    """Every N x width block of the GEMM view [Cout, K] is all kept or all pruned."""
    cout = mask.shape[0]
    g = mask.reshape(cout // n, n, -1, width)
    assert torch.equal(g.all(dim=(1, 3)), g.any(dim=(1, 3))), "a block is partly pruned"


def reference_block_l1(w: torch.Tensor, n: int) -> torch.Tensor:
    """The reference's view: W.permute(1,0,2,3) as [Cin*Cout/N, N*kh*kw], row j = (c = j // R, g = j % R)."""
    cout, cin = w.shape[:2]
    t = w.permute(1, 0, 2, 3).contiguous().view(cin * cout // n, -1).abs().sum(1)
    return t.view(cin, cout // n).T  # -> [R, Cin]


# ------------------------------------------------------------------ scores


def test_block_l1_matches_reference_layout() -> None:
    w = torch.randn(32, 16, 3, 3, generator=gen(0))
    for n in SUPPORTED_N:
        s = l1(conv_info(32, 16), w, OneXNParams(n=n))
        assert s.shape == (32 // n, 16)
        torch.testing.assert_close(s, reference_block_l1(w, n))


def test_block_l2_and_tap_granularity() -> None:
    w = torch.randn(8, 3, 3, 3, generator=gen(1))
    s = BlockL2().prunekit_score(layer=conv_info(8, 3), weight=w, params=OneXNParams(n=4))
    torch.testing.assert_close(s[1, 2], w[4:8, 2].norm())
    tap = l1(conv_info(8, 3), w, OneXNParams(n=4, granularity="tap"))
    assert tap.shape == (2, 27)
    # column 14 of the GEMM view = (cin 1, kh 1, kw 2)
    torch.testing.assert_close(tap[0, 14], w[0:4, 1, 1, 2].abs().sum())


def test_scores_do_not_modify_weight() -> None:
    w = torch.randn(16, 8, 3, 3, generator=gen(2))
    before = w.clone()
    l1(conv_info(16, 8), w, OneXNParams(n=4, rearrange=True))
    assert torch.equal(w, before)


# ------------------------------------------------------------------ selection


@pytest.mark.parametrize("n", SUPPORTED_N)
@pytest.mark.parametrize("p", [0.5, 0.75, 0.9])
def test_bottom_k_blocks_count_and_optimality(n: int, p: float) -> None:
    info, w = conv_info(64, 32), torch.randn(64, 32, 3, 3, generator=gen(n))
    params = OneXNParams(n=n)
    s = l1(info, w, params)
    sel = select(info, w, s, p, params)
    assert sel.mask.dtype == torch.bool and sel.mask.shape == w.shape
    assert sel.block == (n, 1, 3, 3)
    assert_block_shaped(sel.mask, n, 9)
    keep = sel.mask.reshape(64 // n, n, 32, 9)[:, 0, :, 0]
    blocks = keep.numel()
    assert int((~keep).sum()) == int(p * blocks)  # exactly floor(p * #blocks) blocks pruned
    assert s[~keep].max() <= s[keep].min()  # the pruned blocks are the lowest-scoring ones
    # within one block of the target, as a fraction of the layer's weights
    assert abs(sel.sparsity - p) <= 1.0 / blocks + 1e-9
    assert sel.meta["pruned_blocks"] == int(p * blocks)


def test_rows_are_non_uniform() -> None:
    # the 1xN select is layer-global: with a row of tiny weights, that row loses more blocks
    w = torch.randn(16, 32, 3, 3, generator=gen(3))
    w[:4] *= 0.01
    params = OneXNParams(n=4)
    sel = select(conv_info(16, 32), w, l1(conv_info(16, 32), w, params), 0.5, params)
    kept = sel.mask.reshape(4, 4, 32, 9)[:, 0, :, 0].sum(1)
    assert kept[0] == 0 and kept[1:].min() > 0
    assert sel.meta["kept_blocks_per_row"] == [0, int(kept.max())]


def test_tap_granularity_mask_is_n_by_one() -> None:
    info, w = conv_info(16, 4), torch.randn(16, 4, 3, 3, generator=gen(4))
    params = OneXNParams(n=8, granularity="tap")
    sel = select(info, w, l1(info, w, params), 0.5, params)
    assert sel.block == (8, 1, 1, 1)
    assert_block_shaped(sel.mask, 8, 1)
    # finer than a kernel block: some input channel has some taps kept and some pruned
    g = sel.mask.reshape(2, 8, 4, 9)[:, 0]
    assert (g.any(-1) & ~g.all(-1)).any()


def test_linear_block_is_n_outputs_by_one_input() -> None:
    info = LayerInfo(name="fc1", kind="linear", weight_shape=(32, 20))
    w = torch.randn(32, 20, generator=gen(5))
    params = OneXNParams(n=16)
    s = l1(info, w, params)
    assert s.shape == (2, 20)
    torch.testing.assert_close(s[1, 3], w[16:32, 3].abs().sum())
    sel = select(info, w, s, 0.75, params)
    assert sel.block == (16, 1)
    assert_block_shaped(sel.mask, 16, 1)
    assert int((~sel.mask).sum()) == 30 * 16


def test_random_is_seeded_and_without_replacement() -> None:
    info, w = conv_info(32, 32), torch.randn(32, 32, 3, 3)
    params = OneXNParams(n=4)

    def mask(seed: int) -> torch.Tensor:
        s = BlockRandom().prunekit_score(layer=info, weight=w, params=params, generator=gen(seed))
        return select(info, w, s, 0.5, params).mask

    a, b, c = mask(7), mask(7), mask(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # without replacement: exactly floor(p * #blocks) distinct blocks pruned (with replacement gives ~39%)
    assert int((~a).sum()) == int(0.5 * 8 * 32) * 4 * 9


# ------------------------------------------------------------------ rearrangement


def test_rearrangement_permutes_then_maps_back_exactly() -> None:
    info = conv_info(32, 16)
    w = torch.randn(32, 16, 3, 3, generator=gen(6)) * torch.rand(32, 1, 1, 1, generator=gen(9)) * 4
    params = OneXNParams(n=8, rearrange=True)
    s = l1(info, w, params)
    sel = select(info, w, s, 0.75, params)
    perm = sel.perms[0]
    assert len(sel.perms) == 4 and sel.perms[1:] == (None, None, None)
    assert torch.equal(perm, filter_order(w))
    f = w.abs().sum((1, 2, 3))
    assert torch.all(f[perm][1:] >= f[perm][:-1])  # ascending filter L1
    assert sorted(perm.tolist()) == list(range(32))
    # in permuted coordinates the mask is block-shaped; in original coordinates it is the scatter of that
    permuted = sel.mask[perm]
    assert_block_shaped(permuted, 8, 9)
    plain = select(info, w[perm], l1(info, w[perm], OneXNParams(n=8)), 0.75, OneXNParams(n=8)).mask
    assert torch.equal(permuted, plain)
    scattered = torch.empty_like(plain)
    scattered[perm] = plain
    assert torch.equal(sel.mask, scattered)
    assert sel.meta["rearranged"] is True


def test_rearranged_mask_is_not_block_shaped_in_original_order() -> None:
    # guards against a select that silently ignores the permutation
    info = conv_info(32, 16)
    w = torch.randn(32, 16, 3, 3, generator=gen(10)) * torch.rand(32, 1, 1, 1, generator=gen(11)) * 4
    params = OneXNParams(n=8, rearrange=True)
    mask = select(info, w, l1(info, w, params), 0.5, params).mask
    g = mask.reshape(4, 8, 16, 9)
    assert not torch.equal(g.all(dim=(1, 3)), g.any(dim=(1, 3)))


# ------------------------------------------------------------------ policies and errors


def test_cout_not_divisible_error_names_layer_cout_and_n() -> None:
    info, w = conv_info(24, 8, name="features.3"), torch.randn(24, 8, 3, 3)
    with pytest.raises(SelectionError, match=r"features\.3.*Cout=24.*N=16.*cout_policy"):
        l1(info, w, OneXNParams(n=16))


def test_cout_ragged_last_block_row_is_smaller() -> None:
    info, w = conv_info(24, 8), torch.randn(24, 8, 3, 3, generator=gen(12))
    params = OneXNParams(n=16, cout_policy="ragged")
    s = l1(info, w, params)
    assert s.shape == (2, 8)
    # the 8-channel last row is rescaled to a full block's L1
    torch.testing.assert_close(s[1, 5], w[16:24, 5].abs().sum() * 2)
    sel = select(info, w, s, 0.5, params)
    # blocks never straddle input channels: rows 0-15 share a pattern, rows 16-23 share a pattern
    m = sel.mask.reshape(24, 8, 9)
    assert torch.equal(m.all(-1), m.any(-1))
    assert (m[:16] == m[0]).all() and (m[16:] == m[16]).all()
    assert abs(sel.sparsity - 0.5) <= 16 * 9 / w.numel()
    assert sel.meta["last_block_rows"] == 8


def test_cout_skip_leaves_layer_dense() -> None:
    info, w = conv_info(24, 8), torch.randn(24, 8, 3, 3)
    params = OneXNParams(n=16, cout_policy="skip")
    sel = select(info, w, l1(info, w, params), 0.5, params)
    assert sel.mask.all() and "cout_policy=skip" in sel.dense_reason


def test_unsupported_n_and_values_are_refused() -> None:
    with pytest.raises(SelectionError, match="n = 3 .*2, 4, 8, 16, 32"):
        OneXNParams(n=3)
    with pytest.raises(SelectionError, match="granularity"):
        OneXNParams(granularity="row")
    with pytest.raises(SelectionError, match="cout_policy"):
        OneXNParams(cout_policy="pad")


def test_grouped_conv_and_tiny_layer_are_refused() -> None:
    with pytest.raises(SelectionError, match="layer dw .*groups=32.*exclude"):
        l1(conv_info(32, 32, name="dw", groups=32), torch.randn(32, 1, 3, 3), OneXNParams(n=4))
    with pytest.raises(SelectionError, match="layer head .*Cout=2 < N=4.*too small"):
        l1(conv_info(2, 8, name="head"), torch.randn(2, 8, 3, 3), OneXNParams(n=4, cout_policy="ragged"))


def test_mismatched_score_grid_is_refused() -> None:
    info, w = conv_info(16, 8), torch.randn(16, 8, 3, 3)
    with pytest.raises(SelectionError, match="scores have shape"):
        select(info, w, torch.rand(16, 8, 3, 3), 0.5, OneXNParams(n=4))


# ------------------------------------------------------------------ pipeline end to end


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.body(torch.relu(self.stem(x))))
        x = self.dw(x).mean((2, 3))
        return self.head(torch.relu(self.hidden(x)))


@pytest.mark.parametrize("score", ["onexn-l1", "onexn-l2", "onexn-random"])
def test_pipeline_masks_middle_layers_only(make_pipeline, score: str) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = Net()
    pipe = make_pipeline(score, "n = 8\nsparsity = 0.75\nrearrange = true")
    infos = pipe.attach(model)
    # stem and classifier dense by default, depthwise skipped by the host
    assert [i.name for i in infos] == ["body", "hidden"]
    pipe.step(0)
    x = torch.randn(2, 3, 8, 8)
    body = pipe.layers["body"].selection
    assert_block_shaped(body.mask[body.perms[0]], 8, 9)
    assert pipe.layers["hidden"].selection.block == (8, 1)
    # the network computes conv(x, W * mask): the permutation never changes the function
    w = raw_weight(model.body).detach()
    h = torch.relu(model.stem(x))
    torch.testing.assert_close(model.body(h), F.conv2d(h, w * body.mask, None, padding=1))
    y = model(x)
    pipe.compile()
    torch.testing.assert_close(model(x), y)
    assert torch.equal(model.body.weight == 0, ~body.mask | (w == 0))
    assert abs(pipe.sparsity() - 0.75) < 0.01


def test_pipeline_hard_mask_is_frozen_and_gets_no_gradient(make_pipeline) -> None:  # noqa: ANN001
    torch.manual_seed(1)
    model = Net()
    pipe = make_pipeline("onexn-l1", "n = 4\nsparsity = 0.5")
    pipe.attach(model)
    pipe.step(0)
    mask = pipe.layers["body"].selection.mask
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    g = raw_weight(model.body).grad
    assert torch.all(g[~mask] == 0) and torch.any(g[mask] != 0)
    pipe.step(1)  # the schedule freezes the mask after step 0
    assert torch.equal(pipe.layers["body"].selection.mask, mask)


def test_pipeline_rejects_bad_n_at_load(make_pipeline) -> None:  # noqa: ANN001
    with pytest.raises(PrunekitError, match="n = 5"):
        make_pipeline("onexn-l1", "n = 5")


def test_a_selected_grouped_conv_stays_dense_with_the_reason_or_fails_when_strict(make_pipeline) -> None:  # noqa: ANN001
    pipe = make_pipeline("onexn-l1", "n = 4\nskip_grouped = false")
    pipe.attach(Net())
    pipe.step(0)
    sel = pipe.layers["dw"].selection
    assert sel.mask.all() and "layer dw" in sel.dense_reason and "grouped" in sel.dense_reason
    assert pipe.layers["body"].selection.sparsity > 0  # the other layers are still pruned
    strict = make_pipeline("onexn-l1", "n = 4\nskip_grouped = false\nstrict = true")
    strict.attach(Net())
    with pytest.raises(SelectionError, match="layer dw .*grouped"):
        strict.step(0)
