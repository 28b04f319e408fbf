"""`prunekit run`: train (or load) the dense model, prune and fine-tune, evaluate, compile, report."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch

from prunekit import checkpoint, distributed
from prunekit.atomic import KILL_AT_ENV, WriteError, atomic_torch_save, clean_stale, file_sha256, free_bytes
from prunekit.calibration import draw_batches
from prunekit.checkpoint import Checkpoint
from prunekit.data import is_cifar10, load_data
from prunekit.distributed import Dist
from prunekit.errors import CheckpointError, KernelMismatchError, PrunekitError
from prunekit.memory import peak_rss_bytes, release
from prunekit.models import build_model, model_spec
from prunekit.pipeline import Pipeline
from prunekit.report import layer_rows, write_json_atomic, write_plots
from prunekit.timing import interleaved_medians
from prunekit.training import EpochRecord, evaluate, fit, lr_segments, make_optimizer, prune_and_finetune
from prunekit.verify import capture_io, check_tolerance, layer_errors, max_rel_err, shared_copy


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def _test_kill(point: str) -> None:
    """Tests only (tests/test_faults.py): SIGKILL this process at a named point of the run."""
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def prepare_out(out: Path) -> None:
    """Before any work: ``out`` is (or can be made) a directory this process can write to, and the temp files
    of an earlier run killed mid-write are gone. One PrunekitError naming ``--out`` otherwise."""
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"--out {out}: is a file, not a directory; pass a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunekitError(f"--out {out}: cannot create the directory ({exc.strerror or exc}); pass a writable "
                            "directory") from None  # fmt: skip
    probe = out / f".prunekit-write-test.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"prunekit")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        free = free_bytes(out)
        room = f"; {free / 1e6:.1f} MB free there" if free is not None else ""
        raise PrunekitError(f"--out {out}: not writable ({exc.strerror or exc}{room}); pass a writable directory "
                            "with free space (nothing was written there)") from None  # fmt: skip
    finally:
        probe.unlink(missing_ok=True)
    clean_stale(out)


def checkpoint_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """About what one checkpoint.pt of ``model`` takes: weights and masks (float buffers), the optimizer's
    slots (momentum for SGD, two moments for Adam), the pipeline's bool masks."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    slots = 2 if optimizer == "adam" else 1
    return params * (2 + slots) + buffers + params // 4


def check_space(out: Path, model: torch.nn.Module, optimizer: str) -> None:
    """Before fine-tuning: room for two checkpoints (the old one stays until the new one is renamed over it),
    pruned.pt and state.pt. One PrunekitError with both figures otherwise."""
    free = free_bytes(out)
    if free is None:
        return
    need = 2 * checkpoint_bytes(model, optimizer) + 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    if free < need:
        raise PrunekitError(f"--out {out}: {free / 1e6:.1f} MB free, this run writes about {need / 1e6:.1f} MB "
                            "(two checkpoints while one is replaced, pruned.pt, state.pt); free space or pass another "
                            "--out (nothing was trained)")  # fmt: skip


def check_finite(model: torch.nn.Module, when: str, fix: str) -> None:
    """One PrunekitError naming the first parameter with NaN/Inf values: pruning and compiling them has no
    defined result (W * mask keeps NaN * 0 = NaN, a kernel drops the weight)."""
    for name, p in model.named_parameters():
        bad = p.numel() - int(torch.count_nonzero(torch.isfinite(p.detach())))
        if bad:
            raise PrunekitError(f"{when}: {name} has {bad} NaN/Inf of {p.numel()} values; {fix}")


@torch.no_grad()
def check_model_fits(model: torch.nn.Module, model_name: str, data: Any) -> None:
    """One forward pass of two zero inputs: the model takes the data's input shape and gives one logit per
    class (a user model with another head would fail inside the loss, after the dense training)."""
    was = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, *data.input_shape))
    except Exception as exc:
        raise PrunekitError(f"--model {model_name} cannot take {data.name}'s inputs of shape {tuple(data.input_shape)} "
                            f"({type(exc).__name__}: {str(exc)[:160]}); pick a model for this input size") from None  # fmt: skip
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, data.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PrunekitError(f"--model {model_name} gives outputs {got} for a batch of 2, {data.name} has "
                            f"{data.num_classes} classes: build it with num_classes (its factory's first argument)")  # fmt: skip


def check_host_settings(pipe: Pipeline) -> None:
    """Host parameters that load but would overflow later (torch's generators take 64-bit seeds)."""
    where = f"{pipe.registry.source}: pipelines.{pipe.name}.params"
    if not 0 <= pipe.host.seed < 2**62:
        raise PrunekitError(f"{where}.seed = {pipe.host.seed} is out of range; use an integer in [0, 2**62)")
    if pipe.host.batch_size > 2**20 or pipe.host.calibration_batches > 2**20:
        raise PrunekitError(f"{where}: batch_size = {pipe.host.batch_size}, calibration_batches = "
                            f"{pipe.host.calibration_batches}; use at most {2**20} each")  # fmt: skip


def load_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file; check --dense") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load as weights for this model ({type(exc).__name__}: {str(exc)[:160]}); train it anew without --dense") from None


def input_shape_for(model_name: str, data: str) -> tuple[int, int, int]:
    spec = model_spec(model_name)
    if spec.input_shape[1] >= 224 and (data == "digits" or is_cifar10(data)):
        # torchvision nets on 8x8 digits or 32x32 CIFAR: 32x32, or the smallest size the model accepts
        return spec.valid_input((spec.input_shape[0], 32, 32))
    return spec.input_shape


def dense_model(
    model_name: str, data: Any, dense_path: str | None, epochs: int, seed: int, progress: bool, dist: Dist | None = None
) -> tuple[torch.nn.Module, float, str]:
    """The trained dense model (on the CPU): from --dense, from the cache, or trained now (and cached).

    With several processes the cache decision is rank 0's, training runs under DDP on every process and
    rank 0 writes the cache entry; its key then names the process count (a different training run)."""
    d = dist or Dist()
    train, test = data.train, data.test
    if d.active:
        train = distributed.train_loader(data.train.dataset, data.train.batch_size, d, seed)
        test = distributed.eval_loader(data.test, d)
    torch.manual_seed(seed)
    model = build_model(model_name, data.num_classes, data.input_shape)
    check_model_fits(model, model_name, data)
    if dense_path:
        load_weights(model, Path(dense_path))
        return model, evaluate(model, test, d), str(dense_path)
    procs = f":ws{d.world_size}" if d.active else ""
    key = hashlib.sha256(f"{model_name}:{data.name}:{data.input_shape}:{epochs}:{seed}{procs}:v1".encode()).hexdigest()[:12]
    cached = cache_dir() / "dense" / f"{model_name}-{data.name}-{key}.pt"
    hit = False
    if d.is_main and cached.is_file():
        try:
            load_weights(model, cached)
            hit = True
        except CheckpointError:
            cached.unlink(missing_ok=True)  # a corrupt cache entry is retrained, not trusted
            torch.manual_seed(seed)
            model = build_model(model_name, data.num_classes, data.input_shape)
    if distributed.flag_from_main(d, hit):
        if not d.is_main:
            load_weights(model, cached)
        return model, evaluate(model, test, d), f"cache {cached}"
    model.to(d.device)
    acc = fit(model, train, test, epochs, lr=1e-3, optimizer="adam", progress=progress, dist=d)
    model.cpu()
    if d.is_main:
        try:
            atomic_torch_save(model.state_dict(), cached)
        except WriteError as exc:  # a read-only or full cache costs the next run a retraining, not this run
            warnings.warn(f"dense weights not cached: {exc}", stacklevel=2)
    return model, acc, f"trained {epochs} epochs" + (f" on {d.world_size} processes" if d.active else "")


def run_settings(pipe: Pipeline, model_name: str, data_name: str, epochs: int, d: Dist) -> dict[str, Any]:
    """What a checkpoint must have been written with to be resumed by this run (world size aside)."""
    h = pipe.host
    settings = {
        "pipeline": pipe.name,
        "components": pipe.spec.components(),
        "params": dict(pipe.spec.params),
        "model": model_name,
        "data": data_name,
        "epochs": epochs,
        "lr": h.lr,
        "optimizer": h.optimizer,
        "batch_size": h.batch_size,
        "seed": h.seed,
        "world_size": d.world_size,
    }
    return json.loads(json.dumps(settings, sort_keys=True, default=str))  # as it reads back from the file


def _load_pipeline_state(pipe: Pipeline, state: dict[str, Any], source: Path) -> None:
    try:
        pipe.load_state_dict(state, source=f"{source} (pipeline state)")
    except PrunekitError:
        raise
    except Exception as exc:  # a damaged state dict (missing keys, wrong types) is the file's fault, one line
        raise CheckpointError(f"{source}: damaged pipeline state ({type(exc).__name__}: {str(exc)[:120]}); remove it "
                              "or pass another --out to start afresh") from None  # fmt: skip


def _same_settings(have: Any, want: Any) -> bool:
    """``have == want`` for plain values; False (not an exception) when a damaged file put tensors there."""
    try:
        return bool(have == want)
    except (RuntimeError, TypeError, ValueError):  # a tensor in the comparison: not a setting this run makes
        return False


def _check_state_coverage(saved: Checkpoint, path: Path) -> None:
    """A file without a digest whose optimizer state covers some parameters but not all: torch would start
    the missing ones afresh, a silently different run. (A file with a matching digest was written whole.)"""
    state, groups = saved.optimizer.get("state"), saved.optimizer.get("param_groups")
    if saved.verified or not isinstance(state, dict) or not state or not isinstance(groups, list):
        return
    params = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
    missing = [i for i in params if i not in state]
    if missing:
        raise CheckpointError(f"{path}: its optimizer state covers {len(params) - len(missing)} of {len(params)} "
                              f"parameters (none for #{missing[0]}); the file is damaged: pass another --out")  # fmt: skip
    # every parameter's entry holds the same buffers (momentum, or Adam's two moments and step): one with fewer
    # would restart them from zero, again a silently different run
    keys = {i: frozenset(v) if isinstance(v, dict) else None for i, v in state.items()}
    full = max((k for k in keys.values() if k is not None), key=len, default=frozenset())
    short = [i for i, k in keys.items() if k != full]
    if short:
        raise CheckpointError(f"{path}: the optimizer state of parameter #{short[0]} lacks "
                              f"{', '.join(sorted(full - (keys[short[0]] or frozenset()))) or 'its buffers'}; the file is "
                              "damaged: pass another --out")  # fmt: skip


def _restore(pipe: Pipeline, model: torch.nn.Module, saved: Checkpoint, path: Path, segments: list) -> None:
    """Masks, snapshots, schedule position and weights from the checkpoint, after checking they fit."""
    mine = [list(s) for s in segments]
    if saved.scheduler.get("segments") != mine or saved.scheduler.get("base_lr") != pipe.host.lr:
        raise CheckpointError(f"{path}: written with learning-rate segments {saved.scheduler.get('segments')} from lr "
                              f"{saved.scheduler.get('base_lr')}, this run has {mine} from {pipe.host.lr}; pass another --out")  # fmt: skip
    _load_pipeline_state(pipe, saved.pipeline, path)
    if pipe.position != saved.epoch + 1:
        raise CheckpointError(f"{path}: pipeline position {pipe.position} does not follow epoch {saved.epoch}; the file is damaged")
    try:
        model.load_state_dict(saved.model)
    except Exception as exc:
        raise CheckpointError(f"{path}: the saved weights do not fit this model ({type(exc).__name__}: {str(exc)[:160]})") from None
    fresh = make_optimizer(model, pipe.host.optimizer, pipe.host.lr)
    want = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in fresh.state_dict()["param_groups"]]
    groups = saved.optimizer.get("param_groups")
    have = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} if isinstance(g, dict) else g
            for g in groups] if isinstance(groups, list) else groups  # fmt: skip
    if not _same_settings(have, want):  # momentum, betas, weight decay: this run's optimizer's (lr is per epoch)
        raise CheckpointError(f"{path}: its optimizer settings {str(have)[:160]} are not this run's {str(want)[:160]}; "
                              "the file is damaged or from another prunekit: pass another --out")  # fmt: skip
    _check_state_coverage(saved, path)
    try:  # the fine-tuning loop loads it into its optimizer: fail here, naming the file, if it cannot
        fresh.load_state_dict(saved.optimizer)
        for p, state in fresh.state.items():  # a damaged buffer of the right keys but the wrong dtype or shape
            for k, t in state.items():
                if isinstance(t, torch.Tensor) and k != "step" and not torch.is_floating_point(t):
                    raise TypeError(f"{k} is {t.dtype}")
                if isinstance(t, torch.Tensor) and k != "step" and t.shape != p.shape:
                    raise ValueError(f"{k} has shape {tuple(t.shape)}, its parameter {tuple(p.shape)}")
    except Exception as exc:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model ({type(exc).__name__}: {str(exc)[:160]})") from None


@torch.no_grad()
def _pipeline_to_cpu(pipe: Pipeline, model: torch.nn.Module) -> None:
    """After training on a GPU: the model and the pipeline's selections back on the CPU, where the layout
    and kernel stages and the latency measurement run (as they do after a CPU run)."""
    state = pipe.state_dict()
    model.cpu()
    _load_pipeline_state(pipe, state, Path("<after training>"))


def run_job(
    pipe: Pipeline,
    model_name: str | None = None,
    data: str = "digits",
    epochs: int | None = None,
    threads: int | None = None,
    out: str | os.PathLike[str] = "runs/latest",
    dense_path: str | None = None,
    resume: bool = False,
    progress: bool = True,
    latency_batch: int = 1,
    log: Any = print,
) -> dict[str, Any]:
    """Under torchrun every process runs this; rank 0 logs, checkpoints, compiles and writes the report,
    the others return ``{"rank": r, ...}`` after fine-tuning (see prunekit.distributed)."""
    if threads:
        torch.set_num_threads(threads)
    d = distributed.start(pipe.host.batch_size)
    try:
        return _run(pipe, model_name, data, epochs, Path(out), dense_path, resume, progress, latency_batch, log, d)
    finally:
        distributed.stop(d)


def _run(pipe: Pipeline, model_name: str | None, data: str, epochs: int | None, out: Path, dense_path: str | None,
         resume: bool, progress: bool, latency_batch: int, log: Any, d: Dist) -> dict[str, Any]:  # fmt: skip
    h = pipe.host
    say = log if d.is_main else (lambda _msg: None)
    progress = progress and d.is_main
    model_name = model_name or h.model
    epochs = epochs or h.epochs
    check_host_settings(pipe)
    if d.is_main:
        prepare_out(out)  # a read-only, full or misnamed --out fails here, before any training
    bundle = load_data(data, input_shape_for(model_name, data), h.batch_size, h.seed)
    # fine-tuning batches: a pure function of (seed, epoch), the same global batches for any process count
    train = distributed.train_loader(bundle.train.dataset, h.batch_size, d, h.seed)
    test = distributed.eval_loader(bundle.test, d)
    settings = run_settings(pipe, model_name, bundle.name, epochs, d)
    ckpt = out / "checkpoint.pt"
    saved: Checkpoint | None = None
    if resume and ckpt.is_file():
        saved = checkpoint.load(ckpt)
        checkpoint.check_run(ckpt, saved.run, settings)
    elif resume:
        legacy = " (the state.pt there is not a resume point: prunekit now resumes from checkpoint.pt only)" if (out / "state.pt").is_file() else ""
        say(f"--resume: no checkpoint at {ckpt}; starting from the beginning{legacy}")

    if saved is None:
        model, dense_acc, origin = dense_model(model_name, bundle, dense_path, h.dense_epochs, h.seed, progress, d)
        pipe.attach(model)
    else:  # the checkpoint holds the weights: no dense training or cache needed
        torch.manual_seed(h.seed)
        model = build_model(model_name, bundle.num_classes, bundle.input_shape)
        try:
            dense_acc, origin = float(saved.dense["accuracy"]), f"{saved.dense['origin']}, via {ckpt}"
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{ckpt}: damaged {checkpoint.CHECKPOINT_FORMAT} file (its dense record); remove it "
                                  "or pass another --out to start afresh") from None  # fmt: skip
        pipe.attach(model)
    say(f"dense {model_name} on {bundle.name}: {dense_acc:.2f}% ({origin})")
    release()  # the dense training's optimizer and gradients, before fine-tuning allocates its own
    _test_kill("dense")
    if saved is None:
        check_finite(model, f"dense {model_name} ({origin})", "train it anew (lower lr) or fix the --dense file")
    if d.is_main:
        check_space(out, model, h.optimizer)
    segments = lr_segments(pipe.plan(epochs), epochs)
    if saved is not None:
        _restore(pipe, model, saved, ckpt, segments)
    if pipe.needs:
        # identical seeded batches on every process: the statistics, and so the masks, are the same everywhere
        pipe.set_calibration(draw_batches(bundle.train.dataset, h.calibration_batches, h.batch_size, h.seed))
        say(f"calibration for {', '.join(sorted(pipe.needs))}: {pipe.calibration.source}")
    probe = pipe.check(example=torch.randn(2, *bundle.input_shape))
    err = "" if probe.max_rel_err is None else f", compiled max rel err {probe.max_rel_err:.1e}"
    say(f"check: every stage ran on {probe.layers} layers of a copy in {probe.seconds:.1f} s{err}")
    release()  # the checked copy of the model and its packed layers
    if d.active:
        say(f"{d.world_size} processes ({d.backend}), {h.batch_size // d.world_size} samples of each batch of {h.batch_size} per process")

    # the loader's generator: CIFAR-10 augmentation draws from it (the order comes from GlobalBatchSampler)
    generators = {"data": bundle.train.generator} if bundle.train.generator is not None else {}
    if saved is not None and saved.run.get("world_size") == d.world_size:
        try:
            checkpoint.set_rng_state(saved.rng[d.rank], generators)
        except Exception as exc:  # wrong sizes or dtypes in a damaged file
            raise CheckpointError(f"{ckpt}: the generator states cannot be restored ({type(exc).__name__}: "
                                  f"{str(exc)[:120]}); remove it or pass another --out") from None  # fmt: skip
        say(f"resumed at epoch {pipe.position} from {ckpt}")
    else:
        if saved is not None:
            say(f"resumed at epoch {pipe.position} from {ckpt}, written by {saved.run.get('world_size')} processes, on "
                f"{d.world_size}: generators restart from the seed, so this is not bit-identical to an uninterrupted run")  # fmt: skip
        checkpoint.seed_all(h.seed + d.rank, generators)  # the same start whether the dense model was trained or cached
    model.to(d.device)
    history = list(saved.history) if saved is not None else []
    dense_info = {"accuracy": dense_acc, "origin": origin if saved is None else saved.dense["origin"]}

    def save_checkpoint(rec: EpochRecord, opt: torch.optim.Optimizer) -> None:
        history.append(attrs.asdict(rec))
        rng = distributed.gather_tensors(d, checkpoint.rng_state(generators))  # a collective: every process calls it
        if d.is_main:
            scheduler = {"kind": "cosine per segment, restarting at rewinds", "base_lr": h.lr,
                         "segments": [list(s) for s in segments], "last_lr": [g["lr"] for g in opt.param_groups]}  # fmt: skip
            state = Checkpoint(rec.epoch, settings, model.state_dict(), opt.state_dict(), scheduler, pipe.state_dict(), rng, history, dense_info)
            checkpoint.save(state, ckpt)
        distributed.barrier(d)  # no process moves on (or dies) before the checkpoint is on disk

    prune_and_finetune(pipe, model, train, test, epochs, h.lr, h.optimizer, progress, save_checkpoint,
                       dist=d, optimizer_state=saved.optimizer if saved is not None else None)  # fmt: skip
    pruned_acc = evaluate(model, test, d)
    distributed.barrier(d)
    if not d.is_main:
        return {"rank": d.rank, "pipeline": pipe.name, "pruned_accuracy": pruned_acc, "sparsity": pipe.sparsity()}
    if d.device != "cpu":
        _pipeline_to_cpu(pipe, model)
    check_finite(model, f"after fine-tuning {pipe.name}", "the training diverged: lower lr (the last checkpoint "
                 "holds the weights; --resume repeats the same steps)")  # fmt: skip
    pipe.save(out / "state.pt")  # the final pruning state, for Pipeline.load_state (resuming reads checkpoint.pt)
    pipe.finalize()
    release()  # the optimizer's slots, the gradients and the baked masks: back before compiling
    atomic_torch_save(model.state_dict(), out / "pruned.pt")
    report: dict[str, Any] = {
        "pipeline": pipe.name,
        "components": pipe.describe()["components"],
        "model": model_name,
        "num_classes": bundle.num_classes,
        "data": bundle.name,
        "epochs": epochs,
        "threads": torch.get_num_threads(),
        "dense_accuracy": dense_acc,
        "pruned_accuracy": pruned_acc,
        "accuracy_drop": dense_acc - pruned_acc,
        "sparsity": pipe.sparsity(),
        "requested_sparsity": h.sparsity,
        "history": history,
        # what `prunekit export RUN_DIR` checks before it trusts them (torch.load checks no checksum)
        "files": {name: file_sha256(out / name) for name in ("pruned.pt", "state.pt")},
    }
    if d.active:
        report["processes"] = d.world_size
    mismatch = None
    if pipe.has_kernel:
        reference = shared_copy(model).eval()
        x = torch.randn(latency_batch, *bundle.input_shape)
        ref_out, captured = capture_io(reference, list(pipe.layers), x)
        _test_kill("compile")
        states = pipe.compile(example=x)
        _test_kill("compiled")
        model.eval()
        compiled_acc = evaluate(model, bundle.test)
        with torch.inference_mode():
            report["max_rel_err"] = max_rel_err(model(x), ref_out)
        errs = layer_errors(model, captured)
        report["tolerance"] = pipe.tolerance
        try:
            check_tolerance(f"prunekit run {pipe.name}", report["max_rel_err"], errs, pipe.kernels(), pipe.tolerance)
        except KernelMismatchError as exc:
            mismatch = exc
        t = interleaved_medians({"dense": lambda: reference(x), "sparse": lambda: model(x)}, warmup=5, repeats=50)
        report.update(
            compiled_accuracy=compiled_acc,
            latency_batch=latency_batch,
            dense_latency_ms=t["dense"]["median_ms"],
            sparse_latency_ms=t["sparse"]["median_ms"],
            speedup=t["dense"]["median_ms"] / t["sparse"]["median_ms"],
            dense_latency_iqr_ms=[t["dense"]["q1_ms"], t["dense"]["q3_ms"]],
            sparse_latency_iqr_ms=[t["sparse"]["q1_ms"], t["sparse"]["q3_ms"]],
            load_average=os.getloadavg()[0],
        )
    else:
        states = list(pipe.layers.values())
    report["layers"] = layer_rows(states, pipe.left_dense)
    if pipe.has_kernel:
        for row in report["layers"]:
            if row["name"] in errs:
                row["max_rel_err"] = errs[row["name"]]
    report["peak_rss_bytes"] = peak_rss_bytes()
    write_json_atomic(report, out / "report.json")
    write_plots(report, out, warn=log)
    if mismatch is not None:
        raise mismatch  # after the report is written: it records every layer's error
    return report
