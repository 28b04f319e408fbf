"""Fuzzing the files prunekit reads back: checkpoint.pt (``--resume``), a run directory's pruned.pt /
state.pt / report.json (``prunekit export``), compiled artifacts (``load_compiled``), ``--dense`` weights and
``Pipeline.load_state`` -- truncated, bit-flipped, zeroed, another kind of file, another model's, or a valid
file with one entry of its structure replaced.

Each case must end in one clear error (exit 2 with one ``prunekit: error:`` line, or a PrunekitError) with
nothing loaded half-way (the model and the run directory as they were), or succeed with exactly the result
of the undamaged file (a flipped bit nobody reads); never a traceback, never a silently different result.
``PRUNEKIT_FUZZ_EXAMPLES=N`` raises the number of cases; ``PRUNEKIT_FUZZ_LOG=FILE`` records them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fuzzlog import examples, run_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunekit.runjob
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.export import load_compiled
from prunekit.pipeline import Pipeline
from prunekit.training import KILL_AFTER_EPOCH_ENV

TINY_MODEL = '''
import torch
from torch import nn


class Tiny(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Wider(Tiny):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__(num_classes, in_channels)
        self.conv = nn.Conv2d(in_channels, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 8 * 8, num_classes)
'''

REGISTRY = """
[pipelines.tiny]
schedule = "constant"
score = "magnitude"
select = "threshold"
layout = "csr"
kernel = "csr"
[pipelines.tiny.params]
model = "pk_files_tiny:Tiny"
sparsity = 0.5
epochs = 2
dense_epochs = 0
fallback = "never"
"""


FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=examples(n))


def cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:
        raise AssertionError(f"prunekit {args}: {type(exc).__name__}: {exc}") from exc
    return code, capsys.readouterr().err


def one_error(code: int, err: str, what: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, f"{what}: traceback: {err[-600:]}"
    assert code == 2 and lines and lines[-1].startswith("prunekit: error: "), f"{what}: exit {code}: {err[-600:]!r}"
    assert all(not ln.startswith("prunekit: error") for ln in lines[:-1]), f"{what}: several errors: {err[-600:]!r}"
    return lines[-1]


def tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run (the reference), the same run killed after epoch 0 (its checkpoint), another model's
    run, a compiled artifact; the tiny models importable, plots off (they cost time, not coverage)."""
    root = tmp_path_factory.mktemp("files-fuzz")
    (root / "models").mkdir()
    (root / "models" / "pk_files_tiny.py").write_text(TINY_MODEL)
    sys.path.insert(0, str(root / "models"))
    saved_env = {k: os.environ.get(k) for k in ("PRUNEKIT_CACHE", "PYTHONPATH")}
    os.environ["PRUNEKIT_CACHE"] = str(root / "cache")
    os.environ["PYTHONPATH"] = str(root / "models") + os.pathsep + os.environ.get("PYTHONPATH", "")
    reg = root / "registry.toml"
    reg.write_text(REGISTRY)
    plots, prunekit.runjob.write_plots = prunekit.runjob.write_plots, lambda *a, **k: []
    threads = torch.get_num_threads()
    common = ["--registry", str(reg), "--threads", "1", "--no-progress"]
    assert main(["run", "tiny", "--out", str(root / "whole"), *common]) == 0
    env = {**os.environ, KILL_AFTER_EPOCH_ENV: "0"}
    res = subprocess.run([sys.executable, "-m", "prunekit", "run", "tiny", "--out", str(root / "cut"), *common], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == -9 and (root / "cut" / "checkpoint.pt").is_file(), res.stderr
    assert main(["run", "tiny", "--model", "pk_files_tiny:Wider", "--out", str(root / "wider"), *common]) == 0
    assert main(["export", str(root / "whole"), "--registry", str(reg), "--out", str(root / "model.safetensors")]) == 0
    w = {"root": root, "registry": reg, "common": common, "whole": root / "whole", "cut": root / "cut",
         "wider": root / "wider", "artifact": root / "model.safetensors"}  # fmt: skip
    yield w
    prunekit.runjob.write_plots = plots
    torch.set_num_threads(threads)
    sys.path.remove(str(root / "models"))
    for k, v in saved_env.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


# ---------------------------------------------------------------- damage


def _replace_in(obj, path: list, value):
    """A copy of nested dict/list ``obj`` with the entry at ``path`` replaced (or deleted: value is _DEL)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        out = dict(obj)
        if rest or value is not _DEL:
            out[head] = _replace_in(obj[head], rest, value)
        else:
            out.pop(head)
        return out
    out = list(obj)
    if rest or value is not _DEL:
        out[head] = _replace_in(obj[head], rest, value)
    else:
        out.pop(head)
    return out


_DEL = object()


def _paths(obj, prefix=(), depth=0):
    """Every key path of a nested dict/list (to a bounded depth)."""
    yield list(prefix)
    if depth >= 4:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k), depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, (*prefix, i), depth + 1)


ODD_VALUES = st.sampled_from([None, 0, -1, 10**6, 1.5, float("nan"), "", "x", [], {}, [1, 2], {"a": 1}, True,
                              "prunekit-state/2"]) | st.builds(lambda s: torch.zeros(s), st.sampled_from([(), (0,), (3,), (2, 2)]))  # fmt: skip


@st.composite
def damage(draw: st.DrawFn, data: bytes, structure=None) -> tuple[str, bytes]:
    """(description, damaged bytes) of a file whose bytes are ``data`` (``structure``: its torch.load-ed
    content, for structural damage re-saved with torch.save)."""
    kinds = ["truncate", "flip", "zero", "empty", "garbage", "prefix"] + (["structure", "structure", "structure"] if structure is not None else [])
    kind = draw(st.sampled_from(kinds))
    b = bytearray(data)
    if kind == "truncate":
        n = draw(st.integers(0, len(b) - 1))
        return f"truncated to {n}", bytes(b[:n])
    if kind == "flip":
        where = draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=4))
        for i in where:
            b[i] ^= 1 << draw(st.integers(0, 7))
        return f"bits flipped at {where}", bytes(b)
    if kind == "zero":
        i = draw(st.integers(0, len(b) - 1))
        n = draw(st.integers(1, 64))
        b[i : i + n] = bytes(len(b[i : i + n]))
        return f"zeroed {n} at {i}", bytes(b)
    if kind == "empty":
        return "empty", b""
    if kind == "garbage":
        return "garbage", draw(st.binary(min_size=1, max_size=300))
    if kind == "prefix":
        return "junk prefix", draw(st.binary(min_size=1, max_size=8)) + bytes(b)
    path = draw(st.sampled_from(list(_paths(structure))[1:] or [[]]))
    value = draw(ODD_VALUES | st.just(_DEL))
    changed = _replace_in(structure, path, value)
    if isinstance(changed, dict) and "sha256" in changed and draw(st.booleans()):
        changed = {k: v for k, v in changed.items() if k != "sha256"}  # as a file without the digest: deeper checks
    buf = io.BytesIO()
    torch.save(changed, buf)
    return f"{path} = {'deleted' if value is _DEL else repr(value)[:40]}", buf.getvalue()


def same_run(a: Path, b: Path) -> bool:
    wa, wb = torch.load(a / "pruned.pt", weights_only=True), torch.load(b / "pruned.pt", weights_only=True)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- checkpoint.pt, through --resume


def check_resume(w: dict, desc: str, data: bytes, tmp: Path, capsys) -> str:
    out = tmp / "out"
    shutil.copytree(w["cut"], out)
    (out / "checkpoint.pt").write_bytes(data)
    before = tree(out)
    code, err = cli(["run", "tiny", "--out", str(out), "--resume", *w["common"]], capsys)
    what = f"resume from a checkpoint.pt {desc}"
    if code == 0:
        assert same_run(out, w["whole"]), f"{what}: resumed without an error into a different result"
        return "ok: same result"
    line = one_error(code, err, what)
    assert tree(out) == before, f"{what}: the run directory changed although the resume failed"
    return "error: " + line.split(": ", 3)[-1][:40]


@fuzz(25)
@given(data=st.data())
def test_damaged_checkpoint_resumes_identically_or_fails_in_one_line(world, data, tmp_path_factory, capsys):
    raw = (world["cut"] / "checkpoint.pt").read_bytes()
    structure = torch.load(io.BytesIO(raw), weights_only=True)
    desc, bad = data.draw(damage(raw, structure))
    run_case("files", check_resume, world, desc, bad, tmp_path_factory.mktemp("ck"), capsys)


@pytest.mark.parametrize("path, value", [
    (["optimizer", "param_groups", 0, "momentum"], "tensor"),  # found: `have != want` on a tensor, exit 70
    (["optimizer", "state", 2], _DEL),  # found: torch restarts that parameter's momentum, silently
    (["optimizer", "state", 0, "momentum_buffer"], _DEL),  # found (the lead's run): the same with an empty entry
])  # fmt: skip
def test_found_damaged_optimizer_state_without_digest_is_one_error(world, path, value, tmp_path, capsys):
    """Two cases the fuzzing above found (files without the sha256, whose deeper checks missed them)."""
    structure = torch.load(world["cut"] / "checkpoint.pt", weights_only=True)
    structure.pop("sha256", None)
    buf = io.BytesIO()
    torch.save(_replace_in(structure, path, torch.zeros(2, 2) if value == "tensor" else value), buf)
    out = check_resume(world, f"{path} = {value}", buf.getvalue(), tmp_path, capsys)
    assert out.startswith("error: "), out


def test_checkpoint_of_another_model_or_run_is_refused(world, tmp_path, capsys):
    for src, fix in ((world["wider"], "written by a run with model"), (world["whole"], None)):
        out = tmp_path / src.name
        shutil.copytree(world["cut"], out)
        shutil.copy(src / "checkpoint.pt", out / "checkpoint.pt")
        code, err = cli(["run", "tiny", "--out", str(out), "--resume", *world["common"]], capsys)
        if fix is None:  # the same run, finished: resumes to the same result
            assert code == 0 and same_run(out, world["whole"]), err
        else:
            assert fix in one_error(code, err, "another model's checkpoint")


# ---------------------------------------------------------------- a run directory, through prunekit export


def check_export(w: dict, name: str, desc: str, data: bytes, tmp: Path, capsys) -> str:
    run = tmp / "run"
    shutil.copytree(w["whole"], run)
    (run / name).write_bytes(data)
    art = tmp / "out.safetensors"
    code, err = cli(["export", str(run), "--registry", str(w["registry"]), "--out", str(art)], capsys)
    what = f"export of a run whose {name} is {desc}"
    if code == 0:
        model = build("Tiny")
        load_compiled(model, art)
        ref = build("Tiny")
        load_compiled(ref, w["artifact"])
        x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            assert torch.equal(model(x), ref(x)), f"{what}: exported without an error into a different model"
        return "ok: same model"
    line = one_error(code, err, what)
    assert not art.exists(), f"{what}: failed but wrote {art}"
    return "error: " + line.split(": ", 3)[-1][:40]


def build(cls: str) -> torch.nn.Module:
    import importlib

    torch.manual_seed(0)
    return getattr(importlib.import_module("pk_files_tiny"), cls)()


@fuzz(25)
@given(name=st.sampled_from(["pruned.pt", "state.pt", "report.json"]), data=st.data())
def test_damaged_run_directory_exports_identically_or_fails_in_one_line(world, name, data, tmp_path_factory, capsys):
    raw = (world["whole"] / name).read_bytes()
    structure = torch.load(io.BytesIO(raw), weights_only=True) if name.endswith(".pt") else None
    if name == "report.json" and data.draw(st.booleans()):  # a JSON edit rather than byte damage
        rep = json.loads(raw)
        key = data.draw(st.sampled_from(sorted(rep)))
        rep[key] = data.draw(st.sampled_from([None, 0, -5, "x", [], {}, 10**9, 1.5, True]))
        desc, bad = f"{key} = {rep[key]!r}", json.dumps(rep).encode()
    else:
        desc, bad = data.draw(damage(raw, structure))
    run_case("files", check_export, world, name, desc, bad, tmp_path_factory.mktemp("ex"), capsys)


def test_run_directory_files_of_another_run_are_refused(world, tmp_path, capsys):
    for name in ("pruned.pt", "state.pt"):
        run = tmp_path / name
        shutil.copytree(world["whole"], run)
        shutil.copy(world["wider"] / name, run / name)
        code, err = cli(["export", str(run), "--registry", str(world["registry"]), "--out", str(tmp_path / "a.st")], capsys)
        one_error(code, err, f"export with another run's {name}")


# ---------------------------------------------------------------- compiled artifacts, load_compiled


def check_artifact(w: dict, desc: str, data: bytes, tmp: Path) -> str:
    path = tmp / "model.safetensors"
    path.write_bytes(data)
    model = build("Tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    what = f"load_compiled of an artifact {desc}"
    try:
        load_compiled(model, path)
    except PrunekitError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), f"{what}: unclear error {exc!r}"
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), f"{what}: model changed"
        return "error: " + str(exc).split(": ", 2)[1][:40]
    except Exception as exc:
        raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
    ref = build("Tiny")
    load_compiled(ref, w["artifact"])
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(x), ref(x)), f"{what}: loaded without an error into a different model"
    return "ok: same model"


@fuzz(40)
@given(data=st.data())
def test_damaged_artifact_loads_identically_or_fails_untouched(world, data, tmp_path_factory):
    desc, bad = data.draw(damage(world["artifact"].read_bytes()))
    run_case("files", check_artifact, world, desc, bad, tmp_path_factory.mktemp("art"))


def test_artifact_into_another_model_is_refused_untouched(world):
    model = build("Wider")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match="does not fit this Wider"):
        load_compiled(model, world["artifact"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# ---------------------------------------------------------------- --dense weights, Pipeline.load_state


def check_dense(w: dict, desc: str, data: bytes, tmp: Path, capsys) -> str:
    dense = tmp / "dense.pt"
    dense.write_bytes(data)
    out = tmp / "out"
    code, err = cli(["run", "tiny", "--dense", str(dense), "--out", str(out), "--epochs", "1", *w["common"]], capsys)
    if code == 0:
        return "ok: ran"  # weights that load are weights: any values are a valid dense model
    line = one_error(code, err, f"--dense {desc}")
    return "error: " + line.split(": ", 3)[-1][:40]


@fuzz(15)
@given(data=st.data())
def test_damaged_dense_weights_run_or_fail_in_one_line(world, data, tmp_path_factory, capsys):
    src = world["root"] / "cache" / "dense"
    raw = next(src.glob("pk_files_tiny:Tiny-*.pt")).read_bytes()
    desc, bad = data.draw(damage(raw, torch.load(io.BytesIO(raw), weights_only=True)))
    run_case("files", check_dense, world, desc, bad, tmp_path_factory.mktemp("dn"), capsys)


def check_load_state(w: dict, desc: str, data: bytes, tmp: Path) -> str:
    path = tmp / "state.pt"
    path.write_bytes(data)
    pipe = Pipeline.load("tiny", w["registry"])
    model = build("Tiny")
    pipe.attach(model)
    pipe.prune(0.3)
    masks = {n: st.selection.mask.clone() for n, st in pipe.layers.items()}
    what = f"Pipeline.load_state of a state.pt {desc}"
    try:
        pipe.load_state(path)
    except PrunekitError as exc:
        assert "\n" not in str(exc), f"{what}: multi-line error"
        now = {n: st.selection.mask for n, st in pipe.layers.items()}
        assert all(torch.equal(now[n], masks[n]) for n in masks), f"{what}: failed after changing some masks"
        return "error: " + str(exc).split(": ", 2)[1][:40]
    except Exception as exc:
        raise AssertionError(f"{what}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    return "ok: loaded"


@fuzz(25)
@given(data=st.data())
def test_damaged_state_in_pipeline_load_state(world, data, tmp_path_factory):
    raw = (world["whole"] / "state.pt").read_bytes()
    desc, bad = data.draw(damage(raw, torch.load(io.BytesIO(raw), weights_only=True)))
    run_case("files", check_load_state, world, desc, bad, tmp_path_factory.mktemp("ls"))
