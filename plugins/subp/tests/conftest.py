"""A small ramp schedule and a temporary registry, so these tests need no other plugin installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunekit import hookimpl
from prunekit.pipeline import Pipeline
from prunekit.plugins import register_component, unregister_component
from prunekit.records import ScheduleDecision

RAMP_END = 3


class RampToThree:
    """Test schedule: sparsity = target * step / 3, masks updated at steps 0..3, frozen after."""

    @hookimpl
    def prunekit_schedule(self, step: int, target: float) -> ScheduleDecision:
        ratio = min(step / RAMP_END, 1.0)
        return ScheduleDecision(step=step, sparsity=ratio * target, update=step <= RAMP_END, final=step >= RAMP_END)


@pytest.fixture
def make_pipeline(tmp_path: Path):
    register_component("schedule", "test-ramp", RampToThree, "tests")

    def make(score: str, params: str) -> Pipeline:
        reg = tmp_path / "registry.toml"
        reg.write_text(
            f'[pipelines.t]\nschedule = "test-ramp"\nscore = "{score}"\nselect = "subp-uniform"\n'
            f"[pipelines.t.params]\n{params}\n",
            encoding="utf-8",
        )
        return Pipeline.load("t", reg)

    yield make
    unregister_component("schedule", "test-ramp")
