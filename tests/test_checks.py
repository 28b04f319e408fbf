"""Fail before fine-tuning, not after: Pipeline.check, the tolerance check, component errors as one line."""

import json
import subprocess
import sys
import time

import pytest
import torch

from prunekit import LayoutError, RegistryError, hookimpl
from prunekit.cli import main
from prunekit.errors import ComponentError, KernelMismatchError
from prunekit.pipeline import CheckReport, Pipeline
from prunekit.plugins import ComponentInfo


def _registry(write_registry, **stages):
    body = {"schedule": "once", "score": "abs", "select": "topk", **stages}
    lines = "\n".join(f'{k} = "{v}"' for k, v in body.items())
    return write_registry(f"[pipelines.p]\n{lines}\n[pipelines.p.params]\nsparsity = 0.5\nmodel = \"resnet-digits\"\nepochs = 1\ndense_epochs = 1\n")


def test_check_fails_in_seconds_on_a_layout_that_cannot_take_the_block(fake_components, write_registry, small_net):
    pipe = Pipeline.load("p", _registry(write_registry, layout="block-only", kernel="dense"))
    pipe.attach(small_net)
    t0 = time.perf_counter()
    with pytest.raises(LayoutError, match="layout component 'block-only'.*layer conv1: block .* is not a 4-row block"):
        pipe.check(example=torch.randn(1, 3, 8, 8))
    assert time.perf_counter() - t0 < 10
    assert all(st.selection is None for st in pipe.layers.values())  # the real model is untouched


def test_check_passes_and_reports_the_compiled_error(fake_components, write_registry, small_net):
    pipe = Pipeline.load("p", _registry(write_registry, layout="dense", kernel="dense"))
    pipe.attach(small_net)
    before = {k: v.clone() for k, v in small_net.state_dict().items()}
    rep = pipe.check(example=torch.randn(2, 3, 8, 8))
    assert rep.layers == 3 and set(rep.kernels.values()) == {"test-dense"} and rep.max_rel_err < 1e-5
    after = small_net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a copy was pruned, not the model
    assert small_net.conv1.weight.shape == (8, 3, 3, 3)  # the original's parametrization still works


def test_run_stops_before_training_when_the_check_fails(fake_components, write_registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    reg = _registry(write_registry, layout="block-only", kernel="dense")
    out = tmp_path / "out"
    import prunekit.runjob as rj

    epochs = []
    monkeypatch.setattr(rj, "prune_and_finetune", lambda *a, **k: epochs.append(1))
    assert main(["run", "p", "--registry", str(reg), "--out", str(out), "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("prunekit: error: layout component 'block-only'")
    assert not epochs and not (out / "checkpoint.pt").exists()


def test_bench_fails_on_a_wrong_kernel_naming_the_worst_layer(fake_components, write_registry, capsys):
    reg = _registry(write_registry, layout="dense", kernel="wrong-bias")
    code = main(["bench", "p", "--registry", str(reg), "--model", "resnet-digits", "--repeats", "1", "--no-layers"])
    assert code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert line.startswith("prunekit: error:") and "tolerance 1e-04" in line and "worst layer" in line and "test-wrong-bias" in line


def test_run_fails_on_a_wrong_kernel_after_writing_the_report(fake_components, write_registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    reg = _registry(write_registry, layout="dense", kernel="wrong-bias")
    out = tmp_path / "out"
    # a kernel that is right on the check's example and wrong on the real run: skip the check
    monkeypatch.setattr(Pipeline, "check", lambda self, **k: CheckReport(0, {}, None, {}, 0.0))
    code = main(["run", "p", "--registry", str(reg), "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("prunekit: error")]
    assert "prunekit run p" in line and "worst layer" in line
    report = json.loads((out / "report.json").read_text())
    assert report["max_rel_err"] > report["tolerance"] == 1e-4
    assert any(row.get("max_rel_err", 0) > 1e-4 for row in report["layers"])


def test_tolerance_comes_from_the_param_then_the_kernel_component(fake_components, write_registry, small_net):
    reg = _registry(write_registry, layout="dense", kernel="wrong-bias")
    pipe = Pipeline.load("p", reg)
    assert pipe.tolerance == 1e-4
    pipe.components["kernel"].tolerance = lambda params: 5e-3
    assert pipe.tolerance == 5e-3
    pipe.host.tolerance = 1e3  # the registry param overrides the component's
    pipe.attach(small_net)
    assert pipe.check(example=torch.randn(1, 3, 8, 8)).max_rel_err > 1e-2  # accepted: above 1e-4, below 1e3
    pipe.host.tolerance = None
    pipe.components["kernel"].tolerance = 1e-4
    with pytest.raises(KernelMismatchError, match="worst layer"):
        pipe.check(example=torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize(
    "score, pattern",
    [
        ("boom", r"^score component 'boom' \(prunekit-test 0\), layer conv1 raised AttributeError: .*report it there$"),
        ("nothing", r"^score component 'nothing' \(prunekit-test 0\), layer conv1 returned None; prunekit_score must return a Tensor$"),
    ],
)
def test_a_failing_hook_is_one_line_naming_stage_component_distribution_and_layer(fake_components, write_registry, small_net, score, pattern):
    pipe = Pipeline.load("p", _registry(write_registry, score=score))
    pipe.attach(small_net)
    with pytest.raises(ComponentError) as info:
        pipe.step(0, total_steps=1)
    msg = str(info.value)
    assert "\n" not in msg
    import re

    assert re.match(pattern, msg), msg


def test_a_failing_hook_through_the_cli_is_one_line_without_traceback(fake_components, write_registry, capsys):
    reg = _registry(write_registry, score="boom")
    assert main(["bench", "p", "--registry", str(reg), "--model", "resnet-digits", "--no-layers"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "score component 'boom'" in err[0] and "Traceback" not in err[0]


class Misspelled:
    """Its hook asks for an argument the spec does not have."""

    @hookimpl
    def prunekit_score(self, weigth):  # noqa: ANN001, ANN201
        return weigth.abs()


def test_a_misspelled_hook_argument_is_reported_at_load_with_the_spec_names(fake_components, write_registry):
    fake_components[("score", "misspelled")] = ComponentInfo("score", "misspelled", "prunekit-test", "0", "t", type(
        "EP", (), {"load": staticmethod(lambda: Misspelled)})())  # fmt: skip
    with pytest.raises(RegistryError) as info:
        Pipeline.load("p", _registry(write_registry, score="misspelled"))
    msg = str(info.value)
    assert "weigth" in msg and "layer, weight, mask, params, generator, stats" in msg


def test_a_duplicate_component_blocks_only_the_pipelines_that_use_it(fake_components, write_registry, capsys):
    dup = fake_components[("score", "abs")]
    fake_components[("score", "abs")] = ComponentInfo(dup.stage, dup.name, dup.distribution, dup.version, dup.target,
                                                      dup.entry_point, conflicts=("prunekit-other",))  # fmt: skip
    reg = write_registry(
        '[pipelines.uses-abs]\nschedule = "once"\nscore = "abs"\nselect = "topk"\n'
        '[pipelines.other]\nschedule = "once"\nscore = "boom"\nselect = "topk"\n'
    )
    with pytest.raises(RegistryError, match="provided by several distributions .*prunekit-other.*pip uninstall prunekit-other"):
        Pipeline.load("uses-abs", reg)
    Pipeline.load("other", reg)  # unrelated pipeline loads
    assert main(["plugins"]) == 0 and "CONFLICT with prunekit-other" in capsys.readouterr().out
    assert main(["pipelines", "--registry", str(reg), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert not rows["uses-abs"]["ready"] and rows["other"]["ready"]


def test_real_duplicate_entry_points_are_listed_not_fatal(monkeypatch):
    from importlib import metadata

    from prunekit import plugins

    class FakeDist:
        def __init__(self, name):
            self.metadata = {"Name": name}
            self.version = "1"

    def eps(group):
        if group != "prunekit.score":
            return []
        out = []
        for dist in ("dist-a", "dist-b"):
            ep = metadata.EntryPoint("same-name", "x:Y", group)
            object.__setattr__(ep, "dist", FakeDist(dist)) if hasattr(ep, "dist") else None
            out.append(type("EP", (), {"name": "same-name", "value": "x:Y", "dist": FakeDist(dist), "load": lambda self: None})())
        return out

    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: eps(group))
    plugins.reset_cache()
    try:
        info = plugins.installed_components()[("score", "same-name")]
        assert info.distribution == "dist-a" and info.conflicts == ("dist-b",)
        with pytest.raises(RegistryError, match="dist-a, dist-b"):
            info.check_unique()
    finally:
        plugins.reset_cache()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "--threads", "0"], "argument --threads: 0 is out of range: it must be >= 1"),
        (["run", "--epochs", "0"], "argument --epochs: 0 is out of range"),
        (["bench", "--batch", "-1"], "argument --batch: -1 is out of range"),
        (["bench", "--sparsity", "1.0"], "argument --sparsity: 1.0 is out of range: it must be in [0.0, 1.0)"),
        (["bench", "--repeats", "x"], "argument --repeats: 'x' is not an integer"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_cli_arguments_are_validated_with_one_line(args, expected):
    res = subprocess.run([sys.executable, "-m", "prunekit.cli", *args], capture_output=True, text=True)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: ") and expected in lines[0], res.stderr


def test_stray_pluggy_kwargs_never_reach_components(fake_components, write_registry, small_net):
    """Every spec argument is passed on every call (pluggy warns about missing ones)."""
    import warnings

    pipe = Pipeline.load("p", _registry(write_registry, layout="dense", kernel="dense"))
    pipe.attach(small_net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.step(0, total_steps=1)
        pipe.compile(example=torch.randn(1, 3, 8, 8))
