"""A third-party plugin (tests/fixtures/prunekit-fixture-score) installed at test time and composed with
built-in components from a temporary registry; host/ is not touched."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit import plugins
from prunekit.pipeline import Pipeline

FIXTURES = Path(__file__).parent / "fixtures"


def _install(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(FIXTURES / name)],
        check=True,
    )
    monkeypatch.syspath_prepend(str(target))
    plugins.reset_cache()


@pytest.fixture
def installed_fixture(tmp_path, monkeypatch):
    _install("prunekit-fixture-score", tmp_path, monkeypatch)
    yield
    plugins.reset_cache()


@pytest.fixture
def installed_calibrated(tmp_path, monkeypatch):
    _install("prunekit-fixture-calibrated", tmp_path, monkeypatch)
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


def test_data_aware_fixture_plugin_gets_calibration_statistics(installed_calibrated, tmp_path):
    comps = plugins.installed_components()
    assert comps[("score", "input-energy")].distribution == "prunekit-fixture-calibrated"
    if ("schedule", "constant") not in comps or ("select", "threshold") not in comps:
        pytest.skip("built-in prunekit-schedules / prunekit-magnitude not installed")
    reg = tmp_path / "registry.toml"
    reg.write_text(
        '[pipelines.energy]\nschedule = "constant"\nscore = "input-energy"\nselect = "threshold"\n'
        "[pipelines.energy.params]\nsparsity = 0.5\n"
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    x = torch.randn(10, 6) * torch.tensor([5.0, 1.0, 0.1, 2.0, 0.5, 3.0])  # input columns of unequal energy
    pipe = Pipeline.load("energy", reg)
    assert pipe.needs == {"activations"}
    pipe.attach(model, calibration=[x[:5], x[5:]])
    pipe.step(0)
    w = model[0].parametrizations.weight.original.detach()
    expected = w.square() * x.square().sum(0)  # by hand: W^2 x column energy over both batches
    mask = pipe.layers["0"].selection.mask
    assert mask.float().mean().item() == pytest.approx(0.5, abs=1 / w.numel())
    assert expected[mask].min() >= expected[~mask].max()
    assert not torch.equal(mask, w.abs() > w.abs().flatten().kthvalue(12).values)  # not plain magnitude (top 12)
