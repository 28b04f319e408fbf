"""`prunekit run`: train (or load) the dense model, prune and fine-tune, evaluate, compile, report."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

import attrs
import torch

from prunekit.atomic import atomic_torch_save, write_text_atomic
from prunekit.calibration import draw_batches
from prunekit.data import load_data
from prunekit.errors import CheckpointError, KernelMismatchError
from prunekit.models import build_model, model_spec
from prunekit.pipeline import Pipeline
from prunekit.report import history_svg, layer_rows, write_json_atomic
from prunekit.timing import interleaved_medians
from prunekit.training import evaluate, fit, prune_and_finetune
from prunekit.verify import capture_io, check_tolerance, layer_errors, max_rel_err


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
    shape = model_spec(model_name).input_shape
    if data == "digits" and shape[1] >= 224:
        return (shape[0], 32, 32)  # torchvision nets on 8x8 digits: 32x32 is plenty and fast
    return shape


def dense_model(model_name: str, data: Any, dense_path: str | None, epochs: int, seed: int, progress: bool) -> tuple[torch.nn.Module, float, str]:
    """The trained dense model: from --dense, from the cache, or trained now (and cached)."""
    torch.manual_seed(seed)
    model = build_model(model_name, data.num_classes, data.input_shape)
    if dense_path:
        load_weights(model, Path(dense_path))
        return model, evaluate(model, data.test), str(dense_path)
    key = hashlib.sha256(f"{model_name}:{data.name}:{data.input_shape}:{epochs}:{seed}:v1".encode()).hexdigest()[:12]
    cached = cache_dir() / "dense" / f"{model_name}-{data.name}-{key}.pt"
    if cached.is_file():
        try:
            load_weights(model, cached)
            return model, evaluate(model, data.test), f"cache {cached}"
        except CheckpointError:
            cached.unlink(missing_ok=True)  # a corrupt cache entry is retrained, not trusted
            torch.manual_seed(seed)
            model = build_model(model_name, data.num_classes, data.input_shape)
    acc = fit(model, data.train, data.test, epochs, lr=1e-3, optimizer="adam", progress=progress)
    atomic_torch_save(model.state_dict(), cached)
    return model, acc, f"trained {epochs} epochs"


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
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    h = pipe.host
    model_name = model_name or h.model
    epochs = epochs or h.epochs
    bundle = load_data(data, input_shape_for(model_name, data), h.batch_size, h.seed)
    model, dense_acc, origin = dense_model(model_name, bundle, dense_path, h.dense_epochs, h.seed, progress)
    log(f"dense {model_name} on {bundle.name}: {dense_acc:.2f}% ({origin})")

    pipe.attach(model)
    if pipe.needs:
        pipe.set_calibration(draw_batches(bundle.train.dataset, h.calibration_batches, h.batch_size, h.seed))
        log(f"calibration for {', '.join(sorted(pipe.needs))}: {pipe.calibration.source}")
    probe = pipe.check(example=torch.randn(2, *bundle.input_shape))
    err = "" if probe.max_rel_err is None else f", compiled max rel err {probe.max_rel_err:.1e}"
    log(f"check: every stage ran on {probe.layers} layers of a copy in {probe.seconds:.1f} s{err}")
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.is_file():
        pipe.load_state(out / "state.pt")
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        log(f"resumed at epoch {pipe.position} from {out}")

    def save_progress(_rec: Any) -> None:
        atomic_torch_save(model.state_dict(), ckpt)
        pipe.save(out / "state.pt")

    records = prune_and_finetune(pipe, model, bundle.train, bundle.test, epochs, h.lr, h.optimizer, progress, save_progress)
    pruned_acc = evaluate(model, bundle.test)
    pipe.finalize()
    atomic_torch_save(model.state_dict(), out / "pruned.pt")
    report: dict[str, Any] = {
        "pipeline": pipe.name,
        "components": pipe.describe()["components"],
        "model": model_name,
        "data": bundle.name,
        "epochs": epochs,
        "threads": torch.get_num_threads(),
        "dense_accuracy": dense_acc,
        "pruned_accuracy": pruned_acc,
        "accuracy_drop": dense_acc - pruned_acc,
        "sparsity": pipe.sparsity(),
        "history": [attrs.asdict(r) for r in records],
    }
    mismatch = None
    if pipe.has_kernel:
        reference = copy.deepcopy(model).eval()
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
    svg = history_svg(report["history"], dense_acc, f"{pipe.name} on {model_name}/{bundle.name}")
    write_text_atomic(svg, out / "history.svg")
    if mismatch is not None:
        raise mismatch  # after the report is written: it records every layer's error
    return report
