"""Regenerate benches/results/cpu_whole_model.md (and .json): whole torchvision models on the cpu-1xn backend
against the fastest dense CPU runtimes, all in one interleaved run per configuration.

    .venv/bin/python benches/cpu_whole_model.py                  # everything (1-2 h on 2 cores)
    .venv/bin/python benches/cpu_whole_model.py --models resnet18 --sparsity 0.9 --batch 1 --threads 2 --repeats 3
    .venv/bin/python benches/cpu_whole_model.py --models resnet50 --sparsity 0.9 --batch 1 --threads 2 --profile-only
    .venv/bin/python benches/cpu_whole_model.py --render         # rewrite the .md from the .json

Configurations: resnet50, resnet18, mobilenet_v2 (1xN on its pointwise 1x1 convs only; depthwise stay dense) x
sparsity 0.5 / 0.75 / 0.9 x batch 1 / 8 x threads 1 / 2, 224x224 fp32, pipeline ``subp-1x16-cpu`` (1x16 blocks,
the same number per block-row), one-shot without training, first conv and classifier dense (kernels.md 3.1),
``fallback = "auto"`` (the kernel's rule decides per layer on the real input). Random weights with trained-like
BatchNorm statistics (non-zero shifts, so folding is not free).

Per configuration, one process state and one thread count for every candidate, on the same pruned weights:
PyTorch eager dense (masked weights, BatchNorm unfolded: what users run), torch.compile (inductor, freezing)
dense, ONNX Runtime dense (CPU EP, ``intra_op_num_threads`` = threads), prunekit eager (the compiled pipeline:
BN folded, epilogues fused, packed convs) and prunekit under torch.compile (freezing). The dense runtimes are
prunekit.baselines' (each checked against eager before timing); ``rounds`` x interleaved_medians (warm-up, then
ABBA... order), the best round's median is reported with the range over rounds. Every error is the max relative
error against eager masked dense; prunekit above 1e-4 fails the run. A later run replaces only the rows it
measured (keyed by model, sparsity, batch, threads).

The profile (``--profile``; by default only for ResNet-50 at 0.9, batch 1, 2 threads, when selected) splits the
prunekit eager forward by op (torch.profiler self time) and by layer group (forward hooks on each fused site).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))

from cpu1xn_table import geomean, keep_freed_memory  # noqa: E402
from prunekit_cpu1xn import ext  # noqa: E402
from prunekit_cpu1xn.modules import Packed1xN  # noqa: E402
from prunekit_cpu1xn.testing import trained_like_bn  # noqa: E402

from prunekit import baselines, fusion  # noqa: E402
from prunekit.models import build_model  # noqa: E402
from prunekit.pipeline import Pipeline  # noqa: E402
from prunekit.timing import cpu_isa, cpu_model, interleaved_medians  # noqa: E402
from prunekit.verify import max_rel_err  # noqa: E402

PIPELINE = "subp-1x16-cpu"
MODELS = ("resnet50", "resnet18", "mobilenet_v2")
SPARSITIES = (0.5, 0.75, 0.9)
BATCHES = (1, 8)
THREADS = (1, 2)
DENSE = ("eager", "torch.compile", "onnxruntime")
PRUNEKIT = ("prunekit", "prunekit+compile")
CANDIDATES = DENSE + PRUNEKIT
TOLERANCE = 1e-4
PROFILE_DEFAULT = ("resnet50", 0.9, 1, 2)
OUT = ROOT / "benches" / "results" / "cpu_whole_model.md"


# ---------------------------------------------------------------- the models


def pruned(model_name: str, sparsity: float, seed: int = 0) -> tuple[Pipeline, nn.Module, nn.Module]:
    """(pipeline, model attached and pruned, masked dense reference with its own BatchNorms)."""
    torch.manual_seed(seed)
    model = build_model(model_name, 1000).eval()
    trained_like_bn(model, seed)
    reference = copy.deepcopy(model)
    pipe = Pipeline.load(PIPELINE, ROOT / "registry.toml")
    h = pipe.host
    h.sparsity, h.keep_first_dense, h.keep_last_dense = sparsity, True, True
    if model_name.startswith("mobilenet"):  # the 1xN paper's MobileNetV2 setting: pointwise convs only
        h.include = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    pipe.attach(model)
    pipe.prune(sparsity)
    with torch.no_grad():
        for name, st in pipe.layers.items():
            if st.selection is not None:
                reference.get_submodule(name).weight.mul_(st.selection.mask)
    return pipe, model, reference


def example(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed + 1000 * batch))


# ---------------------------------------------------------------- one configuration


def candidates(pipe: Pipeline, model: nn.Module, reference: nn.Module, x: torch.Tensor, threads: int,
               wanted: tuple[str, ...], log: Callable[[str], None]) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:  # fmt: skip
    """The callables to time and each one's max relative error against eager masked dense."""
    torch._dynamo.reset()  # a fresh cache per configuration: no stale guards, no cache-size-limit fallback
    with torch.inference_mode():
        ref = reference(x)
        got = model(x)
    err = max_rel_err(got, ref)
    if not err <= TOLERANCE:
        raise SystemExit(f"prunekit {pipe.name}: compiled model differs from masked dense eager by {err:.2e} > {TOLERANCE:g}")
    dense = baselines.build(tuple(n for n in DENSE if n in wanted), reference, x, threads, log)
    fns = {name: b.run for name, b in dense.items() if name in wanted}
    errs = {name: b.max_rel_err for name, b in dense.items() if name in wanted}
    if "prunekit" in wanted:
        fns["prunekit"], errs["prunekit"] = (lambda: model(x)), err
    if "prunekit+compile" in wanted:
        # baselines' torch.compile recipe (freezing, compiled on the first call) around the fused model
        pk = baselines.build(("torch.compile",), model, x, threads, log)
        if "torch.compile" in pk:
            fns["prunekit+compile"] = pk["torch.compile"].run
            with torch.inference_mode():
                errs["prunekit+compile"] = max_rel_err(torch.as_tensor(fns["prunekit+compile"]()), ref)
            if not errs["prunekit+compile"] <= TOLERANCE:
                raise SystemExit(f"prunekit under torch.compile differs from masked dense eager by {errs['prunekit+compile']:.2e}")
    return fns, errs


def measure(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, repeats: int, block: int = 1) -> dict[str, list[float]]:
    """Median ms of each candidate per round (each round one interleaved run of all candidates)."""
    per: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        t = interleaved_medians(fns, warmup, repeats, block=block)
        for n in fns:
            per[n].append(t[n]["median_ms"])
    return per


def _interleaving(rows: list[dict[str, Any]]) -> str:
    blocks = sorted({int(r.get("block", 1)) for r in rows})
    per_call = "alternating candidates call by call"
    turns = ("turns of {} timed calls per candidate after one untimed call (the untimed call absorbs the previous "
             "runtime's worker threads, which spin for a while after a call and would take the cores from the next "
             "runtime's first call)")  # fmt: skip
    what = [per_call if b == 1 else turns.format(b) for b in blocks]
    return "Interleaving: " + ("; rows differ: " if len(what) > 1 else "") + " / ".join(what) + " (each row's `block` is in the .json)."


def config_row(model_name: str, sparsity: float, batch: int, threads: int, pipe: Pipeline, per: dict[str, list[float]],
               errs: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    ms = {n: min(v) for n, v in per.items()}
    dense = [n for n in DENSE if n in ms]
    best = min(dense, key=ms.get)
    rounds = len(next(iter(per.values())))
    best_per_round = [min(per[n][r] for n in dense) for r in range(rounds)]
    row: dict[str, Any] = {
        "model": model_name, "sparsity": sparsity, "batch": batch, "threads": threads,
        "achieved_sparsity": round(pipe.sparsity(), 4),
        "pruned_layers": len(pipe.kernels()), "packed_layers": sum(k.startswith("cpu-1xn/") for k in pipe.kernels().values()),
        "fused_sites": len(pipe.fusion.fused) if pipe.fusion is not None else 0,
        "ms": ms, "ms_range": {n: [min(v), max(v)] for n, v in per.items()}, "max_rel_err": errs,
        "best_dense": best,
    }  # fmt: skip
    for n in PRUNEKIT:
        if n in ms:
            ratios = [best_per_round[r] / per[n][r] for r in range(rounds)]
            row[f"{n}_vs_best_dense"] = ms[best] / ms[n]
            row[f"{n}_vs_best_dense_range"] = [min(ratios), max(ratios)]
            row[f"{n}_vs_eager"] = ms["eager"] / ms[n]
            if "onnxruntime" in ms:
                row[f"{n}_vs_onnxruntime"] = ms["onnxruntime"] / ms[n]
    return row


# ---------------------------------------------------------------- where the time goes


_OP_GROUPS = (  # (group, substrings of the profiler's op names), first match wins
    ("packed convs (cpu-1xn, epilogue in the store)", ("prunekit_cpu1xn::conv2d",)),
    ("epilogues after dense convs (one pass)", ("prunekit_cpu1xn::epilogue",)),
    ("dense convs (oneDNN: stem, fallbacks, depthwise)", ("conv", "mkldnn")),
    ("pooling", ("pool", "aten::mean")),
    ("classifier (linear)", ("linear", "addmm", "aten::mm")),
    ("batch norm left unfused", ("batch_norm",)),
)


def _op_group(key: str) -> str:
    for group, subs in _OP_GROUPS:
        if any(s in key for s in subs):
            return group
    return "other ops (add, relu, copies, allocation)"


def _layer_group(mod: nn.Module, stride: int) -> str:
    if isinstance(mod, nn.Linear) or (isinstance(mod, Packed1xN) and mod.kind == "linear"):
        return "packed linear" if isinstance(mod, Packed1xN) else "dense linear (classifier)"
    if isinstance(mod, Packed1xN):
        kind = "packed"
        k = mod.kernel_size[0]
    else:
        kind = "dense depthwise" if getattr(mod, "groups", 1) > 1 else "dense"
        k = mod.kernel_size[0] if isinstance(mod, nn.Conv2d) else 1
    return f"{kind} {k}x{k}" + (f" stride {stride}" if stride > 1 else "")


def profile(model: nn.Module, x: torch.Tensor, iters: int = 20) -> dict[str, Any]:
    """Per-op-group self time (torch.profiler) and per-layer-group time (hooks on the fused sites and on every
    conv/linear called outside them) of the prunekit eager forward, in ms per call."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        wall = (time.perf_counter() - t0) * 1e3 / iters
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model(x)
    ops: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("ProfilerStep"):
            continue
        g = _op_group(ev.key)
        ops[g] = ops.get(g, 0.0) + ev.self_cpu_time_total / 1e3 / iters
    # layer groups: time each fused site (conv + its epilogue) and each conv/linear module called on its own
    times: dict[str, list[float]] = {}
    kept_macs: dict[str, float] = {}
    hooks = []
    sites = getattr(model, fusion.CONTAINER, None)
    covered = set()
    targets: list[tuple[nn.Module, nn.Module]] = []  # (module the hooks time, the conv/linear it computes)
    if sites is not None:
        for site in sites.children():
            covered.add(site.name)
            targets.append((site, model.get_submodule(site.name)))
    for name, mod in model.named_modules():
        if name and name not in covered and isinstance(mod, (nn.Conv2d, nn.Linear, Packed1xN)):
            targets.append((mod, mod))
    starts: dict[int, float] = {}
    for timed, conv in targets:
        stride = conv.stride[0] if hasattr(conv, "stride") else 1
        group = _layer_group(conv, stride)

        def pre(_m: nn.Module, args: tuple, key: int = id(timed)) -> None:
            starts[key] = time.perf_counter()

        def post(_m: nn.Module, args: tuple, y: torch.Tensor, key: int = id(timed), group: str = group,
                 conv: nn.Module = conv) -> None:  # fmt: skip
            times.setdefault(group, []).append((time.perf_counter() - starts.pop(key)) * 1e3)
            kept_macs[group] = kept_macs.get(group, 0.0) + _macs(conv, args[0])

        hooks += [timed.register_forward_pre_hook(pre), timed.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            for _ in range(iters):
                model(x)
    finally:
        for h in hooks:
            h.remove()
    layers = {g: {"ms": sum(v) / iters, "calls": len(v) // iters, "gflops": 2 * kept_macs[g] / (sum(v) / 1e3) / 1e9}
              for g, v in times.items()}  # fmt: skip
    layers["rest (outside conv/linear sites)"] = {"ms": max(0.0, wall - sum(v["ms"] for v in layers.values())), "calls": 0, "gflops": 0.0}
    return {"wall_ms": wall, "ops_ms": ops, "layers": layers}


def _macs(mod: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds the module computes on ``x`` (packed: the kept ones, padding slots included)."""
    if isinstance(mod, Packed1xN):
        if mod.kind == "linear":
            return float(mod.values.numel() * (x.numel() // mod.in_channels))
        h, w = mod.out_hw(x)
        return float(mod.values.numel() * x.shape[0] * h * w)
    if isinstance(mod, nn.Linear):
        return float(mod.weight.numel() * (x.numel() // mod.in_features))
    if isinstance(mod, nn.Conv2d):
        (kh, kw), (sh, sw), (ph, pw) = mod.kernel_size, mod.stride, mod.padding
        h = (x.shape[-2] + 2 * ph - kh) // sh + 1
        w = (x.shape[-1] + 2 * pw - kw) // sw + 1
        return float(mod.weight.numel() * x.shape[0] * h * w)
    return 0.0


# ---------------------------------------------------------------- results


def _key(r: dict) -> tuple:
    return (r["model"], r["sparsity"], r["batch"], r["threads"])


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    keys = {_key(r) for r in new}
    order = {m: i for i, m in enumerate(MODELS)}
    rows = [r for r in old if _key(r) not in keys] + new
    return sorted(rows, key=lambda r: (order.get(r["model"], 99), r["sparsity"], r["batch"], r["threads"]))


def _ms(r: dict, n: str) -> str:
    if n not in r["ms"]:
        return "-"
    lo, hi = r["ms_range"][n]
    return f"{r['ms'][n]:.1f}" + (f" ({lo:.1f}-{hi:.1f})" if hi > lo * 1.005 else "")


def _x(r: dict, key: str) -> str:
    if key not in r:
        return "-"
    rng = r.get(f"{key}_range")
    return f"**{r[key]:.2f}x**" + (f" ({rng[0]:.2f}-{rng[1]:.2f})" if rng else "")


TARGETS = (  # (text, model, sparsity, batch, threads, metric, threshold)
    ("ResNet-50 b1 t2, 0.5: never slower than the fastest dense", "resnet50", 0.5, 1, 2, "vs_best_dense", 1.0),
    ("ResNet-50 b1 t2, 0.75: >= 1.6x vs the fastest dense", "resnet50", 0.75, 1, 2, "vs_best_dense", 1.6),
    ("ResNet-50 b1 t2, 0.9: >= 3.0x vs the fastest dense", "resnet50", 0.9, 1, 2, "vs_best_dense", 3.0),
    ("MobileNetV2 b1 t2, 0.75: >= 1.3x vs ONNX Runtime dense", "mobilenet_v2", 0.75, 1, 2, "vs_onnxruntime", 1.3),
    ("ResNet-50 b8 t2, 0.75: >= 1.3x vs the fastest dense", "resnet50", 0.75, 8, 2, "vs_best_dense", 1.3),
)


def targets(rows: list[dict]) -> list[str]:
    by = {_key(r): r for r in rows}
    out = ["## Targets (issue 11; prunekit = the faster of its eager and torch.compile forms)", "",
           "| target | measured | range over rounds | verdict |", "|---|---|---|---|"]  # fmt: skip
    for text, m, s, b, t, metric, need in TARGETS:
        r = by.get((m, s, b, t))
        vals = [(r[f"{n}_{metric}"], r.get(f"{n}_{metric}_range"), n) for n in PRUNEKIT if r and f"{n}_{metric}" in r]
        if not vals:
            out.append(f"| {text} | not measured | | |")
            continue
        v, rng, n = max(vals, key=lambda z: z[0])
        span = f"{rng[0]:.2f}-{rng[1]:.2f}x" if rng else "-"
        out.append(f"| {text} | {v:.2f}x ({n}) | {span} | {'met' if v >= need else 'missed'} |")
    errs = [e for r in rows for n, e in r["max_rel_err"].items() if n in PRUNEKIT]
    if errs:
        worst = max(errs)
        out.append(f"| prunekit (eager and compiled) vs masked dense eager <= 1e-4 | worst {worst:.1e} | | "
                   f"{'met' if worst <= TOLERANCE else 'missed'} |")  # fmt: skip
    return out + [""]


def markdown(meta: dict, rows: list[dict], profiles: list[dict]) -> str:
    out = ["# Whole-model CPU benchmark: cpu-1xn against the fastest dense runtimes", "",
           "(generated by `benches/cpu_whole_model.py`; do not edit)", "",
           f"CPU: {meta['cpu']}; ISA: {meta['isa']}; kernel: {meta['kernel_isa']}; torch {meta['torch']}; "
           f"onnxruntime {meta['onnxruntime']}; last run {meta['date']} ({meta['wall_s']:.0f} s); malloc: {meta['malloc']}.",
           f"Pipeline `{PIPELINE}` (1x16, uniform rows), one-shot, random weights with trained-like BatchNorm, 224x224 fp32; "
           "first conv and classifier dense; MobileNetV2: pointwise convs only. Times: ms, best round's median "
           f"({meta['rounds']} rounds x {meta['repeats']} interleaved repeats after {meta['warmup']} warm-up; range over "
           "rounds in brackets). Speed-ups of prunekit against the fastest dense runtime of the same round.",
           _interleaving(rows), ""]  # fmt: skip
    cpus = sorted({r.get("cpu", meta["cpu"]) for r in rows} - {meta["cpu"]})
    dates = sorted({r["date"] for r in rows if "date" in r})
    if cpus:
        out += [f"**Rows from other machines are merged in** ({'; '.join(cpus)}): compare rows of one machine only.", ""]
    if len(dates) > 1:
        out += [f"Rows measured {dates[0]} to {dates[-1]} (each row's date and CPU are in the .json).", ""]
    busy = [r for r in rows if max(r.get("load", [0.0])) > r["threads"] + 1.0]
    if busy:
        out += [f"**{len(busy)} of {len(rows)} rows ran on a loaded machine** (1-min load average above the bench's own "
                "threads + 1; in this session the OpenMP ones, eager / torch.compile / prunekit, slowed down far more "
                "than ONNX Runtime's thread pool): " + ", ".join(f"{r['model']} s={r['sparsity']} b={r['batch']} t={r['threads']} "
                f"({max(r['load']):.1f})" for r in busy[:8]) + (" ..." if len(busy) > 8 else ""), ""]  # fmt: skip
    out += targets(rows)
    for m in MODELS:
        mr = [r for r in rows if r["model"] == m]
        if not mr:
            continue
        out += [f"## {m}", "",
                "| s | batch | thr | packed / pruned | eager | torch.compile | ONNX Runtime | prunekit | prunekit + compile "
                "| fastest dense | prunekit vs fastest | pk+compile vs fastest | prunekit vs eager | max rel err (compile / ORT / pk / pk+c) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in mr:
            errs = " / ".join(f"{r['max_rel_err'][n]:.0e}" if n in r["max_rel_err"] else "-"
                              for n in ("torch.compile", "onnxruntime", *PRUNEKIT))  # fmt: skip
            out.append(
                f"| {r['sparsity']} | {r['batch']} | {r['threads']} | {r['packed_layers']} / {r['pruned_layers']} | "
                + " | ".join(_ms(r, n) for n in CANDIDATES)
                + f" | {r['best_dense']} | {_x(r, 'prunekit_vs_best_dense')} | {_x(r, 'prunekit+compile_vs_best_dense')} | "
                f"{r.get('prunekit_vs_eager', float('nan')):.2f}x | {errs} |"
            )
        out.append("")
    gms = [r["prunekit_vs_best_dense"] for r in rows if "prunekit_vs_best_dense" in r]
    if gms:
        out += [f"Geometric mean of prunekit (eager) vs the fastest dense over all {len(gms)} rows: {geomean(gms):.2f}x.", ""]
    for p in profiles:
        out += [f"## Where the time goes: {p['model']} at {p['sparsity']}, batch {p['batch']}, {p['threads']} threads "
                f"(prunekit eager, {p['wall_ms']:.1f} ms per forward)", "",
                "By op (torch.profiler self time; the profiler adds its own overhead):", "",
                "| op group | ms | share |", "|---|---|---|"]  # fmt: skip
        total = sum(p["ops_ms"].values()) or 1.0
        for g, v in sorted(p["ops_ms"].items(), key=lambda kv: -kv[1]):
            out.append(f"| {g} | {v:.2f} | {100 * v / total:.0f} % |")
        out += ["", "By layer group (forward hooks; a fused site = conv + its epilogue; GFLOP/s = kept multiply-adds x 2):",
                "", "| layer group | calls | ms | share | GFLOP/s |", "|---|---|---|---|---|"]  # fmt: skip
        lt = sum(v["ms"] for v in p["layers"].values()) or 1.0
        for g, v in sorted(p["layers"].items(), key=lambda kv: -kv[1]["ms"]):
            gf = f"{v['gflops']:.0f}" if v["gflops"] else "-"
            out.append(f"| {g} | {v['calls']} | {v['ms']:.2f} | {100 * v['ms'] / lt:.0f} % | {gf} |")
        out.append("")
    return "\n".join(out)


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(","))


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(","))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--sparsity", type=_floats, default=SPARSITIES)
    ap.add_argument("--batch", type=_ints, default=BATCHES)
    ap.add_argument("--threads", type=_ints, default=THREADS)
    ap.add_argument("--runtimes", default=",".join(CANDIDATES), help=f"comma list of {', '.join(CANDIDATES)} (eager always)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per candidate per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--block", type=int, default=1,
                    help="timed calls per candidate per turn, after one untimed call (1: alternate every call)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs per configuration (range = run-to-run spread)")
    ap.add_argument("--profile", action="store_true", help="profile every selected configuration (default: ResNet-50 0.9 b1 t2 only)")
    ap.add_argument("--profile-only", action="store_true", help="only the profiles (no timing table rows)")
    ap.add_argument("--render", action="store_true", help="no measuring: rewrite the .md from the .json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"--models: unknown {', '.join(bad)}; choose from {', '.join(MODELS)}")
    args.runtimes = tuple(dict.fromkeys(["eager", *(n.strip() for n in args.runtimes.split(",") if n.strip())]))
    bad = [n for n in args.runtimes if n not in CANDIDATES]
    if bad:
        ap.error(f"--runtimes: unknown {', '.join(bad)}; choose from {', '.join(CANDIDATES)}")
    if not any(n in args.runtimes for n in PRUNEKIT) and not args.profile_only:
        ap.error("--runtimes: include prunekit or prunekit+compile")
    if any(not 0.0 <= s < 1.0 for s in args.sparsity):
        ap.error("--sparsity: values in [0, 1)")
    if min(args.batch) < 1 or min(args.threads) < 1 or min(args.repeats, args.rounds) < 1 or args.warmup < 0:
        ap.error("--batch, --threads, --repeats, --rounds must be >= 1, --warmup >= 0")
    return args


def run_meta(args: argparse.Namespace, t_start: float, malloc_kept: bool, kernel_isa: str, threads_max: int) -> dict:
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    return {
        "cpu": cpu_model(), "isa": cpu_isa(), "kernel_isa": kernel_isa, "torch": torch.__version__,
        "onnxruntime": ort_version, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": time.time() - t_start, "rounds": args.rounds, "repeats": args.repeats, "warmup": args.warmup,
        "malloc": "glibc mallopt: freed memory kept" if malloc_kept else "default", "threads_max": threads_max,
    }  # fmt: skip


def save(out: Path, meta: dict, old: dict, rows: list[dict], profiles: list[dict]) -> None:
    """Write the .json and .md with this run's rows replacing the old ones they re-measured (after every
    configuration, so a long run that dies keeps what it measured)."""
    pkeys = {_key(p) for p in profiles}
    merged_rows = merge(old.get("rows", []), rows)
    merged_profiles = [p for p in old.get("profiles", []) if _key(p) not in pkeys] + profiles
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": merged_rows, "profiles": merged_profiles}, indent=1))
    out.write_text(markdown(meta, merged_rows, merged_profiles))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jpath = args.out.with_suffix(".json")
    old = json.loads(jpath.read_text()) if jpath.exists() else {}
    if args.render:
        args.out.write_text(markdown(old["meta"], old.get("rows", []), old.get("profiles", [])))
        print(f"wrote {args.out}")
        return 0
    warnings.filterwarnings("ignore")  # ONNX export / inductor chatter; errors still raise
    t_start = time.time()
    malloc_kept = keep_freed_memory()
    kernel_isa = ext.isa_name(int(ext.load().isa()))
    rows: list[dict] = []
    profiles: list[dict] = []
    threads_max = torch.get_num_threads()
    try:
        for m in args.models:
            for s in args.sparsity:
                for b in args.batch:
                    pipe, model, reference = pruned(m, s, args.seed)
                    x = example(b, args.seed)
                    pipe.compile(example=x)  # the fallback rule sees this batch and size
                    for t in args.threads:
                        torch.set_num_threads(t)
                        tag = f"{m} s={s} b={b} t={t}"
                        if not args.profile_only:
                            t0, load0 = time.time(), os.getloadavg()[0]
                            fns, errs = candidates(pipe, model, reference, x, t, args.runtimes,
                                                   lambda msg, tag=tag: print(f"{tag}: {msg}"))  # fmt: skip
                            row = config_row(m, s, b, t, pipe, measure(fns, args.rounds, args.warmup, args.repeats, args.block), errs)
                            row.update(wall_s=time.time() - t0, cpu=cpu_model(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                       rounds=args.rounds, repeats=args.repeats, block=args.block, load=[load0, os.getloadavg()[0]])  # fmt: skip
                            rows.append(row)
                            print(f"{tag}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in row["ms"].items())
                                  + f"; prunekit vs fastest dense {row.get('prunekit_vs_best_dense', float('nan')):.2f}x"
                                  f" ({row['wall_s']:.0f} s)", flush=True)  # fmt: skip
                            del fns
                        if args.profile or args.profile_only or (m, s, b, t) == PROFILE_DEFAULT:
                            p = profile(model, x)
                            profiles.append({"model": m, "sparsity": s, "batch": b, "threads": t, **p})
                            print(f"{tag}: profiled, {p['wall_ms']:.1f} ms per forward", flush=True)
                        save(args.out, run_meta(args, t_start, malloc_kept, kernel_isa, threads_max), old, rows, profiles)
                    del pipe, model, reference
                    torch._dynamo.reset()
                    gc.collect()
    finally:
        torch.set_num_threads(threads_max)
    print(f"wrote {args.out} and {jpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
