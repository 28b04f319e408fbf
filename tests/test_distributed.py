"""More than one process: `torchrun --nproc_per_node 2 -m prunekit run ...` on the CPU (gloo).

What is guaranteed, and tested here:

- every process holds bit-identical masks, weights and batch-norm statistics (the run itself checks the
  masks after every update and fails otherwise);
- N processes compute the one-process training step: the same global batches, gradients averaged over
  the global batch, batch norm over the global batch. In float64 the step matches to 1e-10; in float32
  it matches to rounding, and rounding decides a ReLU at an activation of 1e-7 either way, so after some
  epochs the two runs differ slightly and a mask chosen from trained weights can differ at near-ties.
  Masks chosen from the same weights are identical: the first update, from the dense weights, is.
- a run killed under torchrun resumes bit-identical to an uninterrupted torchrun run.

Run as a script (what torchrun starts in each process): ``test_distributed.py step OUT`` or
``test_distributed.py run REGISTRY OUT DENSE``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from prunekit import distributed
from prunekit.calibration import draw_batches
from prunekit.data import load_data
from prunekit.distributed import Dist, GlobalBatchSampler
from prunekit.errors import PrunekitError
from prunekit.models import build_model
from prunekit.pipeline import Pipeline
from prunekit.runjob import dense_model, run_job
from prunekit.training import KILL_AFTER_EPOCH_ENV, fit

# Wanda (calibration statistics on every process) with a global threshold per layer, pruned in rounds:
# at step 0 from the dense weights, at steps 1 and 2 from weights trained under DDP.
REGISTRY = """
[pipelines.ddp]
schedule = "iterative"
score = "wanda"
select = "threshold"
[pipelines.ddp.params]
model = "resnet-digits"
sparsity = 0.7
rounds = 3
round_length = 1
epochs = 3
dense_epochs = 1
calibration_batches = 2
"""


def torchrun(*args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def finish(proc):
    out, err = proc.communicate(timeout=400)
    return proc.returncode, out + err


def toy_data():
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(24, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (24,), generator=g))


def one_epoch(d: Dist) -> dict[str, torch.Tensor]:
    """Three SGD steps of global batch 8 on resnet-digits in float64 (DDP under several processes)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("resnet-digits", 10, (1, 16, 16)).double()
    data = toy_data()
    train = distributed.train_loader(data, 8, d, seed=3)
    test = distributed.eval_loader(torch.utils.data.DataLoader(data, batch_size=8), d)
    fit(model, train, test, epochs=1, lr=0.1, optimizer="sgd", progress=False, dist=d)
    return model.state_dict()


# ---------------------------------------------------------------- in this process


def test_global_batches_do_not_depend_on_the_process_count():
    one = list(GlobalBatchSampler(100, 8, 1, 0, seed=3))
    halves = [list(GlobalBatchSampler(100, 8, 2, r, seed=3)) for r in (0, 1)]
    assert len(one) == 96 and len(set(one)) == 96  # 12 whole batches; the 4 left over sit out
    for b in range(12):
        assert halves[0][4 * b : 4 * b + 4] + halves[1][4 * b : 4 * b + 4] == one[8 * b : 8 * b + 8]
    s = GlobalBatchSampler(100, 8, 1, 0, seed=3)
    s.set_epoch(1)
    assert list(s) != one and sorted(list(s)) != sorted(one)  # a new shuffle every epoch


def test_a_batch_size_that_does_not_split_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(PrunekitError, match="batch_size = 64 .* does not split over 3 processes; set batch_size to a multiple of 3"):
        distributed.start(64)


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = distributed.start(64)
    assert not d.active and d.is_main and not torch.distributed.is_initialized()


# ---------------------------------------------------------------- under torchrun


def test_a_step_on_two_processes_is_the_one_process_step_and_masks_are_checked(tmp_path):
    proc = torchrun(__file__, "step", tmp_path)
    code, log = finish(proc)
    assert code == 0, log
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:  # masks that differ fail every process at once, naming the layer
        assert r.pop("error").startswith("masks after step 0: conv1 mask differs between process 0 and process 1")
    ref = one_epoch(Dist())
    for k, want in ref.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # the processes agree bit for bit
        if want.is_floating_point():
            scale = max(float(want.abs().max()), 1e-12)
            assert float((ranks[0][k] - want).abs().max()) / scale < 1e-10, k  # and compute the one-process step
        else:
            assert torch.equal(ranks[0][k], want), k


def test_torchrun_masks_equal_on_every_rank_and_resume(write_registry, tmp_path):
    reg = write_registry(REGISTRY)
    torch.set_num_threads(1)
    os.environ.pop(KILL_AFTER_EPOCH_ENV, None)
    bundle = load_data("digits", (1, 16, 16), 64, 0)
    cache = {"PRUNEKIT_CACHE": str(tmp_path / "cache")}
    os.environ.update(cache)
    try:
        dense, _, _ = dense_model("resnet-digits", bundle, None, 1, 0, progress=False)
    finally:
        os.environ.pop("PRUNEKIT_CACHE")
    dense_file = tmp_path / "dense.pt"
    torch.save(dense.state_dict(), dense_file)
    common = ["--registry", reg, "--dense", dense_file, "--threads", "1", "--no-progress"]
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"

    single = subprocess.Popen([sys.executable, "-m", "prunekit", "run", "ddp", "--out", str(one), *map(str, common)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **cache})  # fmt: skip
    double = torchrun(__file__, "run", reg, two, dense_file, env=cache)
    killed = torchrun("-m", "prunekit", "run", "ddp", "--out", cut, *common, env={**cache, KILL_AFTER_EPOCH_ENV: "0"})
    (c1, log1), (c2, log2), (ck, logk) = finish(single), finish(double), finish(killed)
    assert c1 == 0 and c2 == 0, log1 + log2
    assert ck != 0 and "SIGKILL" in logk, logk

    # every process selected the same masks, and holds the same weights and batch-norm statistics
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for part in ("masks", "weights", "buffers"):
        assert ranks[0][part].keys() == ranks[1][part].keys()
        assert all(torch.equal(ranks[0][part][k], ranks[1][part][k]) for k in ranks[0][part]), part
    assert ranks[1]["report"] == {"rank": 1}

    # the first masks, chosen from the dense weights, are exactly the one-process masks
    pipe = Pipeline.load("ddp", reg)
    model = build_model("resnet-digits", 10, (1, 16, 16))
    model.load_state_dict(torch.load(dense_file, weights_only=True))
    pipe.attach(model, calibration=draw_batches(bundle.train.dataset, 2, 64, 0))
    pipe.step(0, total_steps=3)
    first = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 0 and len(first["rng"]) == 2 and json.loads(first["run"])["world_size"] == 2
    assert first["pipeline"]["masks"].keys() == {n for n, st in pipe.layers.items()}
    assert all(torch.equal(first["pipeline"]["masks"][n], st.selection.mask) for n, st in pipe.layers.items())

    # the final masks, chosen after DDP training, agree with one process's but for near-ties
    m1 = torch.load(one / "state.pt", weights_only=True)["masks"]
    m2 = torch.load(two / "state.pt", weights_only=True)["masks"]
    same = sum(int((m1[k] == m2[k]).sum()) for k in m1) / sum(m1[k].numel() for k in m1)
    # two processes reduce gradients in another order, so weights drift apart by rounding over the epochs and
    # near-tied blocks flip (98.3-99.5 % agreement seen on Intel and AMD); unrelated masks agree far less
    assert same > 0.97, same
    r1, r2 = (json.loads((p / "report.json").read_text()) for p in (one, two))
    assert r1["sparsity"] == pytest.approx(r2["sparsity"], abs=1e-3) and r2["processes"] == 2
    assert abs(r1["pruned_accuracy"] - r2["pruned_accuracy"]) < 3

    # resumed under torchrun: bit-identical to the uninterrupted two-process run
    code, log = finish(torchrun("-m", "prunekit", "run", "ddp", "--out", cut, "--resume", *common, env=cache))
    assert code == 0, log
    assert log.count("resumed at epoch 1") == 1 and log.count("-> pruned") == 1  # rank 0 alone logs and prints
    w2, wc = (torch.load(p / "pruned.pt", weights_only=True) for p in (two, cut))
    assert all(torch.equal(w2[k], wc[k]) for k in w2)
    rc = json.loads((cut / "report.json").read_text())
    assert rc["history"] == r2["history"] and rc["pruned_accuracy"] == r2["pruned_accuracy"]


# ---------------------------------------------------------------- what each torchrun process runs


def _worker(argv: list[str]) -> None:
    rank = int(os.environ["RANK"])
    if argv[0] == "step":
        d = distributed.start(8)
        try:
            state = one_epoch(d)
            distributed.check_same(d, {"conv1 mask": torch.ones(3, dtype=torch.bool)}, "agreeing masks")
            try:  # what a component that is not deterministic would cause
                distributed.check_same(d, {"conv1 mask": torch.tensor([True, rank == 0, True])}, "masks after step 0")
            except PrunekitError as exc:
                state["error"] = str(exc)
        finally:
            distributed.stop(d)
        torch.save(state, Path(argv[1]) / f"rank{rank}.pt")
        return
    reg, out, dense = argv[1:4]
    pipe = Pipeline.load("ddp", reg)
    report = run_job(pipe, out=out, dense_path=dense, threads=1, progress=False, log=lambda _m: None)
    model = pipe.model
    dump = {
        "masks": {n: st.selection.mask for n, st in pipe.layers.items()},
        "weights": {n: st.module.weight.detach() for n, st in pipe.layers.items()},  # W * mask on every rank
        "buffers": {k: v for k, v in model.named_buffers() if not k.endswith(".mask")},
        "report": {"rank": report["rank"]} if rank else {},
    }
    torch.save(dump, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    _worker(sys.argv[1:])
