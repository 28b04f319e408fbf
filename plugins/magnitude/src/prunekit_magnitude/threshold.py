"""Han's selection: prune every weight whose score is strictly below a threshold.

The threshold comes from one of two rules:

* ``quantile`` (default): the score of rank ``k = round(sparsity * n)`` in ascending order, so the ``k``
  smallest are pruned. Weights tied at the threshold: ``ties = "break"`` (default) prunes the first of
  them in index order (layer order, then flat index, for ``global``) so exactly ``k`` are pruned;
  ``ties = "keep"`` is Han's strict ``score < t`` and keeps them all, which leaves the achieved sparsity
  up to ``ties / n`` below the request -- with data-aware scores many weights score exactly 0 (inputs
  that are always zero), and the strict rule then prunes far less than asked. ``scope = "global"`` takes
  one threshold over all selected layers' scores pooled (layers end up with different sparsities, the
  total hits the request).
* ``std`` (Han's ``q * std(W)``): ``t = quality * (sparsity / target) * spread``, with ``spread`` the
  standard deviation of the layer's dense weight at its first selection (``global``: the RMS of all
  layers' weights pooled) and ``quality`` Han's per-layer quality parameter (``layer_quality`` maps layer
  name globs to their own ``q``). The schedule's ramp scales the threshold, so iterative rounds prune
  progressively and the last round uses ``q * spread``; the sparsity is an *outcome* of ``q``, not the
  requested value (the achieved figure is in ``meta``).

Masks are nested across rounds (``new = old & (score >= t)``) unless ``regrow`` is set.

Non-finite weights or scores (NaN, Inf: a diverged training) have no threshold: the select raises
SelectionError naming the layer (the host keeps the layer dense with that reason, or fails with ``strict``);
with ``scope = "global"`` a non-finite layer spoils the pooled threshold of every layer. When the achieved
sparsity falls short of the request by more than one weight in a thousand under the quantile rule (ties
kept with ``ties = "keep"``: e.g. a layer that is all zeros), a ``SparsityShortfall`` warning says so, with
both figures; ``meta`` has ``requested_sparsity`` and ``achieved_sparsity`` (pooled ones for global scope).
"""

from __future__ import annotations

import fnmatch
import math
import warnings

import attrs
import torch

from prunekit import Selection, SelectionError, hookimpl
from prunekit.records import LayerInfo

RULES = ("quantile", "std")
SCOPES = ("layer", "global")
SHORTFALL = 1e-3  # achieved below requested by more than this (fraction of weights): warn


class SparsityShortfall(UserWarning):
    """The threshold pruned noticeably less than the requested sparsity (ties kept, e.g. an all-zero layer)."""


def _count(mask: torch.Tensor) -> int:
    """True entries, without the int64 copy of ``mask.sum()`` (784 MiB for VGG16's fc6)."""
    return int(torch.count_nonzero(mask))


def _non_finite(t: torch.Tensor) -> int:
    return t.numel() - _count(torch.isfinite(t))


def check_finite(layer: LayerInfo, weight: torch.Tensor, scores: torch.Tensor, all_scores: dict[str, torch.Tensor],
                 scope: str) -> None:  # fmt: skip
    """SelectionError when this layer's weights or scores (for a global threshold: any layer's) are NaN/Inf."""
    fix = ("fix the weights first (NaN/Inf after training usually means it diverged: lower lr); "
           "the layer stays dense unless strict = true")  # fmt: skip
    bad_w, bad_s = _non_finite(weight), _non_finite(scores)
    if bad_w or bad_s:
        what = f"{bad_w} of {weight.numel()} weights" if bad_w else f"{bad_s} of {scores.numel()} scores"
        raise SelectionError(f"layer {layer.name}: {what} are NaN or infinite; no threshold orders them: {fix}")
    if scope == "global":
        spoilt = [n for n, sc in all_scores.items() if n != layer.name and _non_finite(sc)]
        if spoilt:
            raise SelectionError(
                f"layer {layer.name}: the global threshold pools layer {spoilt[0]}, whose scores are NaN or infinite "
                f"({len(spoilt)} such layer(s)); {fix}"
            )


def quantile_threshold(flat: torch.Tensor, sparsity: float) -> float:
    """The value ``t`` such that pruning ``flat < t`` removes the ``round(sparsity * n)`` smallest (ties kept)."""
    n = flat.numel()
    k = int(math.floor(sparsity * n + 0.5))
    if k <= 0 or n == 0:
        return 0.0  # scores are >= 0: nothing is strictly below
    if k >= n:
        return math.inf
    return float(torch.kthvalue(flat.float().cpu(), k + 1).values)


def _pooled(all_scores: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([s.detach().reshape(-1).float().cpu() for s in all_scores.values()])


def tied_to_prune(flat: torch.Tensor, t: float, k: int, offset: int, size: int) -> torch.Tensor:
    """Bool over ``flat[offset:offset+size]``: the entries equal to ``t`` that exact-count pruning takes
    (the first ``k - count(flat < t)`` ties of ``flat`` in index order)."""
    need = k - int((flat < t).sum())
    tied = flat == t
    if need <= 0 or not math.isfinite(t):
        return torch.zeros(size, dtype=torch.bool)
    rank = torch.cumsum(tied.to(torch.int64), 0) - 1  # tie rank of each tied entry, in index order
    pick = tied & (rank < need)
    return pick[offset : offset + size]


class Threshold:
    """Prune |w| < t: t from the sparsity quantile (layer or global) or Han's q*std(W); nested masks."""

    @attrs.define
    class Params:
        scope: str = "layer"
        rule: str = "quantile"
        quality: float = 1.0
        layer_quality: dict[str, float] = attrs.field(factory=dict)
        regrow: bool = False
        ties: str = "break"

        def __attrs_post_init__(self) -> None:
            if self.ties not in ("break", "keep"):
                raise SelectionError(f"ties = {self.ties!r} is unknown; use \"break\" (exact count) or \"keep\" (strict score < t)")
            if self.scope not in SCOPES:
                raise SelectionError(f"scope = {self.scope!r} is unknown; use \"layer\" or \"global\"")
            if self.rule not in RULES:
                raise SelectionError(f"rule = {self.rule!r} is unknown; use \"quantile\" or \"std\" (Han's q * std(W))")
            for name, q in {"quality": self.quality, **self.layer_quality}.items():
                if not q >= 0.0 or math.isinf(q):
                    raise SelectionError(f"quality for {name} = {q}; Han's quality parameter must be a finite q >= 0")

        def quality_for(self, layer: str) -> float:
            for pattern, q in self.layer_quality.items():
                if fnmatch.fnmatchcase(layer, pattern):
                    return q
            return self.quality

    @hookimpl
    def prunekit_select_mask(
        self,
        layer: LayerInfo,
        weight: torch.Tensor,
        scores: torch.Tensor,
        sparsity: float,
        target: float,
        previous: Selection | None,
        params: Params | None,
        all_scores: dict[str, torch.Tensor],
    ) -> Selection:
        p = params or Threshold.Params()
        if tuple(scores.shape) != tuple(weight.shape):
            raise SelectionError(
                f"layer {layer.name}: select 'threshold' needs one score per weight {tuple(weight.shape)}, got "
                f"{tuple(scores.shape)}; pair it with a per-weight score such as 'magnitude'"
            )
        check_finite(layer, weight, scores, all_scores or {layer.name: scores}, p.scope)
        meta: dict = {"criterion": "magnitude", "rule": p.rule, "scope": p.scope, "requested_sparsity": sparsity}
        tie_break = None
        pooled_pruned = None
        if p.rule == "quantile":
            flat = scores.reshape(-1).float().cpu() if p.scope == "layer" else _pooled(all_scores)
            t = quantile_threshold(flat, sparsity)
            k = int(math.floor(sparsity * flat.numel() + 0.5))
            if p.ties == "break":
                offset = 0
                if p.scope == "global":
                    names = list(all_scores)
                    offset = sum(all_scores[n].numel() for n in names[: names.index(layer.name)])
                tie_break = tied_to_prune(flat, t, k, offset, scores.numel()).reshape(scores.shape).to(scores.device)
            if p.scope == "global":  # what this threshold prunes over all layers (before nesting)
                exact = p.ties == "break" and math.isfinite(t) and k > 0
                pooled_pruned = k if exact else _count(flat < t)
        else:
            spread = previous.meta.get("spread") if previous is not None else None
            if spread is None:  # first selection: the dense weight's spread, kept for every later round
                if p.scope == "layer":
                    spread = float(weight.detach().float().std()) if weight.numel() > 1 else 0.0
                else:
                    spread = float(_pooled(all_scores).square().mean().sqrt())
            q = p.quality_for(layer.name)
            ramp = min(sparsity / target, 1.0) if target > 0 else 0.0
            t = q * ramp * spread
            meta.update(spread=spread, quality=q)
        keep = scores >= t
        if tie_break is not None:
            keep &= ~tie_break
            meta["ties_broken"] = _count(tie_break)
        if previous is not None and not p.regrow:
            keep &= previous.mask.to(keep.device)  # never un-prune: mask_{t+1} is a subset of mask_t
        kept = _count(keep)
        meta.update(threshold=t, kept=kept, numel=keep.numel(), achieved_sparsity=1.0 - kept / max(keep.numel(), 1))
        if p.rule == "quantile":
            self._warn_shortfall(layer, p, sparsity, k, meta, pooled_pruned, all_scores)
        ndim = weight.dim()
        return Selection(mask=keep, perms=(None,) * ndim, block=(1,) * ndim, meta=meta)

    @staticmethod
    def _warn_shortfall(layer: LayerInfo, p: Params, sparsity: float, k: int, meta: dict, pooled_pruned: int | None,
                        all_scores: dict[str, torch.Tensor]) -> None:  # fmt: skip
        """Warn once per selection (global: at the first layer, about the pooled figure) when the threshold
        prunes fewer than the ``k`` weights asked by more than SHORTFALL of them: ties kept at the threshold
        (``ties = "keep"``), e.g. an all-zero layer."""
        if pooled_pruned is not None:
            n = sum(s.numel() for s in all_scores.values())
            pruned = pooled_pruned
            meta["pooled_achieved_sparsity"] = pruned / max(n, 1)
            if layer.name != next(iter(all_scores), layer.name):
                return
            where = f"global threshold over {len(all_scores)} layers"
        else:
            n, pruned, where = meta["numel"], meta["numel"] - meta["kept"], f"layer {layer.name}"
        if k - pruned > SHORTFALL * n:
            hint = ("weights tied at the threshold are kept (ties = \"keep\"): a layer of zeros, or many equal scores; "
                    "use ties = \"break\" for an exact count") if p.ties == "keep" else "scores tied at the threshold"  # fmt: skip
            warnings.warn(
                f"select 'threshold', {where}: achieved sparsity {pruned / max(n, 1):.4f}, requested {sparsity:.4f}; {hint}",
                SparsityShortfall,
                stacklevel=2,
            )
