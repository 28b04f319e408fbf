"""prunekit.blocks: the block geometry every block method and kernel shares."""

import pytest
import torch
import torch.nn.functional as F

from prunekit import LayoutError, SelectionError
from prunekit.blocks import RowBlocks, check_block_height, dense_module, resolve_block
from prunekit.records import LayerInfo


def test_zero_means_the_whole_dimension():
    assert resolve_block((64, 32, 3, 3), (16, 1, 0, 0), "x") == (16, 1, 3, 3)
    with pytest.raises(SelectionError, match="one block extent per dim"):
        resolve_block((64, 32), (16, 1, 0, 0), "layer fc")
    with pytest.raises(LayoutError, match="negative"):
        resolve_block((64, 32), (-1, 1), "layer fc", LayoutError)


@pytest.mark.parametrize("granularity, width", [("kernel", 9), ("tap", 1)])
def test_row_blocks_view_and_expand_are_inverse(granularity, width):
    info = LayerInfo("c", "conv2d", (12, 5, 3, 3))
    grid = RowBlocks.of(info, 4, granularity)
    w = torch.randn(12, 5, 3, 3)
    b = grid.blocks(w)
    assert b.shape == (3, grid.cols, 4 * width)
    # block (r, c) holds rows 4r..4r+3 of block column c
    assert torch.equal(b[1, 2], w.reshape(12, grid.cols, width)[4:8, 2].reshape(-1))
    keep = torch.rand(grid.shape) > 0.5
    mask = grid.expand(keep)
    assert torch.equal(grid.blocks(mask.float()).amax(-1).bool(), keep)
    assert grid.block == ((4, 1, 3, 3) if granularity == "kernel" else (4, 1, 1, 1))


def test_ragged_last_row_and_policies():
    info = LayerInfo("c", "conv2d", (10, 2, 1, 1))
    with pytest.raises(SelectionError, match="not a multiple of N=4"):
        RowBlocks.of(info, 4)
    assert RowBlocks.of(info, 4, cout_policy="skip") is None
    grid = RowBlocks.of(info, 4, cout_policy="ragged")
    assert grid.last_rows == 2 and grid.block_sizes()[-1].tolist() == [2, 2]
    with pytest.raises(SelectionError, match="grouped/depthwise"):
        RowBlocks.of(LayerInfo("dw", "conv2d", (8, 1, 3, 3), groups=8), 4)
    with pytest.raises(SelectionError, match="supported block height"):
        check_block_height(3)


def test_dense_module_computes_the_layer_for_grouped_convs_too():
    info = LayerInfo("g", "conv2d", (6, 2, 3, 3), has_bias=True, stride=(2, 2), padding=(1, 1), groups=3)
    w, b = torch.randn(6, 2, 3, 3), torch.randn(6)
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(dense_module(info, w, b)(x), F.conv2d(x, w, b, 2, 1, 1, 3))
    lin = LayerInfo("l", "linear", (3, 5))
    wl = torch.randn(3, 5)
    torch.testing.assert_close(dense_module(lin, wl, None)(torch.ones(2, 5)), torch.ones(2, 5) @ wl.t())


def test_bad_granularity_policy_and_negative_dim_are_named():
    info = LayerInfo("c", "conv2d", (8, 2, 3, 3))
    with pytest.raises(SelectionError, match="granularity = 'ragged' is unknown"):
        RowBlocks.of(info, 4, "ragged")
    with pytest.raises(SelectionError, match="cout_policy = 'pad' is unknown"):
        RowBlocks.of(info, 4, "kernel", "pad")
    with pytest.raises(SelectionError, match="negative extent for dim 2"):
        resolve_block((8, 2, 3, 3), (4, 1, -1, 0), "layer c")
