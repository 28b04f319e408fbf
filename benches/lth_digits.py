"""Structural lottery tickets on the digits data (resnet-digits): IMP ticket vs random re-init vs Refill,
Refill+ and Regroup, each after the same retraining budget, for every IMP round and several seeds.

Per seed: one IMP run with rewinding (registry pipeline `lth-imp`: round 0 trains from the initialisation,
snapshot at `rewind_step`, each round prunes ~20 % of the remaining conv weights globally, rewinds and
retrains `round_length` epochs) is checkpointed before every round's prune. For the ticket of round k each
variant then continues from that checkpoint through the same final round -- prune (and transform), rewind,
retrain `round_length` epochs -- so all five share the IMP history and the budget:

  (a) IMP ticket: unstructured IMP mask, rewound weights        (select lth-imp)
  (b) random re-init: the same mask, a fresh random initialisation instead of the rewound weights
  (c) Refill: whole output channels within each layer's budget   (select lth-refill, rho = 0)
  (d) Refill+: plus rho = 0.1 of the dropped channels            (select lth-refill, rho = 0.1)
  (e) Regroup: dense row-group x column-set blocks                (select lth-regroup)

Writes benches/results/lth_digits.md (+ .json) with the IMP density and the post-transform density side by
side (method doc I.17: remaining weights over the prunable convs; stem and head excluded).

    .venv/bin/python benches/lth_digits.py                  # 3 rounds x 2 seeds, ~10 min on 2 cores
    .venv/bin/python benches/lth_digits.py --rounds 4 --seeds 0 1 2 --round-length 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from prunekit.atomic import write_text_atomic
from prunekit.data import load_data
from prunekit.models import build_model
from prunekit.pipeline import Pipeline
from prunekit.registry import Registry, load_registry
from prunekit.timing import cpu_model
from prunekit.training import cosine_lr, evaluate, lr_segments, make_optimizer, train_epoch

ROOT = Path(__file__).resolve().parents[1]
MODEL, INPUT = "resnet-digits", (1, 16, 16)
NAME = "lth-digits"  # one pipeline name for every variant, so each can load the shared IMP checkpoint
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "(a) IMP ticket (rewind)": ("lth-imp", {}),
    "(b) same mask, random re-init": ("lth-imp", {}),
    "(c) Refill": ("lth-refill", {"rho": 0.0}),
    "(d) Refill+ rho=0.1": ("lth-refill", {"rho": 0.1}),
    "(e) Regroup": ("lth-regroup", {}),
}


def imp_sparsity(k: int, rate: float = 0.2) -> float:
    return 1.0 - (1.0 - rate) ** k


def pipeline(reg: Registry, select: str, rounds: int, length: int, rewind: int, extra: dict[str, Any], seed: int) -> Pipeline:
    section = {"lth-imp": "lth-imp", "lth-refill": "lth-refill-cpu", "lth-regroup": "lth-regroup-cpu"}[select]
    _, base = reg.pipeline(section)
    params = {k: v for k, v in base.params.items() if k not in ("n", "group_rows", "bm", "precision", "fallback", "threshold")}
    params.update(extra, sparsity=imp_sparsity(rounds), rounds=rounds, round_length=length, rewind_step=rewind,
                  epochs=(rounds + 1) * length, seed=seed)  # fmt: skip
    spec = attrs.evolve(base, params=params, layout=None, kernel=None)  # masked dense: accuracy only
    return Pipeline(NAME, spec, reg)


def train(pipe: Pipeline, model: torch.nn.Module, bundle: Any, start: int, stop: int, lr: float) -> None:
    """Steps start..stop-1 of the pipeline's run, as prunekit run trains them (fresh optimizer at rewinds)."""
    total = pipe.host.epochs
    segments = lr_segments(pipe.plan(total), total)
    opt = None
    for e in range(start, stop):
        d = pipe.step(e, total_steps=total)
        if opt is None or d.rewind:
            opt = make_optimizer(model, "sgd", lr)
        span = next(s for s in segments if s[0] <= e < s[1])
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, e, span)
        train_epoch(model, bundle.train, opt, progress=False)


def densities(pipe: Pipeline) -> tuple[float, float]:
    """(IMP density, post-transform density) over the prunable layers, weighted by layer size."""
    total = imp = post = 0.0
    for st in pipe.layers.values():
        n = st.selection.mask.numel()
        total += n
        imp += st.selection.meta.get("imp_density", st.selection.meta.get("density", 1.0)) * n
        post += float(st.selection.mask.sum())
    return imp / total, post / total


def run_seed(reg: Registry, seed: int, rounds: int, length: int, rewind: int, lr: float) -> list[dict[str, Any]]:
    bundle = load_data("digits", INPUT, 64, seed)
    torch.manual_seed(seed)
    model = build_model(MODEL, bundle.num_classes, INPUT)
    base = pipeline(reg, "lth-imp", rounds, length, rewind, {}, seed)
    base.attach(model)
    bundle.train.generator.manual_seed(seed)
    checkpoints: dict[int, tuple[dict, dict]] = {}
    out: list[dict[str, Any]] = []
    for k in range(rounds):
        train(base, model, bundle, k * length, (k + 1) * length, lr)
        if k == 0:
            out.append({"seed": seed, "round": 0, "variant": "dense (round 0)", "accuracy": evaluate(model, bundle.test),
                        "imp_density": 1.0, "density": 1.0})  # fmt: skip
        checkpoints[k + 1] = (copy.deepcopy(model.state_dict()), copy.deepcopy(base.state_dict()))  # before round k+1's prune
    for k in range(1, rounds + 1):
        model_state, pipe_state = checkpoints[k]
        for variant, (select, extra) in VARIANTS.items():
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            m = build_model(MODEL, bundle.num_classes, INPUT)
            pipe = pipeline(reg, select, k, length, rewind, extra, seed)
            pipe.attach(m)
            m.load_state_dict(model_state)
            pipe.load_state_dict(pipe_state, source=f"IMP checkpoint before round {k}")
            if variant.startswith("(b)"):  # rewind to a fresh random initialisation instead of the snapshot
                torch.manual_seed(10_000 + seed)
                fresh = build_model(MODEL, bundle.num_classes, INPUT)
                fresh_state = fresh.state_dict()
                for step, snap in pipe.snapshots.items():
                    pipe.snapshots[step] = {key: fresh_state[key.replace(".parametrizations.weight.original", ".weight")].clone()
                                            for key in snap}  # fmt: skip
            bundle.train.generator.manual_seed(1000 + 10 * seed + k)  # every variant sees the same batches
            train(pipe, m, bundle, k * length, (k + 1) * length, lr)
            imp_d, post_d = densities(pipe)
            out.append({"seed": seed, "round": k, "variant": variant, "accuracy": evaluate(m, bundle.test),
                        "imp_density": imp_d, "density": post_d, "seconds": time.perf_counter() - t0})  # fmt: skip
            print(f"seed {seed} round {k} {variant:32s} IMP {imp_d:.4f} post {post_d:.4f} acc {out[-1]['accuracy']:.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-length", type=int, default=2)
    ap.add_argument("--rewind-step", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "lth_digits.md"))
    ap.add_argument("--from-json", default=None, help="rewrite the table from a previous run's .json (no training)")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        write(Path(args.out), saved["rows"], argparse.Namespace(**saved["args"]), saved["wall"])
        return
    torch.set_num_threads(args.threads)
    reg = load_registry(ROOT / "registry.toml")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        rows += run_seed(reg, seed, args.rounds, args.round_length, args.rewind_step, args.lr)
    write(Path(args.out), rows, args, time.perf_counter() - t0)


def write(path: Path, rows: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> None:
    def cell(vals: list[float], fmt: str = "{:.2f}") -> str:
        m = statistics.mean(vals)
        return (fmt.format(m) + f" ({fmt.format(min(vals))}–{fmt.format(max(vals))})") if len(vals) > 1 else fmt.format(m)

    lines = [
        "# Structural lottery tickets on digits (resnet-digits)",
        "",
        f"Command: `.venv/bin/python benches/lth_digits.py --seeds {' '.join(map(str, args.seeds))} --rounds {args.rounds} "
        f"--round-length {args.round_length} --rewind-step {args.rewind_step} --lr {args.lr}` ({wall / 60:.1f} min wall).",
        f"Machine: {cpu_model()}, {args.threads} threads, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"IMP with rewinding: round 0 trains {args.round_length} epochs from the initialisation (SGD, cosine lr from "
        f"{args.lr}), snapshot before epoch {args.rewind_step}; each round prunes ~20 % of the remaining conv weights "
        "globally, rewinds all parameters and buffers, retrains the full round. The ticket of round k: every variant "
        "continues from the same checkpoint before round k's prune and gets the same budget (prune/transform, rewind, "
        f"{args.round_length} epochs). Densities are remaining weights over the prunable convs (stem and fc excluded); "
        "accuracy is on the 355 held-out digits (one image = 0.28 points), mean over seeds (range).",
        "",
        "| round | variant | IMP density | post-transform density | accuracy % |",
        "|---|---|---|---|---|",
    ]
    for r in sorted({row["round"] for row in rows}):
        for v in dict.fromkeys(row["variant"] for row in rows if row["round"] == r):
            sel = [row for row in rows if row["round"] == r and row["variant"] == v]
            lines.append(f"| {r} | {v} | {cell([s['imp_density'] for s in sel], '{:.4f}')} | "
                         f"{cell([s['density'] for s in sel], '{:.4f}')} | {cell([s['accuracy'] for s in sel])} |")  # fmt: skip
    lines += ["", "## Paper claims at this scale (computed from the rows above)", ""]
    lines += claims(rows)
    lines += ["", "Raw rows: the .json file beside this one (`--from-json` rewrites this file from it).", ""]
    write_text_atomic("\n".join(lines), path)
    saved = {"args": {k: v for k, v in vars(args).items() if k != "from_json"}, "wall": wall, "rows": rows}
    write_text_atomic(json.dumps(saved, indent=2) + "\n", path.with_suffix(".json"))
    print(f"wrote {path}")


def claims(rows: list[dict[str, Any]]) -> list[str]:
    """Each claim of method doc A/G checked on these rows: how often it holds, and by how much."""

    def acc(variant: str, r: int, seed: int) -> float:
        return next(x["accuracy"] for x in rows if x["variant"].startswith(variant) and x["round"] == r and x["seed"] == seed)

    def dens(variant: str, r: int, key: str) -> float:
        return statistics.mean(x[key] for x in rows if x["variant"].startswith(variant) and x["round"] == r)

    rounds = sorted({x["round"] for x in rows if x["round"] > 0})
    seeds = sorted({x["seed"] for x in rows})
    pairs = [(r, s) for r in rounds for s in seeds]

    def compare(a: str, b: str) -> tuple[int, int, float]:
        diffs = [acc(a, r, s) - acc(b, r, s) for r, s in pairs]
        return sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), statistics.mean(diffs)

    out = []
    for a, b, claim in (
        ("(a)", "(b)", "winning ticket: the IMP mask with rewound weights beats the same mask from a random re-init"),
        ("(c)", "(a)", "Refill keeps the IMP ticket's accuracy (paper: channel-wise tickets exist up to ~50-60 % sparsity on CIFAR)"),
        ("(d)", "(c)", "Refill+ beats Refill (paper: it re-activates channels; reviewers: not consistently)"),
        ("(e)", "(c)", "Regroup beats Refill at the same IMP round (paper: group-wise tickets reach higher sparsity)"),
    ):
        wins, ties, mean = compare(a, b)
        n = len(pairs)
        out.append(f"- {claim}: {a} > {b} in {wins} of {n} (round, seed) pairs, {ties} equal; mean difference "
                   f"{mean:+.2f} points ({mean / 0.2817:+.1f} test images).")  # fmt: skip
    up = [r for r in rounds if dens("(e)", r, "density") > dens("(e)", r, "imp_density")]
    out.append(
        "- Regroup raises density above IMP's (paper: in-block zeros are refilled, e.g. RN-18 round 2 64 % -> 72.95 %): "
        f"in {len(up)} of {len(rounds)} rounds here; post-regroup density "
        + ", ".join(f"{dens('(e)', r, 'density'):.3f} vs IMP {dens('(e)', r, 'imp_density'):.3f}" for r in rounds)
        + ("." if up else ": more of the IMP nonzeros fall outside the blocks than in-block zeros are refilled, "
           "so the claim does not reproduce on these narrow layers (the IMP ticket is at the same density in (a)).")
    )
    out.append(
        "- Every gap above is a few test images on a 355-image test set with 2 seeds and 3-epoch rounds: treat a "
        "claim as reproduced only where the sign holds in every pair."
    )
    return out


if __name__ == "__main__":
    main()
