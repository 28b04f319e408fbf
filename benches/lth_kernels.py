"""`prunekit bench` rows for the Structural-LTH pipelines on torchvision models (random weights, one-shot:
IMP at the given sparsity, then Refill / Regroup), with per-layer speed against dense and the compiled
model's max relative error; writes benches/results/lth_kernels.md (+ .json).

    .venv/bin/python benches/lth_kernels.py                                   # resnet18, 2 threads, ~5 min
    .venv/bin/python benches/lth_kernels.py --models resnet18 resnet50 vgg16 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from prunekit.atomic import write_text_atomic
from prunekit.bench import run_bench
from prunekit.pipeline import Pipeline
from prunekit.registry import load_registry
from prunekit.timing import cpu_isa, cpu_model

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("lth-refill-cpu", "lth-regroup-cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18"])
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES))
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "lth_kernels.md"))
    args = ap.parse_args()
    reg = load_registry(ROOT / "registry.toml")
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    for model in args.models:
        for threads in args.threads:
            for name in args.pipelines:
                pipe = Pipeline.load(name, reg)
                res = run_bench(pipe, model, args.batch, threads, args.sparsity, args.repeats, log=print)
                results.append(res)
                print(f"{name} {model} t{threads}: {res['speedup']:.2f}x vs eager, {res['speedup_vs_best_dense']:.2f}x vs "
                      f"{res['best_dense']}, max rel err {res['max_rel_err']:.1e}", flush=True)  # fmt: skip
    write(Path(args.out), results, args, time.perf_counter() - t0, load_before)


def write(path: Path, results: list[dict[str, Any]], args: argparse.Namespace, wall: float, load_before: tuple) -> None:
    cmd = (f"`.venv/bin/python benches/lth_kernels.py --models {' '.join(args.models)} --pipelines {' '.join(args.pipelines)} "
           f"--sparsity {args.sparsity} --threads {' '.join(map(str, args.threads))} --batch {args.batch}`")  # fmt: skip
    lines = [
        "# Structural-LTH kernels on torchvision models (prunekit bench, one-shot, random weights)",
        "",
        f"Command: {cmd} ({wall / 60:.1f} min wall).",
        f"Machine: {cpu_model()} ({cpu_isa()}); load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        "Each row: IMP one-shot at the sparsity (global L1 over the prunable convs), then the pipeline's transform, "
        "compiled; the compiled model was checked against the masked dense model before timing (max rel err); "
        "times are medians of interleaved runs with the same thread count; `vs best dense` is against the fastest "
        "of PyTorch eager and ONNX Runtime on the same masked dense model.",
        "",
        "| pipeline | model | threads | sparsity after transform | sparse ms | eager ms | best dense | vs best dense | vs eager | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        best = r["baselines"][r["best_dense"]]
        lines.append(
            f"| {r['pipeline']} | {r['model']} | {r['threads']} | {r['achieved_sparsity']:.3f} | {r['model_sparse_ms']:.2f} | "
            f"{r['model_dense_ms']:.2f} | {r['best_dense']} {best:.2f} ms | {r['speedup_vs_best_dense']:.2f}x | "
            f"{r['speedup']:.2f}x | {r['max_rel_err']:.1e} |"
        )
    for r in results:
        lines += ["", f"## {r['pipeline']}, {r['model']}, {r['threads']} threads, batch {r['batch']}: per layer", "",
                  "| layer | shape | sparsity | kernel | dense ms | sparse ms | speed-up | max rel err | why dense |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in r["layers"]:
            def f(key: str, fmt: str = "{:.3f}", row: dict[str, Any] = row) -> str:
                v = row.get(key)
                return fmt.format(v) if isinstance(v, float) else ("-" if v is None else str(v))

            shape = "x".join(map(str, row.get("shape") or []))
            lines.append(f"| {row['name']} | {shape} | {f('sparsity')} | {row.get('kernel', '')} | {f('dense_ms')} | "
                         f"{f('sparse_ms')} | {f('speedup', '{:.2f}x')} | {f('max_rel_err', '{:.1e}')} | {row.get('reason', '')} |")  # fmt: skip
    lines.append("")
    write_text_atomic("\n".join(lines), path)
    write_text_atomic(json.dumps(results, indent=2, default=str) + "\n", path.with_suffix(".json"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
