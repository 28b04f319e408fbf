"""IMP with rewinding (method doc B): the schedule, the score and the global L1 select.

Timeline, in steps (the CLI ticks once per epoch), with ``L = round_length`` and ``P = rounds``:

* round 0, steps ``0 .. L-1``: dense training from the initial weights; at step ``rewind_step`` (before it
  trains) the host snapshots every parameter and buffer (``rewind_step = 0`` is the plain ``lt`` variant:
  rewind to the initialisation);
* round ``k = 1 .. P`` starts at step ``k*L``: the select prunes the smallest-|w| weights over all
  prunable layers pooled, so that ``round(s_k * total)`` are pruned (``s_k = 1 - (1 - rate)**k``: about
  ``rate`` of the *remaining* weights per round, masks nested), the host rewinds to the snapshot, and
  the round retrains the full ``L`` steps with a fresh optimizer and learning-rate schedule.

The last round's update is the *final* one (``sparsity == target``): Refill / Regroup selects transform
the IMP mask there, then the rewound ticket retrains once. The run needs ``(P + 1) * L`` steps, and the
pipeline's ``dense_epochs`` should be 0 so that round 0 starts from the initialisation (the selects set
that default).
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from prunekit import PrunekitError, ScheduleDecision, Selection, SelectionError, hookimpl
from prunekit.records import LayerInfo, LayerStats

# the prunable set of method doc B: every conv but the ResNet stem ("conv1" exactly), no heads, and
# round 0 trains from the initialisation (no separate dense pre-training)
HOST_DEFAULTS = {"exclude": ["conv1"], "keep_last_dense": True, "dense_epochs": 0}
PRUNED = -1.0  # score of an already pruned weight (the score/select pair's convention)


def round_sparsity(k: int, rate: float) -> float:
    return 1.0 - (1.0 - rate) ** k


def derived_rate(target: float, rounds: int) -> float:
    return 1.0 - (1.0 - target) ** (1.0 / rounds)


class IMPSchedule:
    """IMP with rewinding: prune ~rate of the remaining weights per round, rewind, retrain the full round."""

    @attrs.define
    class Params:
        rounds: int = 3
        round_length: int = 2
        rewind_step: int = 1  # 0 = the plain lt variant (rewind to the initialisation)
        rate: float = 0.0  # 0 = derived from sparsity and rounds; else it must reach the pipeline's sparsity

        def __attrs_post_init__(self) -> None:
            if self.rounds < 1 or self.round_length < 1:
                raise PrunekitError(f"rounds = {self.rounds}, round_length = {self.round_length}: both must be >= 1")
            if not 0 <= self.rewind_step < self.round_length:
                raise PrunekitError(
                    f"rewind_step = {self.rewind_step} must fall in round 0 (0 <= rewind_step < round_length = "
                    f"{self.round_length}); 0 rewinds to the initialisation"
                )
            if not 0.0 <= self.rate < 1.0:
                raise PrunekitError(f"rate = {self.rate} must be in [0, 1); 0.2 is the paper's, 0 derives it")

    @hookimpl
    def prunekit_schedule(self, step: int, total_steps: int, target: float, params: Params | None) -> ScheduleDecision:
        p = params or IMPSchedule.Params()
        need = (p.rounds + 1) * p.round_length
        if total_steps < need:
            raise PrunekitError(
                f"IMP needs (rounds + 1) * round_length = ({p.rounds} + 1) * {p.round_length} = {need} steps "
                f"(round 0 trains dense), epochs = {total_steps}; set epochs = {need} or lower rounds / round_length"
            )
        rate = p.rate or derived_rate(target, p.rounds)
        if p.rate and not math.isclose(round_sparsity(p.rounds, rate), target, abs_tol=1e-3):
            raise PrunekitError(
                f"rate = {p.rate} over rounds = {p.rounds} reaches sparsity {round_sparsity(p.rounds, rate):.4f}, "
                f"not the pipeline's sparsity {target}; set sparsity = {round_sparsity(p.rounds, rate):.4f} or rate = 0"
            )
        k = min(step // p.round_length, p.rounds)
        update = step % p.round_length == 0 and 1 <= step // p.round_length <= p.rounds
        sparsity = target if k == p.rounds else round_sparsity(k, rate)
        what = "prune, rewind" if update else ("snapshot" if step == p.rewind_step else "train")
        return ScheduleDecision(
            step=step,
            sparsity=sparsity,
            update=update,
            final=k == p.rounds,
            rewind=update,
            snapshot=step == p.rewind_step,
            note=f"IMP round {k}/{p.rounds}: {what}",
        )


class IMPScore:
    """|w| of the remaining weights; already pruned weights score -1 (so the global select sees them)."""

    @hookimpl
    def prunekit_score(self, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        s = weight.detach().abs().to(torch.float32)
        return s if mask is None else torch.where(mask.to(s.device), s, torch.full_like(s, PRUNED))


@attrs.define
class IMPParams:
    """``linear``: also prune nn.Linear layers in the prunable set (the method prunes convs only)."""

    linear: bool = False


@attrs.frozen
class _GlobalDecision:
    keep: dict[str, torch.Tensor]
    pruned_now: int
    remaining_before: int
    total: int


class IMPSelect:
    """IMP's global unstructured L1: prune round(sparsity * total) over all prunable layers, nested."""

    Params = IMPParams
    host_defaults = HOST_DEFAULTS

    def __init__(self) -> None:
        self._cache: tuple[Any, float, _GlobalDecision] | None = None

    def _eligible(self, all_scores: dict[str, torch.Tensor], params: IMPParams) -> dict[str, torch.Tensor]:
        return {n: s for n, s in all_scores.items() if params.linear or s.dim() == 4}

    def global_keep(self, all_scores: dict[str, torch.Tensor], sparsity: float, params: IMPParams) -> _GlobalDecision:
        """One decision per mask update for all layers (cached: the host calls select once per layer)."""
        if self._cache is not None and self._cache[0] is all_scores and self._cache[1] == sparsity:
            return self._cache[2]
        pool = self._eligible(all_scores, params)
        if not pool:
            raise SelectionError("IMP found no prunable conv layer; set linear = true to prune nn.Linear layers too")
        flat = torch.cat([s.reshape(-1).float().cpu() for s in pool.values()])
        total = flat.numel()
        alive = flat >= 0
        remaining = int(alive.sum())
        want = int(math.floor(sparsity * total + 0.5))
        new = max(0, min(remaining, want - (total - remaining)))
        keep_flat = alive.clone()
        if new:
            alive_idx = alive.nonzero().flatten()
            order = torch.argsort(flat[alive_idx], stable=True)  # ties: lowest global index goes first
            keep_flat[alive_idx[order[:new]]] = False
        keep, off = {}, 0
        for name, s in pool.items():
            keep[name] = keep_flat[off : off + s.numel()].reshape(s.shape)
            off += s.numel()
        decision = _GlobalDecision(keep, new, remaining, total)
        self._cache = (all_scores, sparsity, decision)
        return decision

    def imp_mask(
        self, layer: LayerInfo, weight: torch.Tensor, scores: torch.Tensor, sparsity: float,
        all_scores: dict[str, torch.Tensor], params: IMPParams,
    ) -> tuple[torch.Tensor | None, dict[str, Any]]:  # fmt: skip
        """This layer's IMP mask (``None`` when the layer is outside the prunable set) and report facts."""
        if tuple(scores.shape) != tuple(weight.shape):
            raise SelectionError(
                f"layer {layer.name}: IMP selects need one score per weight {tuple(weight.shape)}, got {tuple(scores.shape)}; "
                "pair them with the lth-l1 score"
            )
        if layer.kind == "linear" and not params.linear:
            return None, {}
        d = self.global_keep(all_scores, sparsity, params)
        mask = d.keep[layer.name].to(weight.device)
        kept = int(mask.sum())
        return mask, {
            "criterion": "global L1 (IMP)",
            "imp_density": kept / mask.numel(),
            "round_pruned_global": d.pruned_now,
            "round_remaining_before_global": d.remaining_before,
        }

    def finish(
        self, layer: LayerInfo, weight: torch.Tensor, mask: torch.Tensor, meta: dict[str, Any], final: bool,
        params: Any, stats: LayerStats | None, generator: torch.Generator,
    ) -> Selection:  # fmt: skip
        """Plain IMP: the unstructured mask as is (Refill / Regroup override this for the final round)."""
        meta["density"] = meta["imp_density"]
        return Selection(mask=mask, perms=(None,) * weight.dim(), block=(1,) * weight.dim(), pattern="unstructured", meta=meta)

    @hookimpl
    def prunekit_select_mask(
        self, layer: LayerInfo, weight: torch.Tensor, scores: torch.Tensor, sparsity: float, target: float,
        params: Any, generator: torch.Generator, all_scores: dict[str, torch.Tensor], stats: LayerStats | None,
    ) -> Selection:  # fmt: skip
        mask, meta = self.imp_mask(layer, weight, scores, sparsity, all_scores, params)
        if mask is None:
            return Selection(
                mask=torch.ones(weight.shape, dtype=torch.bool, device=weight.device),
                dense_reason="linear layer: Structural LTH prunes convs (set linear = true to include it)",
            )
        final = target > 0 and sparsity >= target - 1e-9
        return self.finish(layer, weight, mask, meta, final, params, stats, generator)
