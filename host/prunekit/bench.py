"""`prunekit bench`: what a pipeline's kernels buy on this machine, layer by layer and end to end.

Random weights, eval mode, the pipeline's selection at the given sparsity without training; the compiled
model is checked against the masked dense model before anything is timed; the compiled model and every
dense baseline (eager, ONNX Runtime when installed, torch.compile when asked: prunekit.baselines) run
interleaved in one process with the same thread count (warm-up, median). The dense reference shares its
weight tensors with the model (no second copy), the allocator's free memory is handed back between stages
(prunekit.memory) and ONNX Runtime gets the weights from one external file, so the peak stays near the
weights, their masks and the packed layers, plus ONNX Runtime's own copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from prunekit import baselines
from prunekit.calibration import synthetic
from prunekit.errors import PrunekitError
from prunekit.memory import peak_rss_bytes, release
from prunekit.models import build_model, model_spec
from prunekit.pipeline import Pipeline, check_sparsity
from prunekit.timing import cpu_isa, cpu_model, interleaved_medians
from prunekit.verify import capture_io, check_tolerance, layer_errors, max_rel_err, shared_copy

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
    dense_runtimes: str | tuple[str, ...] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``sparsity`` defaults to the pipeline's own. Raises KernelMismatchError (after measuring nothing)
    when the compiled model is off by more than the pipeline's tolerance. ``dense_runtimes``: the dense
    baselines timed beside eager in the same interleaved run (default: ONNX Runtime when installed; see
    prunekit.baselines); ``speedup_vs_best_dense`` is against the fastest of them."""
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
    release()  # the baked float masks and the scores: give them back before compiling lands on top of them
    reference = shared_copy(model).eval()
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
    del out, ref_out
    if not layers:  # the per-layer inputs are only for timing layers
        captured.clear()
    release()  # the packing's scratch, before onnxruntime loads its own copy of the weights
    runtimes = baselines.build(baselines.parse(dense_runtimes), reference, x, threads, log)
    release()
    rows = []
    bar = tqdm(states, desc=f"bench {model_name}", unit="layer", leave=False, disable=not progress)
    for st in bar:
        bar.set_postfix(layer=st.info.name)
        compiled = model.get_submodule(st.info.name)
        dense = reference.get_submodule(st.info.name)
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
            inp = captured[st.info.name].inp
            t = interleaved_medians({"dense": lambda d=dense, i=inp: d(i), "sparse": lambda c=compiled, i=inp: c(i)}, warmup, repeats)
            row["dense_ms"] = t["dense"]["median_ms"]
            row["sparse_ms"] = t["sparse"]["median_ms"]
            row["speedup"] = row["dense_ms"] / row["sparse_ms"]
        rows.append(row)
    rows += [{"name": n, "shape": list(ld.shape), "kernel": "dense", "reason": ld.reason, "sparsity": 0.0}
             for n, ld in pipeline.left_dense.items()]  # fmt: skip
    fns = {"sparse": lambda: model(x), **{name: b.run for name, b in runtimes.items()}}
    t = interleaved_medians(fns, warmup, repeats)
    dense_ms = {name: t[name]["median_ms"] for name in runtimes}
    best = min(dense_ms, key=dense_ms.get)
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
        "model_dense_ms": t["eager"]["median_ms"],
        "model_sparse_ms": t["sparse"]["median_ms"],
        "model_dense_q": [t["eager"]["q1_ms"], t["eager"]["q3_ms"]],
        "model_sparse_q": [t["sparse"]["q1_ms"], t["sparse"]["q3_ms"]],
        "speedup": t["eager"]["median_ms"] / t["sparse"]["median_ms"],
        "baselines": dense_ms,
        "baselines_max_rel_err": {name: b.max_rel_err for name, b in runtimes.items()},
        "best_dense": best,
        "speedup_vs_best_dense": dense_ms[best] / t["sparse"]["median_ms"],
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "peak_rss_bytes": peak_rss_bytes(),
        "weight_bytes": sum(p.numel() * p.element_size() for p in reference.parameters()),
        "layers": rows,
    }
