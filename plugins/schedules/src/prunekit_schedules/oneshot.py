"""One-shot pruning: the full target at one step, masks frozen after."""

from __future__ import annotations

import attrs

from prunekit import PrunekitError, ScheduleDecision, hookimpl


class Constant:
    """One-shot: prune to the target at step `at` (default 0), masks frozen after."""

    @attrs.define
    class Params:
        at: int = 0

        def __attrs_post_init__(self) -> None:
            if self.at < 0:
                raise PrunekitError(f"at = {self.at} is negative; set at to the step of the one-shot prune (0 = first)")

    @hookimpl
    def prunekit_schedule(self, step: int, total_steps: int, target: float, params: Params | None) -> ScheduleDecision:
        at = (params or Constant.Params()).at
        # at = 0 is always allowed so that a run with no fine-tuning steps can still prune once.
        if at > 0 and at >= total_steps:
            raise PrunekitError(
                f"at = {at} is not before the end of the run (epochs = {total_steps}); "
                f"set at below epochs or raise epochs above {at}"
            )
        if step < at:
            return ScheduleDecision(step=step, sparsity=0.0, update=False, final=False, note="dense until one-shot")
        return ScheduleDecision(step=step, sparsity=target, update=step == at, final=True, note="one-shot")
