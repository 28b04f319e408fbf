"""Parameters shared by every onexn component (the host hands each key to every component declaring it)."""

from __future__ import annotations

import attrs

from prunekit_onexn.geometry import check_common


@attrs.define
class OneXNParams:
    """``n``: block height (output channels per block); ``granularity``: ``kernel`` (one input channel, all
    kh*kw taps, the papers' block) or ``tap`` (one weight column); ``cout_policy``: what to do when Cout is
    not a multiple of N (``error``, ``ragged`` last block-row, ``skip`` the layer); ``rearrange``: order
    output channels by filter L1 before forming blocks (score and select must agree, so both read it)."""

    n: int = 4
    granularity: str = "kernel"
    cout_policy: str = "error"
    rearrange: bool = False

    def __attrs_post_init__(self) -> None:
        check_common(self.n, self.granularity, self.cout_policy)
