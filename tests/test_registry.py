"""registry.toml validation: every bad input is one error naming the file, the key path and the fix."""

import pytest

from prunekit import MissingComponentError, RegistryError
from prunekit.pipeline import Pipeline
from prunekit.registry import load_registry

GOOD_HEAD = """
[pipelines.p]
schedule = "once"
score = "abs"
select = "topk"
"""


def test_loads_pipelines_and_default(fake_components, basic_registry):
    reg = load_registry(basic_registry)
    assert reg.default == "basic"
    assert set(reg.pipelines) == {"basic", "nokernel", "uninstalled"}
    assert reg.pipelines["basic"].params == {"sparsity": 0.5}


@pytest.mark.parametrize(
    "body, expected",
    [
        ("[pipelines.p\nschedule = 1", "TOML syntax error"),
        (GOOD_HEAD + 'sceduler = "x"\n', "pipelines.p.sceduler: unknown stage or key"),
        ('[pipelines.p]\nscore = "abs"\nselect = "topk"\n', "pipelines.p.schedule: missing"),
        (GOOD_HEAD + 'layout = "dense"\n', "'layout' and 'kernel' go together"),
        (GOOD_HEAD + "description = 3\n", "expected str"),
        ('default = "nope"\n' + GOOD_HEAD, "default: no pipeline 'nope'"),
        ("x = 1\n", "no [pipelines.NAME] table"),
    ],
)
def test_structural_errors_name_key_path(write_registry, body, expected):
    path = write_registry(body)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    msg = str(info.value)
    assert expected in msg
    assert str(path) in msg
    assert "\n" not in msg


def test_missing_file():
    with pytest.raises(RegistryError, match="registry file not found"):
        load_registry("/nonexistent/registry.toml")


def test_uninstalled_component_names_distribution_and_pip(fake_components, basic_registry):
    with pytest.raises(MissingComponentError) as info:
        Pipeline.load("uninstalled", basic_registry)
    msg = str(info.value)
    assert "pipelines.uninstalled.select" in msg and "prunekit-fancy" in msg and "pip install -e" in msg


def test_unknown_component_lists_installed(fake_components, write_registry):
    path = write_registry(GOOD_HEAD.replace('"abs"', '"nosuch"'))
    with pytest.raises(RegistryError, match=r"unknown component 'nosuch'; installed score components: abs"):
        Pipeline.load("p", path)


@pytest.mark.parametrize(
    "params, expected",
    [
        ("sparsity = 1.5", "outside [0, 1)"),
        ('sparsity = "high"', "expected float"),
        ("lenght = 3", "unknown parameter(s) lenght"),
        ("soft = 1", "expected bool"),
        ('include = "conv*"', "params"),
        ('optimizer = "lbfgs"', "optimizer = 'lbfgs' is unknown"),
    ],
)
def test_bad_params(fake_components, write_registry, params, expected):
    path = write_registry(GOOD_HEAD + "[pipelines.p.params]\n" + params + "\n")
    with pytest.raises(RegistryError) as info:
        Pipeline.load("p", path)
    assert expected in str(info.value)
    assert "pipelines.p.params" in str(info.value)


def test_params_routed_to_components(fake_components, basic_registry):
    pipe = Pipeline.load("nokernel", basic_registry)
    assert pipe.host.sparsity == 0.6
    assert pipe.component_params["schedule"].length == 3
    assert pipe.component_params["score"] is None
