"""Refill / Refill+ (Chen et al., ICML 2022, method notes C): turn an unstructured IMP mask into whole
output channels, per layer, within the layer's own IMP budget.

A layer's mask is viewed as ``M2 = mask.reshape(Cout, n)`` (``n = Cin/groups * kh * kw``, or ``in`` for
Linear). ``nu = nnz / n`` is the layer's budget in full channels; Refill+ (``rho > 0``) re-activates a
fraction ``rho`` of the rest, ``K' = floor(nu + (Cout - nu) * rho)``. ``K'`` is computed in exact
rational arithmetic (``rho`` taken at its exact binary value), so ``rho = 1`` always gives ``Cout`` and an
integral ``nu`` is never floored one below by rounding.

Modes of :func:`refill`:

* ``"exact"`` (prunekit default): exactly ``K'`` full channels, the top ``K'`` by score, ties broken
  towards the lowest channel index; every row all-one or all-zero. ``K' = 0`` (``nu + (Cout-nu)*rho < 1``)
  keeps **no** channel: the layer's output is then its bias alone (the reference resurrects a random
  channel, H.1; we do not).
* ``"reference"``: the reference implementation's steps C.2 5-8 (magnitude branch): ``tau`` = the
  ``(Cout - K')``-th smallest score; rows above ``tau`` full, below empty; one row tied at ``tau``, drawn
  from ``generator``, becomes full, the other tied rows keep their original partial row; ``Cout - K' <= 0``
  makes every row full. Without ties this keeps ``K' + 1`` channels. Only for reproducing the paper.
* ``"budget"`` (C.4, for budget-matched comparisons): ``K = floor(nu')`` full rows by rank and the next
  ranked row keeps its first ``floor(frac(nu') * n)`` columns, so the parameter count matches
  ``nu' * n`` (the IMP budget exactly for ``rho = 0``) at the price of one partial row.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import attrs
import torch

from prunekit.errors import SelectionError
from prunekit.records import LayerStats

CRITERIA: tuple[str, ...] = ("l1", "remain", "fm-l1", "fm-l2", "saliency")
MODES: tuple[str, ...] = ("exact", "reference", "budget")

# feature-map criteria: the LayerStats field each reads and the calibration needs that produce it
_FM_FIELD = {"fm-l1": "output_abs", "fm-l2": "output_sq", "saliency": "output_taylor"}
_NEEDS: dict[str, frozenset[str]] = {
    "l1": frozenset(),
    "remain": frozenset(),
    "fm-l1": frozenset({"activations"}),
    "fm-l2": frozenset({"activations"}),
    "saliency": frozenset({"activations", "grads"}),
}


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise SelectionError(f"criterion = {criterion!r} is unknown; use one of {', '.join(CRITERIA)}")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise SelectionError(f"refill mode = {mode!r} is unknown; use one of {', '.join(MODES)}")


def criterion_needs(criterion: str) -> set[str]:
    """The calibration needs (``prunekit.calibration.NEEDS``) a criterion's scores require."""
    check_criterion(criterion)
    return set(_NEEDS[criterion])


def as_rows(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (any weight shape) as the bool row view ``[Cout, n]`` every refill operation uses."""
    return mask.detach().reshape(mask.shape[0], -1).to(torch.bool)


def channel_scores(
    criterion: str,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    stats: LayerStats | None,
    name: str = "",
) -> torch.Tensor:
    """One score per output channel, ``[Cout]`` float64; higher means keep.

    ``l1``: ``sum_j |W[c, j] * M[c, j]|``, the l1 of the masked trained weights (the paper's criterion).
    ``remain``: the number of kept weights of channel ``c``. ``fm-l1`` / ``fm-l2`` / ``saliency``: the
    l1 / l2 norm / Taylor saliency of this layer's own output channel ``c`` over the calibration inputs
    (``stats.output_abs``, ``sqrt(stats.output_sq)``, ``stats.output_taylor``), per channel and per layer
    (the reference's versions are broken, H.1). ``mask = None`` means nothing is pruned yet.
    """
    check_criterion(criterion)
    where = f"layer {name or (stats.name if stats is not None else '?')}"
    cout = weight.shape[0]
    if mask is not None and tuple(mask.shape) != tuple(weight.shape):
        raise SelectionError(f"{where}: mask {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
    if criterion == "l1":
        w = weight.detach().to(torch.float64).reshape(cout, -1)
        if mask is not None:
            w = w * as_rows(mask)
        return w.abs().sum(1)
    if criterion == "remain":
        if mask is None:
            return torch.full((cout,), float(weight[0].numel()), dtype=torch.float64)
        return as_rows(mask).sum(1).to(torch.float64)
    field = _FM_FIELD[criterion]
    value = getattr(stats, field, None) if stats is not None else None
    if value is None:
        needs = " and ".join(repr(n) for n in sorted(_NEEDS[criterion]))
        raise SelectionError(
            f"{where}: criterion {criterion!r} scores channels by their output feature maps (stats.{field}), "
            f"but no calibration statistics were given; declare needs = {{{needs}}} on the component "
            f"(criterion_needs({criterion!r})) and give the pipeline calibration batches, or use criterion 'l1'"
        )
    value = value.detach().to(torch.float64).reshape(-1)
    if value.numel() != cout:
        raise SelectionError(
            f"{where}: stats.{field} has {value.numel()} entries, the layer has {cout} output channels; "
            "the statistics belong to another layer"
        )
    return value.sqrt() if criterion == "fm-l2" else value.clone()


@attrs.frozen
class RefillResult:
    """The refilled row mask of one layer and its accounting.

    ``mask`` ``[Cout, n]`` bool; ``keep`` ``[Cout]`` bool, the channels that are full (all-one) in ``mask``;
    ``k`` their number; ``target_k`` = ``floor(nu + (Cout - nu) * rho)``; ``partial`` the channels that are
    neither full nor empty (``reference`` / ``budget`` modes only); densities are ``nnz / (Cout * n)``.
    """

    mask: torch.Tensor
    keep: torch.Tensor
    k: int
    target_k: int
    nu: float
    density_before: float
    density_after: float
    rho: float
    mode: str
    partial: tuple[int, ...] = ()

    def meta(self) -> dict[str, Any]:
        """Small JSON-able facts for a Selection's ``meta``."""
        cout = int(self.keep.numel())
        return {
            "refill_mode": self.mode,
            "rho": self.rho,
            "nu": self.nu,
            "target_channels": self.target_k,
            "kept_channels": self.k,
            "dropped_channels": cout - self.k - len(self.partial),
            "partial_channels": list(self.partial),
            "cout": cout,
            "density_before": self.density_before,
            "density_after": self.density_after,
        }


def target_channels(nnz: int, cout: int, n: int, rho: float) -> tuple[int, int]:
    """``(K', floor(nu' * n))`` with ``nu' = nnz/n + (Cout - nnz/n) * rho``, in exact arithmetic."""
    budget = nnz + (cout * n - nnz) * Fraction(rho)  # nu' * n
    total = min(math.floor(budget), cout * n)
    return total // n, total


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Channel indices by descending score, equal scores in ascending index order."""
    return torch.argsort(scores, descending=True, stable=True)


def refill(
    mask2: torch.Tensor,
    scores: torch.Tensor,
    rho: float = 0.0,
    mode: str = "exact",
    generator: torch.Generator | None = None,
    name: str = "",
) -> RefillResult:
    """Refill (``rho = 0``) / Refill+ (``rho > 0``) one layer's row mask ``[Cout, n]`` (see the module doc).

    ``generator`` is read only in ``"reference"`` mode (``None``: torch's global generator).
    """
    where = f"layer {name}" if name else "refill"
    check_mode(mode)
    if mask2.dim() != 2 or mask2.shape[0] == 0 or mask2.shape[1] == 0:
        raise SelectionError(f"{where}: mask2 must be a non-empty [Cout, n] row view, got {tuple(mask2.shape)}; use as_rows(mask)")
    if mask2.dtype != torch.bool:
        if not bool(((mask2 == 0) | (mask2 == 1)).all()):
            raise SelectionError(f"{where}: mask2 holds values other than 0/1; pass the bool keep-mask")
        mask2 = mask2 != 0
    cout, n = mask2.shape
    if scores.dim() != 1 or scores.numel() != cout:
        raise SelectionError(f"{where}: scores {tuple(scores.shape)} must be one per output channel, [{cout}]")
    if not bool(torch.isfinite(scores).all()):
        raise SelectionError(f"{where}: a channel score is NaN or infinite; check the criterion's inputs")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and 0.0 <= rho <= 1.0):
        raise SelectionError(f"{where}: rho = {rho!r} must lie in [0, 1] (0 = Refill, > 0 = Refill+)")
    mask2 = mask2.detach()
    scores = scores.detach().to(device=mask2.device, dtype=torch.float64)
    nnz = int(mask2.sum())
    k, total = target_channels(nnz, cout, n, float(rho))
    order = rank(scores)
    out = torch.zeros_like(mask2)
    partial: list[int] = []
    if mode == "exact":
        out[order[:k]] = True
    elif mode == "budget":
        out[order[:k]] = True
        cols = total - k * n
        if cols > 0:  # k < Cout here, since total <= Cout * n
            row = int(order[k])
            out[row, :cols] = True
            partial.append(row)
    else:
        out, partial = _reference(mask2, scores, k, generator)
    full = out.all(dim=1)
    size = cout * n
    return RefillResult(
        mask=out,
        keep=full,
        k=int(full.sum()),
        target_k=k,
        nu=nnz / n,
        density_before=nnz / size,
        density_after=int(out.sum()) / size,
        rho=float(rho),
        mode=mode,
        partial=tuple(sorted(partial)),
    )


def _reference(
    mask2: torch.Tensor, scores: torch.Tensor, k: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, list[int]]:
    """C.2 steps 5-8 as the reference runs them (magnitude branch)."""
    cout = mask2.shape[0]
    if cout - k <= 0:
        return torch.ones_like(mask2), []
    tau = torch.kthvalue(scores.cpu(), cout - k).values.to(scores.device)
    out = mask2.clone()  # tied rows other than the drawn one keep their original row
    out[scores > tau] = True
    out[scores < tau] = False
    tied = torch.nonzero(scores == tau).flatten()
    pick = int(torch.randint(len(tied), (1,), generator=generator, device=generator.device if generator else "cpu"))
    out[tied[pick]] = True
    rows = out.sum(1)
    partial = [int(c) for c in torch.nonzero((rows > 0) & (rows < mask2.shape[1])).flatten()]
    return out, partial
