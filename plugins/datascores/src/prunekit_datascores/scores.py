"""Data-aware per-weight scores. Both read the host's calibration statistics (``stats``), which the host
computes once per mask update because the components declare ``needs``; both return one score per weight,
so they pair with any per-weight select (``threshold``, ``blocks``, ``tetris``).

* Wanda (Sun et al., 2023): ``|W_ij| * ||X_j||_2``, the weight magnitude times the L2 norm of the input
  feature it multiplies, over every calibration row (conv: the im2col column ``(cin, kh, kw)``).
* Taylor (first order, SNIP-style): ``|W_ij * G_ij|`` with ``G`` the loss gradient of the effective
  weight summed over the calibration batches -- the first-order change of the loss when ``W_ij`` is
  removed. ``mode = "fisher"`` uses ``W_ij**2 * sum_b (dL_b/dW_ij)**2`` instead (the squared, per-batch
  accumulated form, which does not cancel between batches).

Scores are of the masked weight ``W * mask``, so a pruned weight scores 0 and rounds stay nested.
"""

from __future__ import annotations

import attrs
import torch

from prunekit import PrunekitError, SelectionError, hookimpl
from prunekit.records import LayerInfo, LayerStats

TAYLOR_MODES = ("first-order", "fisher")


def _masked(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().to(torch.float32)
    return w if mask is None else w * mask.to(w.dtype)


def _need(stats: LayerStats | None, field: str, layer: LayerInfo, who: str) -> torch.Tensor:
    value = getattr(stats, field, None) if stats is not None else None
    if value is None:
        raise SelectionError(
            f"layer {layer.name}: score '{who}' got no calibration statistic '{field}'; run it through a prunekit "
            "pipeline with calibration batches (pipeline.set_calibration(batches))"
        )
    return value


def column_norms(layer: LayerInfo, input_sq: torch.Tensor) -> torch.Tensor:
    """``||X_j||_2`` broadcast to the weight's shape (conv rows of group g read group g's channels)."""
    shape = tuple(layer.weight_shape)
    norms = input_sq.to(torch.float32).clamp_min(0).sqrt()
    if layer.kind == "linear":
        return norms.reshape(1, shape[1]).expand(shape)
    cout, cpg, kh, kw = shape
    groups = layer.groups
    per_group = norms.reshape(groups, cpg, kh, kw)  # channels are contiguous per group
    return per_group.repeat_interleave(cout // groups, dim=0)


def wanda_scores(layer: LayerInfo, weight: torch.Tensor, mask: torch.Tensor | None, stats: LayerStats | None) -> torch.Tensor:
    sq = _need(stats, "input_sq", layer, "wanda")
    return _masked(weight, mask).abs() * column_norms(layer, sq).to(weight.device)


def taylor_scores(
    layer: LayerInfo, weight: torch.Tensor, mask: torch.Tensor | None, stats: LayerStats | None, mode: str = "first-order"
) -> torch.Tensor:
    w = _masked(weight, mask)
    if mode == "fisher":
        return w.square() * _need(stats, "grad_sq", layer, "taylor").to(w.device)
    return (w * _need(stats, "grad", layer, "taylor").to(w.device)).abs()


class Wanda:
    """Wanda: |W| x L2 norm of the input column over the calibration data (needs activations)."""

    needs = frozenset({"activations"})

    @hookimpl
    def prunekit_score(
        self, layer: LayerInfo, weight: torch.Tensor, mask: torch.Tensor | None, stats: LayerStats | None
    ) -> torch.Tensor:
        return wanda_scores(layer, weight, mask, stats)


class Taylor:
    """First-order Taylor |W x dL/dW| accumulated over calibration batches (needs labelled data)."""

    needs = frozenset({"grads"})

    @attrs.define
    class Params:
        mode: str = "first-order"  # or "fisher": W^2 x sum over batches of (dL/dW)^2

        def __attrs_post_init__(self) -> None:
            if self.mode not in TAYLOR_MODES:
                raise PrunekitError(f"mode = {self.mode!r} is unknown; use one of {', '.join(TAYLOR_MODES)}")

    @hookimpl
    def prunekit_score(
        self, layer: LayerInfo, weight: torch.Tensor, mask: torch.Tensor | None, params: Params | None, stats: LayerStats | None
    ) -> torch.Tensor:
        return taylor_scores(layer, weight, mask, stats, (params or Taylor.Params()).mode)
