"""Progressive ramps (SUBP's schedules): ``sparsity(e) = ratio(e) * target`` between ``start`` and ``end``.

With ``t = (e - start) / (end - start)``:

* ``linear``: ``clamp(t, 0, 1)``
* ``cos``:    0 before ``start``; ``1 - cos(t * pi / 2)`` for ``start <= e < end`` (slow start); 1 from ``end``
* ``exp``:    0 before ``start``; ``q(e - start) / q(end - start - 1)`` for ``start <= e < end`` with
  ``q(k) = 1 - exp(-0.05 k)`` (fast start, reaches 1 at ``end - 1``); 1 from ``end``
* ``cubic``:  ``clamp(t ** 3, 0, 1)`` (slow start, fast end; not AGP's ``1 - (1 - t) ** 3``)

Edge cases the reference gets wrong, fixed here: ``start == end`` is a step to 1 at ``start`` for every
ramp (the reference divides by zero for linear/cubic); ``exp`` with ``end - start == 1`` reaches 1 at
``start`` (the reference computes 0/0). ``start == end == 0`` is a one-shot prune at step 0.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs

from prunekit import PrunekitError, ScheduleDecision, hookimpl

Kind = Literal["linear", "exp", "cos", "cubic"]
EXP_RATE = 0.05  # the reference's b


def ramp_ratio(kind: Kind, e: int, start: int, end: int) -> float:
    """Fraction of the target reached at step ``e`` (in [0, 1], non-decreasing in ``e``)."""
    if e < start:
        return 0.0
    if e >= end:
        return 1.0
    # here start <= e < end, so end - start >= 1
    t = (e - start) / (end - start)
    if kind == "linear":
        return t
    if kind == "cubic":
        return t**3
    if kind == "cos":
        return 1.0 - math.cos(t * math.pi / 2.0)
    if kind == "exp":
        last = end - start - 1
        if last == 0:  # one step in the ramp: it must already be the full target
            return 1.0
        return (1.0 - math.exp(-EXP_RATE * (e - start))) / (1.0 - math.exp(-EXP_RATE * last))
    raise ValueError(f"unknown ramp {kind!r}")


@attrs.define
class RampParams:
    start: int = 0
    end: int = 0

    def __attrs_post_init__(self) -> None:
        if self.start < 0:
            raise PrunekitError(f"start = {self.start} is negative; set start to the first pruning step (0 or more)")
        if self.end < self.start:
            raise PrunekitError(
                f"end = {self.end} is before start = {self.start}; set end >= start (end == start prunes in one step)"
            )


class _Ramp:
    kind: Kind = "linear"
    Params = RampParams

    @hookimpl
    def prunekit_schedule(self, step: int, total_steps: int, target: float, params: RampParams | None) -> ScheduleDecision:
        p = params or RampParams()
        if not 0 <= p.start <= p.end < total_steps:
            raise PrunekitError(
                f"{self.kind} schedule needs 0 <= start <= end < epochs, got start = {p.start}, end = {p.end}, "
                f"epochs = {total_steps}; lower end below epochs or raise epochs to {p.end + 1}"
            )
        ratio = ramp_ratio(self.kind, step, p.start, p.end)
        return ScheduleDecision(
            step=step,
            sparsity=min(ratio * target, target),
            update=p.start <= step <= p.end,
            final=step >= p.end,
            note=f"{self.kind} ramp {ratio:.4f}",
        )


class Linear(_Ramp):
    """Linear ramp from 0 at `start` to the target at `end`; masks updated every step in between."""

    kind: Kind = "linear"


class Exp(_Ramp):
    """Exponential ramp (fast start, b = 0.05) from `start`, target reached at `end - 1`."""

    kind: Kind = "exp"


class Cos(_Ramp):
    """Cosine ramp 1 - cos(t*pi/2) (slow start) from `start` to the target at `end`."""

    kind: Kind = "cos"


class Cubic(_Ramp):
    """Cubic ramp t**3 (slow start, fast end) from `start` to the target at `end`."""

    kind: Kind = "cubic"
