"""prunekit TETRIS: reorder weight dims so small weights gather into blocks, then prune whole blocks."""

from prunekit_tetris.components import BlockSelect, TetrisL1, TetrisSelect
from prunekit_tetris.geometry import BlockPlan, plan_blocks
from prunekit_tetris.tiling import TileResult, tile

__all__ = ["BlockPlan", "BlockSelect", "TetrisL1", "TetrisSelect", "TileResult", "plan_blocks", "tile"]
