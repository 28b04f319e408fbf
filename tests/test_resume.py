"""Resume that is really a resume: one atomic checkpoint per epoch, and a run killed with SIGKILL after
epoch k then resumed ends bit-identical (CPU, fixed seeds) to a run never interrupted."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit.checkpoint as ckpt_mod
from prunekit.checkpoint import CHECKPOINT_FORMAT, rng_state, set_rng_state
from prunekit.cli import main
from prunekit.data import load_data
from prunekit.errors import CheckpointError
from prunekit.pipeline import Pipeline
from prunekit.runjob import dense_model, run_job
from prunekit.training import KILL_AFTER_EPOCH_ENV

# Real components (installed plugins), tiny settings: a hard-mask pipeline whose masks change after the
# kill (Han rounds) and SUBP (soft masks, regrowth sampled at every step of its ramp).
REAL = """
[pipelines.hard]
schedule = "iterative"
score = "magnitude"
select = "threshold"
[pipelines.hard.params]
model = "resnet-digits"
sparsity = 0.8
rounds = 3
round_length = 1
epochs = 4
dense_epochs = 1

[pipelines.subp]
schedule = "cubic"
score = "bpar"
select = "subp-uniform"
[pipelines.subp.params]
model = "resnet-digits"
n = 16
sparsity = 0.75
start = 0
end = 3
epochs = 4
dense_epochs = 1
"""


def prunekit_run(registry, name, out, cache, *extra, kill_after=None):
    """``python -m prunekit run`` started in its own process (call ``.communicate()`` on it)."""
    env = {**os.environ, "PRUNEKIT_CACHE": str(cache)}
    env.pop(KILL_AFTER_EPOCH_ENV, None)
    if kill_after is not None:
        env[KILL_AFTER_EPOCH_ENV] = str(kill_after)
    args = [sys.executable, "-m", "prunekit", "run", name, "--registry", str(registry), "--out", str(out), "--threads", "1", "--no-progress", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc):
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory):
    """The dense resnet-digits (1 epoch) trained once, where every run of this module finds it cached."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("PRUNEKIT_CACHE")
    os.environ["PRUNEKIT_CACHE"] = str(cache)
    try:
        torch.set_num_threads(1)
        dense_model("resnet-digits", load_data("digits", (1, 16, 16), 64, 0), None, 1, 0, progress=False)
    finally:
        os.environ.pop("PRUNEKIT_CACHE") if old is None else os.environ.__setitem__("PRUNEKIT_CACHE", old)
    return cache


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = torch.load(a / "pruned.pt", weights_only=True), torch.load(b / "pruned.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    ma, mb = (torch.load(p / "state.pt", weights_only=True)["masks"] for p in (a, b))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    assert ra["pruned_accuracy"] == rb["pruned_accuracy"] and ra["sparsity"] == rb["sparsity"]
    assert ra["history"] == rb["history"]  # every epoch's loss and accuracy, the ones before the kill too


@pytest.mark.parametrize("name", ["hard", "subp"])
def test_sigkill_after_epoch_k_then_resume_is_bit_identical(name, write_registry, tmp_path, dense_cache):
    reg = write_registry(REAL)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    runs = [prunekit_run(reg, name, whole, dense_cache), prunekit_run(reg, name, cut, dense_cache, kill_after=1)]
    (code, err), (killed, cut_err) = (finish(p) for p in runs)
    assert code == 0, err
    assert killed == -signal.SIGKILL, cut_err
    assert "(cache " in cut_err  # the dense model came from the cache: no dense training in these runs
    saved = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert saved["format"] == CHECKPOINT_FORMAT and saved["epoch"] == 1
    assert not (cut / "report.json").exists() and not list(cut.glob(".checkpoint.pt.*"))
    code, err = finish(prunekit_run(reg, name, cut, dense_cache, "--resume"))
    assert code == 0, err
    assert f"resumed at epoch 2 from {cut / 'checkpoint.pt'}" in err
    assert_same_run(whole, cut)


# ---------------------------------------------------------------- in process, fake components


TINY_MODEL = '''
import torch
from torch import nn


class TinyDropNet(nn.Module):
    """Dropout draws from the global generator: a resume that does not restore it trains differently."""

    input_shape = (1, 8, 8)

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))
'''


FAKE = """
[pipelines.soft]
schedule = "ramp"
score = "abs"
select = "topk"
[pipelines.soft.params]
model = "prunekit_test_tinydrop:TinyDropNet"
sparsity = 0.6
length = 3
soft = true
decay = 0.0002
epochs = 4
dense_epochs = 1
lr = 0.05
"""


class Crash(Exception):
    pass


@pytest.fixture
def tiny(fake_components, write_registry, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "prunekit_test_tinydrop.py").write_text(TINY_MODEL)
    monkeypatch.syspath_prepend(str(models))  # --model package.module:callable
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    return write_registry(FAKE)


def _run(reg, out, **kw):
    logs = []
    run_job(Pipeline.load("soft", reg), out=out, threads=1, progress=False, log=logs.append, **kw)
    return logs


def test_resume_restores_optimizer_and_generators(tiny, tmp_path, monkeypatch):
    _run(tiny, tmp_path / "whole")
    real_save = ckpt_mod.save

    def save_then_crash(state, path):  # the process dies right after epoch 2's checkpoint is on disk
        real_save(state, path)
        if state.epoch == 2:
            raise Crash

    monkeypatch.setattr(ckpt_mod, "save", save_then_crash)
    with pytest.raises(Crash):
        _run(tiny, tmp_path / "cut")
    monkeypatch.setattr(ckpt_mod, "save", real_save)
    torch.manual_seed(1234)  # whatever the generators hold now must not matter
    logs = _run(tiny, tmp_path / "cut", resume=True)
    assert any(line.startswith("resumed at epoch 3") for line in logs)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_checkpoint_holds_everything_and_reads_with_weights_only(tiny, tmp_path):
    _run(tiny, tmp_path / "o")
    raw = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["epoch"] == 3
    assert {"model", "optimizer", "scheduler", "pipeline", "rng", "history", "run", "dense"} <= set(raw)
    assert raw["optimizer"]["state"] and "momentum_buffer" in next(iter(raw["optimizer"]["state"].values()))
    assert int(raw["pipeline"]["position"]) == 4 and raw["pipeline"]["masks"]
    assert len(raw["rng"]) == 1 and {"torch", "python", "numpy"} <= set(raw["rng"][0])
    assert json.loads(raw["scheduler"])["segments"] == [[0, 4]]
    assert [r["epoch"] for r in json.loads(raw["history"])] == [0, 1, 2, 3]
    assert any(k.endswith("parametrizations.weight.0.mask") for k in raw["model"])


def test_resume_without_a_checkpoint_starts_afresh_with_a_line(tiny, tmp_path):
    logs = _run(tiny, tmp_path / "o", resume=True)
    assert any(line.startswith("--resume: no checkpoint at") and "starting from the beginning" in line for line in logs)
    assert (tmp_path / "o" / "report.json").is_file()


def test_resume_of_a_finished_run_only_compiles_and_reports(tiny, tmp_path):
    _run(tiny, tmp_path / "o")
    first = json.loads((tmp_path / "o" / "report.json").read_text())
    logs = _run(tiny, tmp_path / "o", resume=True)
    assert any(line.startswith("resumed at epoch 4") for line in logs)
    again = json.loads((tmp_path / "o" / "report.json").read_text())
    assert again["history"] == first["history"] and again["pruned_accuracy"] == first["pruned_accuracy"]


def test_resume_on_another_process_count_continues_and_says_so(tiny, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real_save = ckpt_mod.save

    def save_then_crash(state, path):  # dies after epoch 0
        real_save(state, path)
        raise Crash

    monkeypatch.setattr(ckpt_mod, "save", save_then_crash)
    with pytest.raises(Crash):
        _run(tiny, out)
    monkeypatch.setattr(ckpt_mod, "save", real_save)
    raw = torch.load(out / "checkpoint.pt", weights_only=True)
    run = json.loads(raw["run"])
    run["world_size"] = 2  # as if two torchrun processes had written it
    raw["run"], raw["rng"] = json.dumps(run), raw["rng"] * 2
    raw.pop("sha256")
    raw["sha256"] = ckpt_mod.content_digest(raw)  # an honest rewrite, not damage: the digest follows the edit
    torch.save(raw, out / "checkpoint.pt")
    logs = _run(tiny, out, resume=True)
    assert any("written by 2 processes, on 1" in line and "not bit-identical" in line for line in logs)
    assert json.loads((out / "report.json").read_text())["history"][0]["epoch"] == 0


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00 truncated", "not a readable prunekit checkpoint"),
        ({"conv.weight": torch.zeros(1)}, "an older prunekit's checkpoint without optimizer or RNG state"),
        ({"format": "someone-else/3"}, f"not a {CHECKPOINT_FORMAT} file (someone-else/3)"),
        ({"format": CHECKPOINT_FORMAT, "epoch": 0}, "file without run, model"),
    ],
)
def test_a_bad_checkpoint_is_one_clear_error(tiny, tmp_path, capsys, content, message):
    out = tmp_path / "o"
    out.mkdir()
    if isinstance(content, bytes):
        (out / "checkpoint.pt").write_bytes(content)
    else:
        torch.save(content, out / "checkpoint.pt")
    code = main(["run", "soft", "--registry", str(tiny), "--out", str(out), "--resume", "--no-progress", "--threads", "1"])
    assert code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("prunekit: error")]
    assert message in line and str(out / "checkpoint.pt") in line
    with pytest.raises(CheckpointError):
        ckpt_mod.load(out / "checkpoint.pt")


def test_resume_with_other_settings_is_refused(tiny, tmp_path, capsys):
    _run(tiny, tmp_path / "o")
    code = main(["run", "soft", "--registry", str(tiny), "--out", str(tmp_path / "o"), "--resume", "--epochs", "6", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "written by a run with epochs = 4, this run has epochs = 6" in err


def test_rng_states_round_trip_through_tensors():
    import random

    import numpy as np

    assert all(isinstance(t, torch.Tensor) for t in rng_state().values())
    random.gauss(0, 1)  # leaves a cached second normal in python's state
    np.random.standard_normal()  # and in numpy's
    state = rng_state()
    first = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    set_rng_state(state)
    again = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
