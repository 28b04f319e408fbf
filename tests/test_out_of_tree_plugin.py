"""A third-party plugin (tests/fixtures/prunekit-fixture-score) installed at test time and composed with
built-in components from a temporary registry; host/ is not touched."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit import plugins
from prunekit.pipeline import Pipeline

FIXTURE = Path(__file__).parent / "fixtures" / "prunekit-fixture-score"


@pytest.fixture
def installed_fixture(tmp_path, monkeypatch):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(FIXTURE)],
        check=True,
    )
    monkeypatch.syspath_prepend(str(target))
    plugins.reset_cache()
    yield
    plugins.reset_cache()


def test_fixture_plugin_composes_with_builtin_components(installed_fixture, tmp_path):
    comps = plugins.installed_components()
    info = comps[("score", "smallest-first")]
    assert info.distribution == "prunekit-fixture-score"
    if ("schedule", "constant") not in comps or ("select", "threshold") not in comps:
        pytest.skip("built-in prunekit-schedules / prunekit-magnitude not installed")
    reg = tmp_path / "registry.toml"
    reg.write_text(
        '[pipelines.third-party]\nschedule = "constant"\nscore = "smallest-first"\nselect = "threshold"\n'
        "[pipelines.third-party.params]\nsparsity = 0.5\n"
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    pipe = Pipeline.load("third-party", reg)
    pipe.attach(model)
    pipe.step(0)
    w = model[0].parametrizations.weight.original.detach()
    mask = pipe.layers["0"].selection.mask
    # the third-party criterion keeps the SMALL weights: every kept |w| is below every pruned |w|
    assert mask.float().mean().item() == pytest.approx(0.5, abs=1 / w.numel())
    assert w[mask].abs().max() <= w[~mask].abs().min()
