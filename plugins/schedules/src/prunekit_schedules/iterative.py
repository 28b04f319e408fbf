"""Han et al. iterative pruning: prune, retrain for a round, prune harder, repeat.

Round k (1-based) starts at step ``(k - 1) * round_length`` and prunes to ``round_sparsity(k)``:

* ``ramp = "geometric"`` (default): the kept fraction is ``(1 - target) ** (k / rounds)``, so every round
  removes the same fraction of the weights that survived the previous one (Han's "prune a little of what is
  left, retrain, repeat"); e.g. target 0.9 over 4 rounds: 0.438, 0.684, 0.822, 0.9.
* ``ramp = "linear"``: ``target * k / rounds`` (equal steps of the whole layer: 0.225, 0.45, 0.675, 0.9).

The last round lands on the target exactly; its retraining steps follow with masks frozen (``final``).
"""

from __future__ import annotations

from typing import Literal

import attrs

from prunekit import PrunekitError, ScheduleDecision, hookimpl

Ramp = Literal["geometric", "linear"]


def round_sparsity(k: int, rounds: int, target: float, ramp: Ramp = "geometric") -> float:
    """Sparsity after round ``k`` of ``rounds`` (1-based); exactly ``target`` at ``k == rounds``."""
    if k >= rounds:
        return target
    if k <= 0:
        return 0.0
    if ramp == "linear":
        s = target * k / rounds
    else:
        s = 1.0 - (1.0 - target) ** (k / rounds)
    return min(max(s, 0.0), target)


class Iterative:
    """Han rounds: prune at the start of each of `rounds` rounds of `round_length` steps, rising sparsity."""

    @attrs.define
    class Params:
        rounds: int = 4
        round_length: int = 1
        ramp: str = "geometric"

        def __attrs_post_init__(self) -> None:
            if self.rounds < 1:
                raise PrunekitError(f"rounds = {self.rounds}; set rounds to 1 or more (1 = one prune, then retrain)")
            if self.round_length < 1:
                raise PrunekitError(f"round_length = {self.round_length}; set round_length to 1 or more steps per round")
            if self.ramp not in ("geometric", "linear"):
                raise PrunekitError(f"ramp = {self.ramp!r} is unknown; use \"geometric\" or \"linear\"")

    @hookimpl
    def prunekit_schedule(self, step: int, total_steps: int, target: float, params: Params | None) -> ScheduleDecision:
        p = params or Iterative.Params()
        span = p.rounds * p.round_length
        if span > total_steps:
            raise PrunekitError(
                f"rounds * round_length = {p.rounds} * {p.round_length} = {span} steps do not fit in epochs = "
                f"{total_steps}; raise epochs to {span} or lower rounds / round_length"
            )
        if step < 0:
            raise PrunekitError(f"step {step} is negative; steps count from 0")
        k = min(step // p.round_length + 1, p.rounds)  # current round, 1-based
        first_of_round = step < span and step % p.round_length == 0
        return ScheduleDecision(
            step=step,
            sparsity=round_sparsity(k, p.rounds, target, p.ramp),  # type: ignore[arg-type]
            update=first_of_round,
            final=k == p.rounds,
            note=f"round {k}/{p.rounds}" + (" prune" if first_of_round else " retrain"),
        )
