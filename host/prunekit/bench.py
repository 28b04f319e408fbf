"""`prunekit bench`: what a pipeline's kernels buy on this machine, layer by layer and end to end.

Random weights, eval mode, the pipeline's selection at the given sparsity without training; the compiled
model is checked against the masked dense model before anything is timed; dense and compiled run
interleaved in one process with the same thread count (warm-up, median).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from prunekit.calibration import synthetic
from prunekit.errors import PrunekitError
from prunekit.models import build_model, model_spec
from prunekit.pipeline import Pipeline, check_sparsity
from prunekit.timing import interleaved_medians
from prunekit.verify import capture_io, check_tolerance, layer_errors, max_rel_err

__all__ = ["max_rel_err", "run_bench"]


def run_bench(
    pipeline: Pipeline,
    model_name: str,
    batch: int = 1,
    threads: int = 1,
    sparsity: float | None = None,
    repeats: int = 20,
    warmup: int = 3,
    seed: int = 0,
    layers: bool = True,
) -> dict[str, Any]:
    """``sparsity`` defaults to the pipeline's own. Raises KernelMismatchError (after measuring nothing)
    when the compiled model is off by more than the pipeline's tolerance."""
    if sparsity is None:
        sparsity = pipeline.host.sparsity
    check_sparsity(sparsity, "--sparsity")
    if "grads" in pipeline.needs:
        raise PrunekitError(
            f"pipeline {pipeline.name}: {', '.join(pipeline.needers('grads'))} needs loss gradients, which need labels; "
            "prunekit bench uses synthetic inputs without labels: measure it with prunekit run (real data), "
            "or bench a pipeline whose criterion needs at most activations"
        )
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    spec = model_spec(model_name)
    num_classes = 1000 if spec.input_shape[1] >= 224 else 10
    model = build_model(model_name, num_classes).eval()
    pipeline.host.sparsity = sparsity
    pipeline.attach(model)
    if pipeline.needs:
        pipeline.set_calibration(synthetic(spec.input_shape, 2, max(batch, 4), seed))
    t0 = time.perf_counter()
    pipeline.prune(sparsity)
    select_s = time.perf_counter() - t0
    pipeline.finalize()
    reference = copy.deepcopy(model).eval()
    x = torch.randn(batch, *spec.input_shape)
    names = list(pipeline.layers)
    ref_out, captured = capture_io(reference, names, x)
    t0 = time.perf_counter()
    states = pipeline.compile(example=x)
    compile_s = time.perf_counter() - t0
    model.eval()
    with torch.inference_mode():
        out = model(x)
    err = max_rel_err(out, ref_out)
    errs = layer_errors(model, captured)
    check_tolerance(f"prunekit bench {pipeline.name} on {model_name}", err, errs, pipeline.kernels(), pipeline.tolerance)

    rows = []
    for st in states:
        compiled = model.get_submodule(st.info.name)
        dense = reference.get_submodule(st.info.name)
        inp = captured[st.info.name].inp
        sel = st.selection
        row: dict[str, Any] = {
            "name": st.info.name,
            "shape": list(st.info.weight_shape),
            "sparsity": round(sel.sparsity, 4) if sel is not None else 0.0,
            "kernel": st.compiled.kernel if st.compiled else ("dense" if sel is not None and sel.dense_reason else "masked-dense"),
            "reason": st.compiled.reason if st.compiled else (sel.dense_reason if sel is not None else ""),
            "max_rel_err": errs[st.info.name],
        }
        if layers and st.compiled is not None:
            t = interleaved_medians({"dense": lambda d=dense, i=inp: d(i), "sparse": lambda c=compiled, i=inp: c(i)}, warmup, repeats)
            row["dense_ms"] = t["dense"]["median_ms"]
            row["sparse_ms"] = t["sparse"]["median_ms"]
            row["speedup"] = row["dense_ms"] / row["sparse_ms"]
        rows.append(row)
    rows += [{"name": n, "shape": list(ld.shape), "kernel": "dense", "reason": ld.reason, "sparsity": 0.0}
             for n, ld in pipeline.left_dense.items()]  # fmt: skip
    t = interleaved_medians({"dense": lambda: reference(x), "sparse": lambda: model(x)}, warmup, repeats)
    return {
        "pipeline": pipeline.name,
        "model": model_name,
        "batch": batch,
        "threads": threads,
        "sparsity": sparsity,
        "achieved_sparsity": round(pipeline.sparsity(), 4),
        "select_s": select_s,
        "compile_s": compile_s,
        "max_rel_err": err,
        "tolerance": pipeline.tolerance,
        "model_dense_ms": t["dense"]["median_ms"],
        "model_sparse_ms": t["sparse"]["median_ms"],
        "model_dense_q": [t["dense"]["q1_ms"], t["dense"]["q3_ms"]],
        "model_sparse_q": [t["sparse"]["q1_ms"], t["sparse"]["q3_ms"]],
        "speedup": t["dense"]["median_ms"] / t["sparse"]["median_ms"],
        "repeats": repeats,
        "layers": rows,
    }
