"""prunekit-onexn: 1xN block pruning (N consecutive output channels x one input channel, all kh x kw taps).

Components: scores ``onexn-l1`` (default), ``onexn-l2``, ``onexn-random``; select ``onexn`` (layer-global
bottom-k of blocks, optional filter rearrangement carried as ``Selection.perms[0]``).
"""

from prunekit_onexn.geometry import SUPPORTED_N, BlockGrid, filter_order

__all__ = ["SUPPORTED_N", "BlockGrid", "filter_order"]
