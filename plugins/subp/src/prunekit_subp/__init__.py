"""prunekit-subp: SUBP, soft uniform block pruning (Xiang et al., NeurIPS 2023).

Blocks are 1xN (N consecutive output channels x one input channel, all kh x kw taps); every block-row keeps
the same number of blocks. Components: scores ``subp-l1`` (default criterion), ``subp-l2``, ``bpar``; select
``subp-uniform`` (per-row prune to the final count, then importance-sampled regrowth, soft masks).
"""

from prunekit_subp.geometry import SUPPORTED_N, RowGrid

__all__ = ["SUPPORTED_N", "RowGrid"]
