"""`prunekit run`: train (or load) the dense model, prune and fine-tune, evaluate, compile, report."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import attrs
import torch

from prunekit import checkpoint, distributed
from prunekit.atomic import atomic_torch_save
from prunekit.calibration import draw_batches
from prunekit.checkpoint import Checkpoint
from prunekit.data import is_cifar10, load_data
from prunekit.distributed import Dist
from prunekit.errors import CheckpointError, KernelMismatchError
from prunekit.models import build_model, model_spec
from prunekit.pipeline import Pipeline
from prunekit.report import layer_rows, write_json_atomic, write_plots
from prunekit.timing import interleaved_medians
from prunekit.training import EpochRecord, evaluate, fit, lr_segments, make_optimizer, prune_and_finetune
from prunekit.verify import capture_io, check_tolerance, layer_errors, max_rel_err, shared_copy


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


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
        atomic_torch_save(model.state_dict(), cached)
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
    pipe.load_state_dict(state, source=f"{source} (pipeline state)")


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
    try:  # the fine-tuning loop loads it into its optimizer: fail here, naming the file, if it cannot
        make_optimizer(model, pipe.host.optimizer, pipe.host.lr).load_state_dict(saved.optimizer)
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
        dense_acc, origin = float(saved.dense["accuracy"]), f"{saved.dense['origin']}, via {ckpt}"
        pipe.attach(model)
    say(f"dense {model_name} on {bundle.name}: {dense_acc:.2f}% ({origin})")
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
    if d.active:
        say(f"{d.world_size} processes ({d.backend}), {h.batch_size // d.world_size} samples of each batch of {h.batch_size} per process")

    # the loader's generator: CIFAR-10 augmentation draws from it (the order comes from GlobalBatchSampler)
    generators = {"data": bundle.train.generator} if bundle.train.generator is not None else {}
    if saved is not None and saved.run.get("world_size") == d.world_size:
        checkpoint.set_rng_state(saved.rng[d.rank], generators)
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
    pipe.save(out / "state.pt")  # the final pruning state, for Pipeline.load_state (resuming reads checkpoint.pt)
    pipe.finalize()
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
        "history": history,
    }
    if d.active:
        report["processes"] = d.world_size
    mismatch = None
    if pipe.has_kernel:
        reference = shared_copy(model).eval()
        x = torch.randn(latency_batch, *bundle.input_shape)
        ref_out, captured = capture_io(reference, list(pipe.layers), x)
        states = pipe.compile(example=x)
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
    write_json_atomic(report, out / "report.json")
    write_plots(report, out, warn=log)
    if mismatch is not None:
        raise mismatch  # after the report is written: it records every layer's error
    return report
