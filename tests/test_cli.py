"""The CLI: listing commands, and bad input as one error line with exit status 2, no traceback."""

import json
import subprocess
import sys

import pytest

from prunekit.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_plugins_lists_every_stage(fake_components, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for stage in ("schedule", "score", "select", "layout", "kernel"):
        assert stage in out
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["stage"] for r in rows} == {"schedule", "score", "select", "layout", "kernel"}
    assert all(r["distribution"] == "prunekit-test" for r in rows)


def test_pipelines_marks_missing_and_says_what_to_install(fake_components, basic_registry, capsys):
    assert main(["pipelines", "--registry", str(basic_registry), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["basic"]["ready"] and rows["basic"]["default"]
    assert not rows["uninstalled"]["ready"]
    (miss,) = rows["uninstalled"]["missing"]
    assert miss["distribution"] == "prunekit-fancy" and miss["install"].startswith("pip install -e")
    assert main(["pipelines", "--registry", str(basic_registry)]) == 0
    assert "NOT READY, install prunekit-fancy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "body, expected",
    [
        ("[pipelines.x\n", "TOML syntax error"),
        ('[pipelines.x]\nschedule = "a"\nscore = "b"\nselect = "c"\nkernal = "d"\n', "pipelines.x.kernal: unknown stage"),
    ],
)
def test_bad_registry_exits_2_with_one_line(tmp_path, body, expected):
    reg = tmp_path / "registry.toml"
    reg.write_text(body)
    res = run_cli("run", "--registry", str(reg))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0] and str(reg) in lines[0]


def test_uninstalled_component_exits_2_with_pip_command(tmp_path):
    reg = tmp_path / "registry.toml"
    reg.write_text(
        '[pipelines.x]\nschedule = "s"\nscore = "not-installed-anywhere"\nselect = "c"\n'
        '[distributions.prunekit-extra]\npath = "plugins/extra"\nprovides = ["score.not-installed-anywhere"]\n'
    )
    res = run_cli("pipelines", "--registry", str(reg))
    assert res.returncode == 0 and "NOT READY" in res.stdout
    res = run_cli("run", "x", "--registry", str(reg))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "pip install -e" in res.stderr or "unknown component" in res.stderr
