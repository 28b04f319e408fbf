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
from torch import nn

from prunekit.models import build_model, model_spec
from prunekit.pipeline import Pipeline, check_sparsity
from prunekit.timing import interleaved_medians


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: error relative to the output's scale."""
    scale = float(ref.abs().max())
    return float((out - ref).abs().max()) / (scale if scale > 0 else 1.0)


def _capture_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: got.__setitem__(n, a[0].detach().clone())))
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return got


def run_bench(
    pipeline: Pipeline,
    model_name: str,
    batch: int = 1,
    threads: int = 1,
    sparsity: float = 0.75,
    repeats: int = 20,
    warmup: int = 3,
    seed: int = 0,
    layers: bool = True,
) -> dict[str, Any]:
    check_sparsity(sparsity, "--sparsity")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    spec = model_spec(model_name)
    num_classes = 1000 if spec.input_shape[1] >= 224 else 10
    model = build_model(model_name, num_classes).eval()
    pipeline.host.sparsity = sparsity
    pipeline.attach(model)
    t0 = time.perf_counter()
    pipeline.prune(sparsity)
    select_s = time.perf_counter() - t0
    pipeline.finalize()
    reference = copy.deepcopy(model).eval()
    x = torch.randn(batch, *spec.input_shape)
    names = list(pipeline.layers)
    inputs = _capture_inputs(reference, names, x)
    t0 = time.perf_counter()
    states = pipeline.compile(example=x)
    compile_s = time.perf_counter() - t0
    model.eval()
    with torch.inference_mode():
        ref_out, out = reference(x), model(x)
    err = max_rel_err(out, ref_out)

    rows = []
    for st in states:
        compiled = model.get_submodule(st.info.name)
        dense = reference.get_submodule(st.info.name)
        inp = inputs[st.info.name]
        row: dict[str, Any] = {
            "name": st.info.name,
            "shape": list(st.info.weight_shape),
            "sparsity": round(st.selection.sparsity, 4) if st.selection is not None else 0.0,
            "kernel": st.compiled.kernel if st.compiled else "masked-dense",
            "reason": st.compiled.reason if st.compiled else "",
        }
        with torch.inference_mode():
            row["max_rel_err"] = max_rel_err(compiled(inp), dense(inp))
        if layers and st.compiled is not None:
            t = interleaved_medians({"dense": lambda d=dense, i=inp: d(i), "sparse": lambda c=compiled, i=inp: c(i)}, warmup, repeats)
            row["dense_ms"] = t["dense"]["median_ms"]
            row["sparse_ms"] = t["sparse"]["median_ms"]
            row["speedup"] = row["dense_ms"] / row["sparse_ms"]
        rows.append(row)
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
        "model_dense_ms": t["dense"]["median_ms"],
        "model_sparse_ms": t["sparse"]["median_ms"],
        "model_dense_q": [t["dense"]["q1_ms"], t["dense"]["q3_ms"]],
        "model_sparse_q": [t["sparse"]["q1_ms"], t["sparse"]["q3_ms"]],
        "speedup": t["dense"]["median_ms"] / t["sparse"]["median_ms"],
        "repeats": repeats,
        "layers": rows,
    }
