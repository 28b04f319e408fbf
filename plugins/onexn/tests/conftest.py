"""A one-shot test schedule and a temporary registry, so these tests need no other plugin installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunekit import hookimpl
from prunekit.pipeline import Pipeline
from prunekit.plugins import register_component, unregister_component
from prunekit.records import ScheduleDecision


class OneShotAtZero:
    """Test schedule: prune to the target at step 0, then freeze."""

    @hookimpl
    def prunekit_schedule(self, step: int, target: float) -> ScheduleDecision:
        return ScheduleDecision(step=step, sparsity=target, update=step == 0, final=True)


@pytest.fixture
def make_pipeline(tmp_path: Path):
    register_component("schedule", "test-oneshot", OneShotAtZero, "tests")

    def make(score: str, params: str) -> Pipeline:
        reg = tmp_path / "registry.toml"
        reg.write_text(
            f'[pipelines.t]\nschedule = "test-oneshot"\nscore = "{score}"\nselect = "onexn"\n'
            f"[pipelines.t.params]\n{params}\n",
            encoding="utf-8",
        )
        return Pipeline.load("t", reg)

    yield make
    unregister_component("schedule", "test-oneshot")
