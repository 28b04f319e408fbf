"""The contract written down: every hook documented and in the README with its arguments, the stage
list defined once, and the report/bench behaviour a plugin author relies on."""

import inspect
import json
import re
from pathlib import Path

import attrs
import pytest

from prunekit import hookspecs
from prunekit.cli import main
from prunekit.pipeline import Pipeline
from prunekit.registry import PipelineSpec

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def _hookspecs():
    return {n: f for n, f in vars(hookspecs).items() if n.startswith("prunekit_") and callable(f)}


def test_every_hook_in_the_plugin_manager_is_a_documented_spec(fake_components, basic_registry):
    pipe = Pipeline.load("basic", basic_registry)
    hooks = {name for name in dir(pipe.pm.hook) if name.startswith("prunekit_")}
    assert hooks == set(_hookspecs()) == {hook for _group, hook in hookspecs.STAGE_GROUPS.values()}
    for name, fn in _hookspecs().items():
        doc = inspect.getdoc(fn) or ""
        assert len(doc.split()) >= 20, f"{name} needs a real docstring"


@pytest.mark.parametrize("name", sorted(_hookspecs()))
def test_every_hook_appears_in_the_readme_with_all_its_arguments(name):
    args = list(inspect.signature(_hookspecs()[name]).parameters)
    rows = [ln for ln in README.splitlines() if f"`{name}`" in ln and ln.startswith("|")]
    assert rows, f"README's plugin table lacks {name}"
    listed = [a.strip() for a in rows[0].split("|")[3].split(",")]
    assert listed == args, f"README lists {listed} for {name}, the spec takes {args}"


def test_every_argument_is_explained_in_the_readme():
    args = {a for fn in _hookspecs().values() for a in inspect.signature(fn).parameters}
    for a in args:
        assert re.search(rf"`{a}`", README), f"README does not explain the hook argument `{a}`"


def test_the_stage_list_is_defined_once():
    spec_stages = [f.name for f in attrs.fields(PipelineSpec) if f.name not in ("description", "params")]
    assert tuple(spec_stages) == hookspecs.STAGES
    assert set(hookspecs.RETURNS) == set(hookspecs.STAGES)
    optional = {f.name for f in attrs.fields(PipelineSpec) if f.default is None}
    assert optional == hookspecs.OPTIONAL_STAGES


def test_plugins_lists_params_with_types_and_defaults(fake_components, capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {(r["stage"], r["name"]): r for r in json.loads(capsys.readouterr().out)}
    assert rows[("schedule", "lottery")]["params"] == [
        {"name": "rewind_at", "type": "int", "default": 1},
        {"name": "length", "type": "int", "default": 2},
    ]
    assert rows[("score", "abs")]["params"] == []
    assert main(["plugins"]) == 0
    assert "rewind_at: int = 1, length: int = 2" in capsys.readouterr().out


def test_bench_sparsity_defaults_to_the_pipelines_own(fake_components, write_registry, capsys):
    reg = write_registry(
        '[pipelines.p]\nschedule = "once"\nscore = "abs"\nselect = "topk"\nlayout = "dense"\nkernel = "dense"\n'
        '[pipelines.p.params]\nsparsity = 0.3\n'
    )
    assert main(["bench", "p", "--registry", str(reg), "--model", "resnet-digits", "--repeats", "1", "--no-layers", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sparsity"] == 0.3 and res["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)


def test_report_takes_the_pattern_from_the_selection_and_says_why_layers_stay_dense(
    fake_components, write_registry, small_net
):
    from prunekit.report import layer_rows

    reg = write_registry(
        '[pipelines.p]\nschedule = "once"\nscore = "abs"\nselect = "two-four"\n'
        '[pipelines.p.params]\nsparsity = 0.5\nkeep_first_dense = true\n'
    )
    pipe = Pipeline.load("p", reg)
    pipe.attach(small_net)
    pipe.step(0, total_steps=1)
    rows = {r["name"]: r for r in layer_rows(list(pipe.layers.values()), pipe.left_dense)}
    assert rows["conv2"]["pattern"] == "2:4" and rows["fc"]["pattern"] == "2:4"
    assert rows["conv1"]["pattern"] == "dense" and rows["conv1"]["reason"] == "first conv (keep_first_dense)"
    assert rows["dw"]["pattern"] == "dense" and "skip_grouped" in rows["dw"]["reason"]
    assert rows["conv1"]["shape"] == [8, 3, 3, 3]


def test_a_selection_left_dense_on_purpose_is_reported_and_not_compiled(fake_components, write_registry, small_net):
    import torch

    from prunekit import Selection, hookimpl
    from prunekit.report import layer_rows

    class LeaveFcDense:
        @hookimpl
        def prunekit_select_mask(self, layer, weight, scores):
            if layer.kind == "linear":
                return Selection(mask=torch.ones_like(weight, dtype=torch.bool), dense_reason="too small to pay")
            return Selection(mask=scores > scores.median(), block=(1, 1, 1, 1))

    pipe = Pipeline.load("basic", write_registry(
        '[pipelines.basic]\nschedule = "once"\nscore = "abs"\nselect = "topk"\nlayout = "dense"\nkernel = "dense"\n'))  # fmt: skip
    pipe.components["select"] = LeaveFcDense()
    pipe.pm.unregister(name="select:topk")
    pipe.pm.register(pipe.components["select"], name="select:leave")
    pipe.attach(small_net)
    pipe.step(0, total_steps=1)
    pipe.compile()
    rows = {r["name"]: r for r in layer_rows(list(pipe.layers.values()), pipe.left_dense)}
    assert rows["fc"]["pattern"] == "dense" and rows["fc"]["reason"] == "too small to pay" and rows["fc"]["kernel"] == "dense"
    assert isinstance(small_net.fc, torch.nn.Linear)  # kept as is, no layout/kernel call
    assert rows["conv1"]["pattern"] == "unstructured" and rows["conv1"]["kernel"] == "test-dense"
