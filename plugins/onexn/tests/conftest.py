"""A one-shot test schedule and a temporary registry, so these tests need no other plugin installed."""

from __future__ import annotations

from pathlib import Path

import pytest

import prunekit.pipeline
from prunekit import hookimpl
from prunekit.pipeline import Pipeline
from prunekit.records import ScheduleDecision


class OneShotAtZero:
    """Test schedule: prune to the target at step 0, then freeze."""

    @hookimpl
    def prunekit_schedule(self, step: int, target: float) -> ScheduleDecision:
        return ScheduleDecision(step=step, sparsity=target, update=step == 0, final=True)


class _Info:
    distribution = "tests"

    def load(self) -> type:
        return OneShotAtZero


@pytest.fixture
def make_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = prunekit.pipeline.installed_components
    monkeypatch.setattr(
        prunekit.pipeline, "installed_components", lambda: {**real(), ("schedule", "test-oneshot"): _Info()}
    )

    def make(score: str, params: str) -> Pipeline:
        reg = tmp_path / "registry.toml"
        reg.write_text(
            f'[pipelines.t]\nschedule = "test-oneshot"\nscore = "{score}"\nselect = "onexn"\n'
            f"[pipelines.t.params]\n{params}\n",
            encoding="utf-8",
        )
        return Pipeline.load("t", reg)

    return make
