"""The magnitude criterion: |w| of the effective (masked) weight."""

from __future__ import annotations

import attrs
import torch

from prunekit import hookimpl


class Magnitude:
    """|w| per weight of the masked weight W*mask (pruned weights score 0, so rounds stay nested)."""

    @attrs.define
    class Params:
        # Shared with select.threshold: with regrow the raw weight is scored, so a pruned weight that
        # is still large (e.g. a soft mask let it move) can come back.
        regrow: bool = False

    @hookimpl
    def prunekit_score(self, weight: torch.Tensor, mask: torch.Tensor | None, params: Params | None) -> torch.Tensor:
        regrow = params.regrow if params is not None else False
        w = weight.detach()
        if mask is not None and not regrow:
            w = w * mask.to(w.dtype)
        return w.abs().to(torch.float32)
