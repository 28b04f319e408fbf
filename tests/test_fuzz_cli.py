"""Fuzzing the arguments of every command: out-of-range numbers, wrong types, paths that are files,
directories, missing, under a file, too long, unicode; junk data, weights, run directories.

Every case must exit 0, or 2 with its last stderr line ``prunekit: error: ...`` (progress lines and
``prunekit: warning:`` lines may come before it); never a traceback, never another status. In process
(``prunekit.cli.main``), with real components on a tiny model (a run is ~0.3 s); a few cases as real
processes. ``PRUNEKIT_FUZZ_EXAMPLES=N`` raises the number of cases; ``PRUNEKIT_FUZZ_LOG=FILE`` records them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fuzzlog import examples, record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.cli import main

TINY_MODEL = '''
import torch
from torch import nn


class Tiny(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Other(Tiny):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__(num_classes, in_channels)
        self.fc = nn.Linear(4 * 8 * 8, 3)
'''

REGISTRY = """
default = "tiny"
[pipelines.tiny]
schedule = "constant"
score = "magnitude"
select = "threshold"
layout = "csr"
kernel = "csr"
[pipelines.tiny.params]
model = "pk_fuzz_tiny:Tiny"
sparsity = 0.5
epochs = 1
dense_epochs = 0
fallback = "never"

[pipelines.masked]
schedule = "constant"
score = "magnitude"
select = "threshold"
[pipelines.masked.params]
model = "pk_fuzz_tiny:Tiny"
epochs = 1
dense_epochs = 0
"""


FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=examples(n))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model importable, its registry, a dense cache, one finished run (for export) and junk files."""
    root = tmp_path_factory.mktemp("cli-fuzz")
    (root / "models").mkdir()
    (root / "models" / "pk_fuzz_tiny.py").write_text(TINY_MODEL)
    sys.path.insert(0, str(root / "models"))
    old = {k: os.environ.get(k) for k in ("PRUNEKIT_CACHE", "PYTHONPATH")}
    os.environ["PRUNEKIT_CACHE"] = str(root / "cache")
    os.environ["PYTHONPATH"] = str(root / "models") + os.pathsep + os.environ.get("PYTHONPATH", "")
    reg = root / "registry.toml"
    reg.write_text(REGISTRY)
    threads = torch.get_num_threads()
    assert main(["run", "tiny", "--registry", str(reg), "--out", str(root / "run"), "--threads", "1", "--no-progress"]) == 0
    junk = root / "junk"
    junk.mkdir()
    (junk / "text.txt").write_text("not a tensor \u00e9\n")
    (junk / "empty").write_bytes(b"")
    (junk / "dir").mkdir()
    (junk / "dir" / "report.json").write_text("{not json")
    (junk / "images" / "train" / "a").mkdir(parents=True)
    (junk / "images" / "val" / "a").mkdir(parents=True)
    (junk / "images" / "train" / "a" / "x.png").write_bytes(b"\x89PNG not really")
    (junk / "images" / "val" / "a" / "x.png").write_bytes(b"\x89PNG not really")
    (junk / "noclass" / "train").mkdir(parents=True)
    (junk / "noclass" / "val").mkdir(parents=True)
    pruned = (root / "run" / "pruned.pt").read_bytes()
    (junk / "truncated.pt").write_bytes(pruned[: len(pruned) // 2])
    import importlib

    other = importlib.import_module("pk_fuzz_tiny").Other()
    torch.save(other.state_dict(), junk / "other.pt")
    torch.save([1, 2, 3], junk / "list.pt")
    bad_run = root / "badrun"
    bad_run.mkdir()
    for name in ("report.json", "state.pt", "pruned.pt"):
        (bad_run / name).write_bytes((root / "run" / name).read_bytes())
    (bad_run / "state.pt").write_bytes(b"garbage")
    yield {"root": root, "registry": reg, "run": root / "run", "junk": junk, "badrun": bad_run}
    torch.set_num_threads(threads)
    sys.path.remove(str(root / "models"))
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


JUNK_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=10)
PATH_KINDS = ("missing", "file", "empty-file", "dir", "under-file", "long", "unicode-dir", "junk-dir", "truncated",
              "other-model", "list")  # fmt: skip


def path_of(kind: str, w: dict, tmp: Path) -> str:
    j = w["junk"]
    return str({
        "missing": tmp / "missing" / "x",
        "file": j / "text.txt",
        "empty-file": j / "empty",
        "dir": tmp,
        "under-file": j / "text.txt" / "child",
        "long": tmp / ("n" * 300),
        "unicode-dir": tmp / "ключ ✓",
        "junk-dir": j / "dir",
        "truncated": j / "truncated.pt",
        "other-model": j / "other.pt",
        "list": j / "list.pt",
    }[kind])  # fmt: skip


def bad_number(kind: str) -> st.SearchStrategy[str]:
    """Text that is not a valid value: out of range, wrong type, junk (never a valid small number)."""
    out_of_range = {"int": st.sampled_from(["0", "-1", "-5", "100001", str(10**30), "4097", "1000000"]),
                    "float": st.sampled_from(["1.0", "1", "-0.1", "1.5", "2", str(10**30), "1e400", "-1e-9"])}[kind]  # fmt: skip
    junk = st.sampled_from(["nan", "inf", "-inf", "", " ", "x", "1.5", "0x10", "1e3", "½", "١", "1_000", "None", "--json"])
    return st.one_of(out_of_range, junk, JUNK_TEXT.filter(lambda t: not _valid(t, kind)))


def _valid(text: str, kind: str) -> bool:
    try:
        v = int(text) if kind == "int" else float(text)
    except (ValueError, OverflowError):
        return False
    return (1 <= v <= 4096) if kind == "int" else (0 <= v < 1)


@st.composite
def argv(draw: st.DrawFn) -> tuple[str, list[tuple[str, str, object]]]:
    """(command, [(option, 'good'|'bad', value spec)]): every option absent or good, then 0-2 of them bad."""
    cmd = draw(st.sampled_from(("plugins", "pipelines", "run", "bench", "export", "run", "bench", "export")))
    paths = st.sampled_from(PATH_KINDS).map(lambda k: ("path", k))
    fixed: list[tuple[str, str, object]] = []
    options: list[tuple[str, object, st.SearchStrategy]] = []  # (name, good value or strategy, bad strategy)
    if cmd == "plugins":
        options.append(("--json", None, st.nothing()))
    elif cmd == "pipelines":
        options += [("--registry", ("registry",), paths), ("--json", None, st.nothing())]
    elif cmd in ("run", "bench"):
        fixed.append(("--registry", "good", ("registry",)))
        options += [
            ("pipeline", st.sampled_from(["tiny", "masked"]), JUNK_TEXT.filter(lambda t: t not in ("tiny", "masked") and not t.startswith("-"))),
            ("--model", "pk_fuzz_tiny:Tiny", st.sampled_from(["nosuch", "pk_fuzz_tiny:Nope", "pk_fuzz_tiny:Other", "os:getcwd",
                                                              "builtins:dict", "math:pi", ":", "pk_fuzz_tiny:", "résnet"]) | JUNK_TEXT),
            ("--threads", st.sampled_from(["1", "2"]), bad_number("int")),
            ("--batch", st.sampled_from(["1", "2", "3"]), bad_number("int")),
        ]  # fmt: skip
        if cmd == "run":
            fixed.append(("--no-progress", "good", None))
            options += [
                ("--data", "digits", paths | st.sampled_from([("data", "images"), ("data", "noclass"), ("text", "cifar10:/nonexistent")])),
                ("--epochs", st.sampled_from(["1", "2"]), bad_number("int")),
                ("--out", ("out",), paths),
                ("--dense", ("path", "other-model"), paths),
                ("--resume", None, st.nothing()),
            ]  # fmt: skip
        else:
            fixed.append(("--repeats", "good", "2"))
            options += [
                ("--sparsity", st.sampled_from(["0", "0.5", "0.9", "0.25"]), bad_number("float")),
                ("--repeats", "1", bad_number("int")),
                ("--no-layers", None, st.nothing()),
                ("--baselines", "eager", JUNK_TEXT | st.sampled_from(["eager,", ",", "onnx", "eager,eager"])),
                ("--json", None, st.nothing()),
            ]
    else:  # export
        fixed.append(("--registry", "good", ("registry",)))
        options += [("run_dir", ("run",), paths | st.just(("badrun",))), ("--out", ("artifact",), paths), ("--onnx", ("onnx",), paths)]
    chosen: dict[str, tuple[str, object]] = {}
    for name, good, _bad in options:
        if name == "run_dir" or draw(st.booleans()):
            chosen[name] = ("good", draw(good) if isinstance(good, st.SearchStrategy) else good)
    badable = [(n, b) for n, _g, b in options if not b.is_empty]
    for name, bad in draw(st.lists(st.sampled_from(badable), max_size=2, unique_by=lambda x: x[0])) if badable else []:
        chosen[name] = ("bad", draw(bad))
    spec = [f for f in fixed if f[0] not in chosen] + [(n, how, v) for n, (how, v) in chosen.items()]
    if "--dense" in chosen and chosen["--dense"][0] == "good":  # a good --dense is another model's weights: bad
        spec = [(n, "bad" if n == "--dense" else h, v) for n, h, v in spec]
    return cmd, spec


def placeholder(tag: str, rest: list, w: dict, tmp: Path) -> str:
    """The path or text a drawn placeholder stands for in this case's scratch directory."""
    if tag in ("registry", "run", "badrun"):
        return str(w[tag])
    if tag == "path":
        return path_of(rest[0], w, tmp)
    if tag == "data":
        return str(w["junk"] / rest[0])
    if tag == "text":
        return rest[0]
    return str(tmp / {"out": "out", "artifact": "model.safetensors", "onnx": "model.onnx"}[tag])


def materialise(cmd: str, spec: list, w: dict, tmp: Path) -> list[str]:
    args = [cmd]
    for name, _how, value in spec:
        if isinstance(value, tuple):
            tag, *rest = value
            value = placeholder(tag, rest, w, tmp)
        if name in ("pipeline", "run_dir"):
            args.append(value)
        elif value is None:
            args.append(name)
        else:
            args += [name, str(value)]
    return args


def check_argv(args: list[str], capsys) -> str:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse: usage errors and --help
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:
        raise AssertionError(f"prunekit {args}: {type(exc).__name__}: {exc}") from exc
    err = capsys.readouterr().err
    assert "Traceback" not in err, f"prunekit {args}: traceback: {err[-800:]}"
    if code == 0:
        return "ok"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and lines, f"prunekit {args}: exit {code}: {err[-600:]!r}"
    assert lines[-1].startswith("prunekit: error: "), f"prunekit {args}: last line is not the error: {err[-600:]!r}"
    assert all(ln.startswith(("prunekit: warning: ", "dense ", "check: ", "calibration ", "resumed ", "--resume:"))
               for ln in lines[:-1]), f"prunekit {args}: stray stderr lines: {err[-600:]!r}"  # fmt: skip
    return "error: " + lines[-1][len("prunekit: error: "):][:40]


@fuzz(70)
@given(case=argv(), data=st.data())
def test_every_command_exits_0_or_2_with_one_error_line(case, data, world, tmp_path_factory, capsys):
    cmd, spec = case
    tmp = tmp_path_factory.mktemp("case")
    args = materialise(cmd, spec, world, tmp)
    if cmd in ("run", "bench") and "--threads" not in args:
        args += ["--threads", "1"]
    cwd = os.getcwd()
    os.chdir(tmp)  # the default --out (runs/latest) lands here, not in the checkout
    try:
        outcome = check_argv(args, capsys)
    except AssertionError as exc:
        record("cli", "failure", str(exc))
        if not os.environ.get("PRUNEKIT_FUZZ_KEEP_GOING"):
            raise
        return
    finally:
        os.chdir(cwd)
    record("cli", outcome, cmd)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "--threads", "100000"], "--threads: 100000 is out of range"),  # was a hang: a 100000-thread pool
        (["run", "--epochs", str(10**30)], "--epochs: 1000000000000000000000000000000 is out of range"),
        (["bench", "--batch", "1000000"], "--batch: 1000000 is out of range"),
        (["run", "x\ny"], "no pipeline 'x\\ny'"),  # a newline from the user stays one line
    ],
)
def test_out_of_range_and_odd_values_as_real_processes(world, args, expected):
    res = subprocess.run([sys.executable, "-m", "prunekit", *args, "--registry", str(world["registry"])],
                         capture_output=True, text=True, timeout=120, env={**os.environ})  # fmt: skip
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "cpp_extension" not in ln]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: ") and expected in lines[0], res.stderr
