"""Faults: a run SIGKILLed at named and random points (training, a checkpoint write, compile), two processes
building the CPU extension with one killed mid-build, an output directory that is read-only or full, and a
global threshold that silently pruned nothing. ``PRUNEKIT_FUZZ_EXAMPLES=N`` runs more random-time kills."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from fuzzlog import examples, record

import prunekit.runjob
from prunekit import checkpoint
from prunekit.atomic import KILL_AT_ENV
from prunekit.cli import main
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


class ZeroConv(Tiny):
    """The conv starts all zeros (and dense_epochs = 0 keeps it so): a layer of ties at 0."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__(num_classes, in_channels)
        torch.nn.init.zeros_(self.conv.weight)
'''

REGISTRY = """
[pipelines.tiny]
schedule = "constant"
score = "magnitude"
select = "threshold"
layout = "csr"
kernel = "csr"
[pipelines.tiny.params]
model = "pk_faults_tiny:Tiny"
sparsity = 0.5
epochs = 3
dense_epochs = 0
fallback = "never"

[pipelines.strict-global]
schedule = "constant"
score = "magnitude"
select = "threshold"
[pipelines.strict-global.params]
model = "pk_faults_tiny:ZeroConv"
sparsity = 0.01  # 52 of 5192 weights: fewer than the conv's 72 zeros, so the pooled threshold is 0
epochs = 1
dense_epochs = 0
scope = "global"
ties = "keep"
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = Path(tempfile.mkdtemp(prefix="prunekit-faults-"))  # not pytest's 0700 tree: `nobody` must read it
    os.chmod(root, 0o755)
    (root / "models").mkdir()
    (root / "models" / "pk_faults_tiny.py").write_text(TINY_MODEL)
    reg = root / "registry.toml"
    reg.write_text(REGISTRY)
    env = {**os.environ, "PRUNEKIT_CACHE": str(root / "cache"),
           "PYTHONPATH": str(root / "models") + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    env.pop(KILL_AT_ENV, None)
    env.pop(KILL_AFTER_EPOCH_ENV, None)
    saved = {k: os.environ.get(k) for k in ("PRUNEKIT_CACHE", "PYTHONPATH")}
    os.environ.update({k: env[k] for k in saved})
    sys.path.insert(0, str(root / "models"))
    plots, prunekit.runjob.write_plots = prunekit.runjob.write_plots, lambda *a, **k: []
    threads = torch.get_num_threads()
    common = ["--registry", str(reg), "--threads", "1", "--no-progress"]
    assert main(["run", "tiny", "--out", str(root / "whole"), *common]) == 0  # the reference, and the dense cache
    for d in (root, root / "cache", *(root / "cache").rglob("*")):
        os.chmod(d, 0o755 if d.is_dir() else 0o644)
    yield {"root": root, "registry": reg, "env": env, "common": common, "whole": root / "whole"}
    prunekit.runjob.write_plots = plots
    torch.set_num_threads(threads)
    sys.path.remove(str(root / "models"))
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    shutil.rmtree(root, ignore_errors=True)


def start(w: dict, out: Path, *extra: str, env: dict | None = None, **popen) -> subprocess.Popen:
    args = [sys.executable, "-m", "prunekit", "run", "tiny", "--out", str(out), *w["common"], *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**w["env"], **(env or {})}, **popen)


def same_run(a: Path, b: Path) -> bool:
    wa, wb = torch.load(a / "pruned.pt", weights_only=True), torch.load(b / "pruned.pt", weights_only=True)
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and ra["history"] == rb["history"]


def temp_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def recover(w: dict, out: Path, what: str, capsys) -> str:
    """After a kill: the last checkpoint loads (if an epoch finished), --resume finishes the run into the
    uninterrupted run's result, and no temp file is left."""
    ck = out / "checkpoint.pt"
    finished = checkpoint.load(ck).epoch if ck.exists() else None  # raises CheckpointError if it does not load
    capsys.readouterr()
    code = main(["run", "tiny", "--out", str(out), "--resume", *w["common"]])
    err = capsys.readouterr().err
    assert code == 0, f"{what}: resume failed: {err}"
    assert same_run(out, w["whole"]), f"{what}: resumed into another result"
    assert not temp_files(out), f"{what}: temp files left after the next run: {temp_files(out)}"
    return "resumed" if finished is not None else "no epoch had finished: started afresh"


POINTS = [
    ("dense", {KILL_AT_ENV: "dense"}),  # the dense model is ready, fine-tuning not begun
    ("mid-write of the 1st checkpoint", {KILL_AT_ENV: "write:checkpoint.pt:1"}),
    ("mid-write of the 2nd checkpoint", {KILL_AT_ENV: "write:checkpoint.pt:2"}),
    ("training epoch 2", {KILL_AFTER_EPOCH_ENV: "1"}),
    ("compile", {KILL_AT_ENV: "compile"}),
    ("after compile, before the report", {KILL_AT_ENV: "compiled"}),
    ("mid-write of report.json", {KILL_AT_ENV: "write:report.json:1"}),
    ("mid-write of pruned.pt", {KILL_AT_ENV: "write:pruned.pt:1"}),
]
CI_POINTS = ["mid-write of the 2nd checkpoint", "training epoch 2", "compile", "mid-write of report.json"]


@pytest.mark.parametrize("point", [p for p, _ in POINTS] if os.environ.get("PRUNEKIT_FUZZ_EXAMPLES") else CI_POINTS)
def test_sigkill_at_a_point_leaves_a_loadable_checkpoint_and_resume_finishes_the_run(world, point, tmp_path, capsys):
    env = dict(POINTS)[point]
    out = tmp_path / "out"
    proc = start(world, out, env=env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    try:
        outcome = recover(world, out, f"SIGKILL at {point}", capsys)
    except Exception as exc:
        record("faults", "failure", f"SIGKILL at {point}: {exc}")
        raise
    record("faults", outcome, point)


def test_sigkill_at_random_times(world, tmp_path, capsys):
    """Kills at uniform random times over a whole run (timed once here), then the same recovery."""
    t0 = time.perf_counter()
    proc = start(world, tmp_path / "timing")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    span = time.perf_counter() - t0
    rng = random.Random(os.environ.get("PRUNEKIT_FUZZ_SEED", "0"))
    for i in range(examples(2)):
        out = tmp_path / f"out{i}"
        at = rng.uniform(1.0, span)  # the first second is Python and torch starting
        proc = start(world, out)
        try:
            proc.communicate(timeout=at)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        if not out.exists():
            out.mkdir()
        try:
            outcome = recover(world, out, f"SIGKILL after {at:.2f} s of {span:.2f} s", capsys)
        except Exception as exc:
            record("faults", "failure", f"random SIGKILL at {at:.2f}s: {exc}")
            raise
        record("faults", f"random time: {outcome}" if proc.returncode else "random time: finished first")


def test_stale_temp_files_of_dead_processes_are_removed_live_ones_kept(world, tmp_path):
    from prunekit.atomic import clean_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".checkpoint.pt.abcd1234.{int(dead.stdout)}.tmp"
    live = tmp_path / f".report.json.abcd1234.{os.getpid()}.tmp"
    other = tmp_path / ".hidden.123.tmp.keep"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    assert clean_stale(tmp_path) == [stale]
    assert live.exists() and other.exists() and not stale.exists()


# ---------------------------------------------------------------- read-only and full output directories


@contextlib.contextmanager
def read_only(*dirs: Path):
    """The directories made unwritable for this user: chmod, and for root (whom modes do not stop) the
    immutable attribute (chattr +i); skips where neither takes."""
    for d in dirs:
        os.chmod(d, 0o555)
    immutable = []
    try:
        probe = dirs[0] / ".probe"
        try:
            probe.write_text("x")
            probe.unlink()
            writable = True
        except OSError:
            writable = False
        if writable:
            for d in dirs:
                if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode:
                    pytest.skip("cannot make a directory read-only here (root, and no chattr +i)")
                immutable.append(d)
        yield
    finally:
        for d in immutable:
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)
        for d in dirs:
            os.chmod(d, 0o755)


def test_read_only_output_directory_is_one_error_before_training(world, tmp_path):
    ro = tmp_path / "readonly"
    ro.mkdir()
    shutil.copytree(world["whole"], ro / "earlier")
    before = {p.name: p.read_bytes() for p in (ro / "earlier").iterdir()}
    with read_only(ro, ro / "earlier"):
        for out in (ro / "earlier", ro / "new"):
            proc = start(world, out)
            _, err = proc.communicate(timeout=300)
            lines = [ln for ln in err.splitlines() if ln.strip() and "cpp_extension" not in ln]
            assert proc.returncode == 2 and "Traceback" not in err, err
            assert len(lines) == 1 and lines[0].startswith(f"prunekit: error: --out {out}: "), err  # nothing started
    assert {p.name: p.read_bytes() for p in (ro / "earlier").iterdir()} == before


def _limit_file_size(limit: int):
    def preexec():  # a full disk, as far as this process can tell: writes past `limit` bytes fail (EFBIG)
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_full_disk_during_a_checkpoint_write_keeps_the_earlier_results(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world["whole"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    size = (out / "checkpoint.pt").stat().st_size
    proc = start(world, out, preexec_fn=_limit_file_size(size // 2))
    _, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.strip() and "cpp_extension" not in ln]
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert lines[-1].startswith(f"prunekit: error: {out / 'checkpoint.pt'}: writing failed (File too large"), err
    assert "the previous checkpoint.pt is unchanged" in lines[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp file, nothing overwritten


def test_too_little_free_space_is_one_error_before_training(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prunekit.runjob, "free_bytes", lambda _d: 10_000)
    code = main(["run", "tiny", "--out", str(tmp_path / "out"), *world["common"]])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {tmp_path / 'out'}: 0.0 MB free, this run writes about" in err
    assert "nothing was trained" in err and not (tmp_path / "out" / "checkpoint.pt").exists()


def test_an_out_path_that_is_a_file_is_one_error(world, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "below"):
        assert main(["run", "tiny", "--out", str(out), *world["common"]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"prunekit: error: --out {out}: "), err


# ---------------------------------------------------------------- silent loss: a global threshold over zeros


def test_global_threshold_over_an_all_zero_layer_warns_and_reports_both_figures(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "strict-global", "--out", str(out), *world["common"]]) == 0
    io = capsys.readouterr()
    warn = [ln for ln in io.err.splitlines() if ln.startswith("prunekit: warning: ")]
    assert warn and "achieved sparsity 0.0000, requested 0.0100" in warn[0], io.err
    assert "sparsity 0.0000 (requested 0.0100)" in io.out  # the summary line
    header = io.out.splitlines()[0]
    assert "requested" in header.split() and "sparsity" in header.split()
    report = json.loads((out / "report.json").read_text())
    assert report["requested_sparsity"] == 0.01 and report["sparsity"] == 0.0
    assert all(row["requested_sparsity"] == 0.01 for row in report["layers"])


# ---------------------------------------------------------------- the CPU extension's build lock


def _procs() -> dict[int, tuple[str, str, int]]:
    """pid -> (comm, cwd, ppid) of every process we can see."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                out[int(d.name)] = ((d / "comm").read_text().strip(), os.readlink(d / "cwd"), ppid)
            except (OSError, ValueError):
                continue
    return out


LOAD = "from prunekit_cpu1xn import ext; ops = ext.load(); print('ok', ext.isa_name(ops.isa()))"


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs /proc to watch the builders")
def test_build_lock_survives_a_killed_builder(tmp_path):
    """A builds from scratch; B waits on the lock; A's Python is SIGKILLed while its compilers run (they
    live on as orphans). B must not build in the directory the orphans write to, and must end with a working
    library; a third process then loads the published library without building."""
    pytest.importorskip("prunekit_cpu1xn")
    from prunekit_cpu1xn import ext

    try:
        ext.load()
    except ext.ExtensionUnavailable as exc:
        if exc.missing_prerequisite:
            pytest.skip(str(exc))
    cache = tmp_path / "cache"
    env = {**os.environ, "PRUNEKIT_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-c", LOAD]

    def spawn() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    a, b = spawn(), None
    try:
        deadline = time.monotonic() + 120
        while not any(c.startswith("cc1plus") and cwd.startswith(str(cache)) for c, cwd, _ in _procs().values()):
            assert a.poll() is None and time.monotonic() < deadline, "the first builder never started compiling"
            time.sleep(0.05)
        b = spawn()
        time.sleep(0.5)  # B now waits on the lock
        os.kill(a.pid, signal.SIGKILL)  # the Python only: its ninja and compilers live on as orphans
        a.wait()
        shared: set[str] = set()
        seen_b = None
        deadline = time.monotonic() + 90
        while b.poll() is None and time.monotonic() < deadline and (seen_b is None or time.monotonic() < seen_b + 1.0):
            ps = _procs()
            ninjas = [cwd for c, cwd, _ in ps.values() if c == "ninja" and cwd.startswith(str(cache))]
            shared |= {cwd for cwd in ninjas if ninjas.count(cwd) > 1}
            if seen_b is None and any(c == "ninja" and ppid == b.pid for c, _, ppid in ps.values()):
                seen_b = time.monotonic()  # watch a little longer, then stop
            time.sleep(0.02)
        try:
            os.killpg(a.pid, signal.SIGKILL)  # done with the orphans
        except ProcessLookupError:
            pass
        assert not shared, f"two ninja builds ran in one directory after the holder died: {sorted(shared)}"
        out, err = b.communicate(timeout=300)
        assert b.returncode == 0 and out.startswith("ok"), err[-2000:]
        t0 = time.perf_counter()
        c = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert c.returncode == 0 and c.stdout.startswith("ok"), c.stderr[-2000:]
        assert time.perf_counter() - t0 < 15, "the third process rebuilt instead of loading the published library"
        (bdir,) = cache.iterdir()
        assert sorted(p.name for p in bdir.iterdir()) == ["prunekit.lock", f"{ext.library_name(bdir)}.so"]
    finally:
        for p in (a, b):
            if p is None:
                continue
            if p.poll() is None:
                p.kill()
                p.communicate()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
