"""TETRIS (reorder, then block-prune) vs plain block pruning on the digits data with "resnet-digits".

Same dense weights, same block size and sparsity, same fine-tuning budget; the only difference is the
reordering. Trains the dense model once (cached like `prunekit run`), then for blocks 8x8 and 16x16 (out x in
channels x all taps) and sparsity 0.75 / 0.9 prunes one-shot and fine-tunes with the mask fixed, and writes
benches/results/tetris_digits.md. Pipelines come from the registry sections [pipelines.blocks-32x32-triton]
and [pipelines.tetris-32x32-triton] with `block` overridden and layout/kernel dropped (masked dense: the
accuracy does not depend on the kernel).

    .venv/bin/python benches/digits_tetris.py                  # ~2-3 min on 2 cores once the dense model is cached
    .venv/bin/python benches/digits_tetris.py --seeds 0 1 2 --epochs 4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from prunekit.data import load_data
from prunekit.models import build_model
from prunekit.pipeline import Pipeline
from prunekit.registry import Registry, load_registry
from prunekit.runjob import dense_model
from prunekit.training import evaluate, make_optimizer, train_epoch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "resnet-digits"
INPUT = (1, 16, 16)
METHODS = {"blocks (no reorder)": "blocks-32x32-triton", "TETRIS greedy": "tetris-32x32-triton"}


def make_pipeline(reg: Registry, method: str, block: int, sparsity: float, seed: int, solver: str) -> Pipeline:
    section = METHODS[method]
    _, base = reg.pipeline(section)
    params = {k: v for k, v in base.params.items() if k not in ("precision",)}  # kernel-only keys go with the kernel
    params.update(block=[block, block], sparsity=sparsity, seed=seed)
    if "tetris" in section:
        params["solver"] = solver
    spec = attrs.evolve(base, params=params, layout=None, kernel=None)
    return Pipeline(f"{section}[{block}x{block}]", spec, reg)


def retained_l1(pipe: Pipeline) -> float:
    """Fraction of the pruned layers' |w| kept by the masks (before any fine-tuning)."""
    kept = total = 0.0
    for st in pipe.layers.values():
        w = st.module.parametrizations.weight.original.detach().abs().double()
        kept += float((w * st.selection.mask).sum())
        total += float(w.sum())
    return kept / total


def run(pipe: Pipeline, dense_state: dict, bundle: Any, epochs: int, lr: float, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    bundle.train.generator.manual_seed(1000 + seed)  # both methods see the same batches for a given seed
    model = build_model(MODEL, bundle.num_classes, bundle.input_shape)
    model.load_state_dict(dense_state)
    pipe.attach(model)
    t0 = time.perf_counter()
    pipe.prune(pipe.host.sparsity)
    select_s = time.perf_counter() - t0
    out = {"sparsity": pipe.sparsity(), "retained": retained_l1(pipe), "oneshot": evaluate(model, bundle.test), "select_s": select_s}
    opt = make_optimizer(model, "sgd", lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    for _ in range(epochs):
        train_epoch(model, bundle.train, opt, progress=False)
        sched.step()
    out["finetuned"] = evaluate(model, bundle.test)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.75, 0.9])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs after the one-shot prune")
    ap.add_argument("--check-epochs", type=int, default=8, help="second, longer budget (seed 0 only); 0 = skip")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--solver", default="greedy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "tetris_digits.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    reg = load_registry(ROOT / "registry.toml")
    bundle = load_data("digits", INPUT, 64, 0)
    dense, dense_acc, origin = dense_model(MODEL, bundle, None, 15, 0, progress=False)
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    print(f"dense {MODEL}: {dense_acc:.2f}% ({origin})", flush=True)

    rows = table(reg, dense_state, bundle, args, args.seeds, args.epochs)
    check = table(reg, dense_state, bundle, args, [0], args.check_epochs) if args.check_epochs else []
    minutes = (time.perf_counter() - t_start) / 60
    write(Path(args.out), rows, check, dense_acc, args, minutes)
    print(f"wrote {args.out} ({minutes:.1f} min)")


def table(reg: Registry, dense_state: dict, bundle: Any, args: argparse.Namespace, seeds: list[int], epochs: int) -> list[dict]:
    rows = []
    for block in args.blocks:
        for sparsity in args.sparsities:
            for method in METHODS:
                runs = []
                for seed in seeds:
                    pipe = make_pipeline(reg, method, block, sparsity, seed, args.solver)
                    runs.append(run(pipe, dense_state, bundle, epochs, args.lr, seed))
                row = {"block": block, "target": sparsity, "method": method, "n": len(runs)}
                for key in ("sparsity", "retained", "oneshot", "finetuned", "select_s"):
                    vals = [r[key] for r in runs]
                    row[key] = statistics.mean(vals)
                    row[key + "_min"], row[key + "_max"] = min(vals), max(vals)
                rows.append(row)
                print(
                    f"[{epochs} ep] {block}x{block} s={sparsity} {method:20s} sparsity {row['sparsity']:.3f} retained {row['retained']:.3f} "
                    f"one-shot {row['oneshot']:.2f}% fine-tuned {row['finetuned']:.2f}% "
                    f"[{row['finetuned_min']:.2f}, {row['finetuned_max']:.2f}] select {row['select_s']:.2f}s",
                    flush=True,
                )
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def gaps(rows: list[dict]) -> dict[tuple[int, float], float]:
    """Fine-tuned accuracy of TETRIS minus plain blocks, per (block, target)."""
    by = {(r["block"], r["target"], r["method"]): r["finetuned"] for r in rows}
    blocks, tetris = list(METHODS)
    return {(b, t): by[(b, t, tetris)] - by[(b, t, blocks)] for (b, t, m) in by if m == blocks}


def write(path: Path, rows: list[dict], check: list[dict], dense_acc: float, args: argparse.Namespace, minutes: float) -> None:
    lines = [
        "# TETRIS vs plain block pruning on digits (resnet-digits)",
        "",
        "Regenerate: `.venv/bin/python benches/digits_tetris.py"
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1] else "")
        + (f" --epochs {args.epochs}" if args.epochs != 3 else "")
        + "`",
        "",
        f"Machine: {cpu_name()} ({os.cpu_count()} cores), {args.threads} threads, torch {torch.__version__}; total {minutes:.1f} min. "
        f"Dense accuracy {dense_acc:.2f}% (15 epochs Adam, cached). Data: scikit-learn digits at 16x16, fixed 80/20 split "
        "(360 test images: one image = 0.28 points).",
        "",
        "Each row: prune the same dense weights one-shot (first conv and classifier dense, as the registry sections do), "
        f"then fine-tune {args.epochs} epochs (SGD momentum, cosine lr from {args.lr}, masks fixed). Blocks are b x b "
        "(output x input channels x all kh x kw taps). `retained` = fraction of the pruned layers' |w| the masks keep. "
        f"Mean over seeds {args.seeds} (fine-tuning order), [min, max] in brackets.",
        "",
        "| block | target | method | sparsity | retained \\|w\\| | one-shot acc % | fine-tuned acc % | select s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['block']}x{r['block']} | {r['target']:.2f} | {r['method']} | {r['sparsity']:.3f} | {r['retained']:.3f} | "
            f"{r['oneshot']:.2f} [{r['oneshot_min']:.2f}, {r['oneshot_max']:.2f}] | "
            f"{r['finetuned']:.2f} [{r['finetuned_min']:.2f}, {r['finetuned_max']:.2f}] | {r['select_s']:.2f} |"
        )
    g3, g8 = gaps(rows), gaps(check)
    lines += ["", f"TETRIS minus plain blocks, fine-tuned accuracy (points): after {args.epochs} epochs (mean of seeds)"
              + (f" / after {args.check_epochs} epochs (seed 0, same schedule stretched)" if check else "") + ":", ""]
    for key, gap in g3.items():
        extra = f" / {g8[key]:+.2f}" if key in g8 else ""
        lines.append(f"- {key[0]}x{key[0]} at {key[1]:.2f}: {gap:+.2f}{extra}")
    if check:
        lines += ["", f"Longer budget ({args.check_epochs} epochs, seed 0):", "",
                  "| block | target | method | fine-tuned acc % |", "|---|---|---|---|"]
        lines += [f"| {r['block']}x{r['block']} | {r['target']:.2f} | {r['method']} | {r['finetuned']:.2f} |" for r in check]
    lines += [
        "",
        "Reading (caveats that hold for any rerun): one dense model, a 360-image test set (0.28 points per image) and "
        "two fine-tuning orders, so gaps of 1-2 points are within noise. The one-shot column sits at chance for every "
        "variant: pruning 75-90% of a BatchNorm network's weights without recalibrating the running statistics "
        "breaks it until fine-tuning; it says nothing about the criteria. Reordering raises the kept |w| only "
        "modestly on these trained weights (their rows and columns differ little in scale); where the short "
        "budget shows a large gap, the longer budget tells whether it is recovery speed or final accuracy. "
        "The 16x16 targets of 0.9 give 0.875 (floor of blocks per layer).",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
