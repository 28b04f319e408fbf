"""Data-aware scores (Wanda, first-order Taylor) vs plain magnitude on the digits data with LeNet.

Same dense weights per seed, same select (layer-wise threshold), same sparsity; the only difference is the
score. Each run prunes one-shot (the host computes the calibration statistics from `calibration_batches`
seeded training batches), evaluates without fine-tuning, fine-tunes 2 epochs with the mask fixed and
evaluates again. Pipelines are the registry's wanda-lenet / taylor-lenet / magnitude-lenet with the sparsity
overridden. Writes benches/results/datascores_digits.md (and .json beside it).

    .venv/bin/python benches/digits_datascores.py                     # ~5 min on 2 cores (dense models cached)
    .venv/bin/python benches/digits_datascores.py --seeds 0 1 2 --sparsities 0.5 0.7 0.9 0.95
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from prunekit.atomic import write_text_atomic
from prunekit.calibration import draw_batches
from prunekit.data import load_data
from prunekit.models import build_model
from prunekit.pipeline import Pipeline
from prunekit.registry import Registry, load_registry
from prunekit.runjob import dense_model
from prunekit.timing import cpu_model
from prunekit.training import cosine_lr, evaluate, make_optimizer, train_epoch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "lenet"
INPUT = (1, 28, 28)
METHODS = {"magnitude |W|": "magnitude-lenet", "wanda |W|·‖X‖": "wanda-lenet", "taylor |W·∂L/∂W|": "taylor-lenet"}


def make_pipeline(reg: Registry, section: str, sparsity: float, seed: int) -> Pipeline:
    _, base = reg.pipeline(section)
    spec = attrs.evolve(base, params={**base.params, "sparsity": sparsity, "seed": seed})
    return Pipeline(section, spec, reg)


def run(pipe: Pipeline, dense_state: dict, bundle: Any, epochs: int, lr: float, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    bundle.train.generator.manual_seed(1000 + seed)  # every criterion sees the same batches for a given seed
    model = build_model(MODEL, bundle.num_classes, bundle.input_shape)
    model.load_state_dict(dense_state)
    pipe.attach(model)
    if pipe.needs:
        pipe.set_calibration(draw_batches(bundle.train.dataset, pipe.host.calibration_batches, pipe.host.batch_size, seed))
    t0 = time.perf_counter()
    pipe.step(0, total_steps=epochs)
    out = {"achieved": pipe.sparsity(), "select_s": time.perf_counter() - t0, "oneshot": evaluate(model, bundle.test)}
    opt = make_optimizer(model, "sgd", lr)
    for e in range(epochs):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, e, (0, epochs))
        train_epoch(model, bundle.train, opt, progress=False)
    out["finetuned"] = evaluate(model, bundle.test)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "datascores_digits.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reg = load_registry(ROOT / "registry.toml")
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    dense_acc: dict[int, float] = {}
    for seed in args.seeds:
        bundle = load_data("digits", INPUT, 64, seed)
        model, acc, origin = dense_model(MODEL, bundle, None, 15, seed, progress=False)
        dense_acc[seed] = acc
        print(f"seed {seed}: dense {acc:.2f}% ({origin})", flush=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for sparsity in args.sparsities:
            for method, section in METHODS.items():
                pipe = make_pipeline(reg, section, sparsity, seed)
                r = run(pipe, state, bundle, args.epochs, pipe.host.lr, seed)
                results.append({"seed": seed, "sparsity": sparsity, "method": method, **r})
                print(f"  s={sparsity} {method:20s} one-shot {r['oneshot']:6.2f}  +{args.epochs} ep {r['finetuned']:6.2f}", flush=True)
    wall = time.perf_counter() - t_start
    write(Path(args.out), results, dense_acc, args, wall)


def write(path: Path, results: list[dict[str, Any]], dense_acc: dict[int, float], args: argparse.Namespace, wall: float) -> None:
    def cell(values: list[float]) -> str:
        m = statistics.mean(values)
        return f"{m:.2f} ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else f"{m:.2f}"

    lines = [
        "# Data-aware scores vs magnitude on digits (LeNet, one-shot, layer-wise threshold)",
        "",
        f"Command: `.venv/bin/python benches/digits_datascores.py --seeds {' '.join(map(str, args.seeds))} "
        f"--sparsities {' '.join(map(str, args.sparsities))} --epochs {args.epochs}` ({wall / 60:.1f} min wall).",
        f"Machine: {cpu_model()}, {args.threads} threads, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "Every cell is the test accuracy in % (355 test images: one image = 0.28 points), mean over seeds with the "
        "range in brackets. Same dense weights per seed for every criterion; the calibration statistics come from "
        "4 seeded training batches of 64 (the `calibration_batches` default); `+N ep` = after N fine-tuning "
        "epochs with the mask fixed (SGD, cosine learning rate from the pipeline's `lr`).",
        "",
        f"Dense accuracy: {cell(list(dense_acc.values()))}.",
        "",
        f"| sparsity | criterion | one-shot, no fine-tuning | +{args.epochs} ep | achieved sparsity |",
        "|---|---|---|---|---|",
    ]
    for s in args.sparsities:
        for method in METHODS:
            rows = [r for r in results if r["sparsity"] == s and r["method"] == method]
            lines.append(
                f"| {s} | {method} | {cell([r['oneshot'] for r in rows])} | {cell([r['finetuned'] for r in rows])} "
                f"| {statistics.mean(r['achieved'] for r in rows):.4f} |"
            )
    lines += ["", "Raw results: the .json file beside this one.", ""]
    write_text_atomic("\n".join(lines), path)
    write_text_atomic(json.dumps({"dense": dense_acc, "results": results}, indent=2) + "\n", path.with_suffix(".json"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
