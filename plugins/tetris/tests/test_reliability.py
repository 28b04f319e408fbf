"""What the reliability fuzzing found in the tetris / blocks selects (benches/results/reliability.md)."""

from __future__ import annotations

import pytest
import torch
from prunekit_tetris.components import BlockSelect, TetrisL1, TetrisParams, TetrisSelect

from prunekit import SelectionError
from prunekit.records import LayerInfo


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("select", [TetrisSelect, BlockSelect])
def test_non_finite_weights_are_a_selection_error_naming_the_layer(select, value):
    # before: Inf/NaN block sums gave a mask anyway, and W * mask (Inf * 0 = NaN) and the packed kernel
    # (the weight dropped) disagreed without an error
    w = torch.randn(32, 16)
    w[3, 5] = value
    layer = LayerInfo("fc", "linear", (32, 16))
    with pytest.raises(SelectionError, match=r"layer fc: 1 of 512 weights are NaN or infinite"):
        select().prunekit_select_mask(layer=layer, weight=w, scores=TetrisL1().prunekit_score(weight=w), sparsity=0.5,
                                      target=0.5, params=TetrisParams(block=[16, 1]))  # fmt: skip


def test_achieved_sparsity_is_an_exact_count():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    layer = LayerInfo("fc", "linear", (64, 48))
    sel = TetrisSelect().prunekit_select_mask(layer=layer, weight=w, scores=w.abs(), sparsity=0.75, target=0.75,
                                              params=TetrisParams(block=[16, 1]))  # fmt: skip
    assert sel.meta["achieved_sparsity"] == 1.0 - int(sel.mask.sum()) / sel.mask.numel() == 0.75
