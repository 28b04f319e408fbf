"""Time the dense-rows kernel (prunekit_lth.rows) against dense F.conv2d; writes benches/results/lth_rows_kernel.md.

    .venv/bin/python benches/lth_rows_kernel.py            # full sweep (~5-8 min on 2 cores)
    .venv/bin/python benches/lth_rows_kernel.py --quick    # batch 1, one thread setting, ResNet-18 only

Shapes: every distinct Conv2d of torchvision ResNet-18 and ResNet-50 (weights=None) with its real input
size at 224x224, found by running the model once. Masks: K' = round(f * Cout) random whole output channels,
f in {0.25, 0.5, 0.75}. Every kernel is first checked against F.conv2d(x, W * mask) on fresh random inputs
(batch 1 and 3, with bias), then timed: dense F.conv2d on the same masked weight and the compiled
RowsKernel module (fallback = "never"), interleaved (ABAB... then BABA...), warm-up, median of >= 10
repeats, torch.set_num_threads(T) for both. speedup = t_dense / t_rows; ideal = 1 / f; "of ideal" =
speedup * f (1.0 = the time scales exactly with the kept fraction).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from prunekit_lth.rows import (
    BASE_OVERHEAD,
    FIXED_MACS,
    MARGIN,
    SCATTER_MACS,
    RowsKernel,
    build,
    dense_macs,
    pack_rows,
    predicted_speedup,
    rule,
)

from prunekit.records import LayerInfo, Selection
from prunekit.timing import interleaved_medians

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benches" / "results" / "lth_rows_kernel.md"
FRACTIONS = (0.25, 0.5, 0.75)
OTHERS_MAX = 0.10  # re-measure a group when other processes used more than this share of the CPU


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


class OtherLoad:
    """Share of the machine's CPU time that *other* processes used since ``start()`` (from /proc/stat minus
    this process's own CPU time): the cells of a box shared with other jobs are re-measured when it is high."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.cores = os.cpu_count() or 1
        self.start()

    def _busy(self) -> float | None:
        try:
            f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return (sum(f[:8]) - f[3] - f[4]) / self.tick  # all but idle and iowait

    def start(self) -> None:
        self.t0, self.b0, self.p0 = time.perf_counter(), self._busy(), time.process_time()

    def share(self) -> float:
        b1 = self._busy()
        if b1 is None or self.b0 is None:
            return 0.0
        wall = max(time.perf_counter() - self.t0, 1e-9)
        return max(0.0, (b1 - self.b0) - (time.process_time() - self.p0)) / (wall * self.cores)


def conv_shapes(arch: str) -> list[dict]:
    """Distinct (Cin, Cout, k, stride, padding, input H) of the model's convs at 224x224, in model order."""
    model = getattr(torchvision.models, arch)(weights=None).eval()
    seen: dict[tuple, dict] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):

            def hook(mod, args, _y, name=name):  # noqa: ANN001, ANN202
                key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0], args[0].shape[-1])
                seen.setdefault(key, {"model": arch, "layer": name, "key": key})

            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    return list(seen.values())


def layer_info(key: tuple, name: str, batch: int = 1) -> LayerInfo:
    """The layer as the pipeline sees it after ``compile(example)``: input shape known."""
    cin, cout, k, s, p, hw = key
    return LayerInfo(name=name, kind="conv2d", weight_shape=(cout, cin, k, k), stride=(s, s), padding=(p, p),
                     input_shape=(batch, cin, hw, hw))  # fmt: skip


def row_mask(cout: int, f: float, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    kept = max(1, round(f * cout))
    rows = torch.randperm(cout, generator=gen)[:kept]
    keep = torch.zeros(cout, dtype=torch.bool)
    keep[rows] = True
    return keep.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def build_case(entry: dict, f: float, gen: torch.Generator, batch: int = 1) -> tuple:
    layer = layer_info(entry["key"], entry["layer"], batch)
    w = torch.randn(layer.weight_shape, generator=gen)
    mask = row_mask(layer.weight_shape[0], f, layer.weight_shape, gen)
    wm = w * mask
    return layer, wm, mask


def check(layer: LayerInfo, wm: torch.Tensor, mask: torch.Tensor, hw: int, gen: torch.Generator) -> float:
    """Worst rel. error of the compiled layer (with a bias) vs F.conv2d on fresh inputs, batch 1 and 3."""
    bias = torch.randn(layer.weight_shape[0], generator=gen)
    mod = build(layer, pack_rows(layer, wm, Selection(mask=mask)), bias, RowsKernel.Params(fallback="never")).module
    worst = 0.0
    with torch.inference_mode():
        for b in (1, 3):
            x = torch.randn(b, layer.weight_shape[1], hw, hw, generator=gen)
            ref = F.conv2d(x, wm, bias, layer.stride, layer.padding)
            worst = max(worst, rel_err(mod(x), ref))
    return worst


def time_group(entry: dict, batch: int, threads: int, gen: torch.Generator, budget_s: float) -> list[dict]:
    """Dense and rows at every fraction on one shape, interleaved in one run."""
    torch.set_num_threads(threads)
    cin, _cout, _k, _s, _p, hw = entry["key"]
    x = torch.randn(batch, cin, hw, hw, generator=gen)
    fns, cases = {}, {}
    for f in FRACTIONS:
        layer, wm, mask = build_case(entry, f, gen, batch)
        mod = build(layer, pack_rows(layer, wm, Selection(mask=mask)), None, RowsKernel.Params(fallback="never")).module
        fns[f"dense@{f}"] = lambda wm=wm, layer=layer: F.conv2d(x, wm, None, layer.stride, layer.padding)
        fns[f"rows@{f}"] = lambda mod=mod: mod(x)
        cases[f] = layer
    with torch.inference_mode():  # probe one round to size the repeats to the time budget
        t0 = time.perf_counter()
        for fn in fns.values():
            fn()
        round_s = time.perf_counter() - t0
    repeats = int(min(60, max(10, budget_s / max(round_s, 1e-6))))
    res = interleaved_medians(fns, warmup=2, repeats=repeats)
    rows = []
    for f in FRACTIONS:
        layer = cases[f]
        td, tr = res[f"dense@{f}"]["median_ms"], res[f"rows@{f}"]["median_ms"]
        kept = max(1, round(f * layer.weight_shape[0]))
        frac = kept / layer.weight_shape[0]
        thin, _ = rule(layer, kept)
        predicted = predicted_speedup(layer, kept)
        rows.append({
            "model": entry["model"], "layer": entry["layer"], "key": entry["key"], "batch": batch, "threads": threads,
            "f": frac, "dense_ms": td, "rows_ms": tr, "speedup": td / tr, "of_ideal": td / tr * frac,
            "repeats": repeats, "auto_thin": thin, "macs_per_out": cin * layer.weight_shape[2] ** 2,
            "macs": dense_macs(layer), "predicted": predicted,
        })  # fmt: skip
    return rows


def wait_quiet(deadline: float, most_s: float = 10.0) -> None:
    """Before a multi-thread group, wait (at most ``most_s``, never past ``deadline``) for a half second in
    which other processes leave the CPU alone: one descheduled OpenMP thread stalls the whole call."""
    end = min(time.perf_counter() + most_s, deadline)
    while time.perf_counter() < end:
        probe = OtherLoad()
        time.sleep(0.5)
        if probe.share() < 0.05:
            return


def measured_group(
    entry: dict, batch: int, threads: int, gen: torch.Generator, budget_s: float, tries: int, deadline: float
) -> list[dict]:
    """time_group, re-run (up to ``tries`` times, and not after ``deadline``) while other processes took more than
    OTHERS_MAX of the CPU; the try with the least outside load is kept and its share recorded in every cell."""
    best = None
    for i in range(tries):
        if i and time.perf_counter() > deadline:
            break
        if threads > 1:
            wait_quiet(deadline)
        load = OtherLoad()
        rows = time_group(entry, batch, threads, gen, budget_s)
        share = load.share()
        if best is None or share < best[0]:
            best = (share, rows)
        if share <= OTHERS_MAX:
            break
    for r in best[1]:
        r["others"] = best[0]
    return best[1]


def assembly_variants(threads: int) -> list[dict]:
    """Ways to build the full output from the thin one (what RowsModule._assemble chose, and why)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(7)
    out = []
    for cout, hw, batch in ((256, 14, 1), (64, 56, 1), (256, 56, 8)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            keep = torch.randperm(cout, generator=gen)[: cout // 2].sort().values
            rem = torch.tensor(sorted(set(range(cout)) - set(keep.tolist())), dtype=torch.int64)
            y = torch.randn(batch, cout // 2, hw, hw, generator=gen).contiguous(memory_format=fmt)
            shape = (batch, cout, hw, hw)

            def zero_copy(y=y, keep=keep, shape=shape, fmt=fmt):  # noqa: ANN202
                return torch.empty(shape, memory_format=fmt).zero_().index_copy_(1, keep, y)

            def fill_removed(y=y, keep=keep, rem=rem, shape=shape, fmt=fmt):  # noqa: ANN202
                return torch.empty(shape, memory_format=fmt).index_fill_(1, rem, 0.0).index_copy_(1, keep, y)

            def setitem(y=y, keep=keep, rem=rem, shape=shape, fmt=fmt):  # noqa: ANN202
                o = torch.empty(shape, memory_format=fmt)
                o[:, rem] = 0.0
                o[:, keep] = y
                return o

            res = interleaved_medians({"zero+index_copy_": zero_copy, "index_fill_+index_copy_": fill_removed,
                                       "setitem": setitem}, warmup=3, repeats=25)  # fmt: skip
            out.append({"shape": shape, "fmt": "channels_last" if fmt is torch.channels_last else "NCHW",
                        **{k: v["median_ms"] for k, v in res.items()}})  # fmt: skip
    return out


def granularity(threads: int) -> list[tuple[int, float, float]]:
    """The thin conv's time against K' around multiples of 16 (oneDNN's output-channel block)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 128, 28, 28, generator=gen)
    ks = (32, 33, 40, 48, 49, 64)
    weights = {k: torch.randn(k, 128, 3, 3, generator=gen) for k in ks}
    fns = {k: (lambda w=weights[k]: F.conv2d(x, w, None, 1, 1)) for k in ks}
    res = interleaved_medians(fns, warmup=3, repeats=30)
    return [(k, res[k]["median_ms"], predicted_speedup(layer_info((128, 128, 3, 1, 1, 28), "g"), k)) for k in ks]


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else float("nan")


def write(rows: list[dict], asm: list[dict], gran: list[tuple], errs: list[tuple], meta: dict) -> None:
    L = [
        "# dense-rows kernel (prunekit_lth.rows.RowsKernel) vs dense F.conv2d",
        "",
        f"Command: `{meta['command']}` (generated; do not edit)",
        "",
        f"CPU: {meta['cpu']} ({meta['cores']} cores visible); torch {torch.__version__}; threads per cell as in the "
        f"tables (`torch.set_num_threads`, same for both sides); run {meta['when']} ({meta['secs']:.0f} s).",
        f"Load average before / after: {meta['load0']} / {meta['load1']}. {meta['shared']}",
        "",
        "Protocol: for each conv shape, dense F.conv2d on the masked weight and the compiled dense-rows module "
        "(fallback = never) at K' = round(f * Cout) random whole channels, all six callables interleaved in one run "
        "(alternating order), 2 warm-up rounds, median of the repeats shown. speedup = t_dense / t_rows, ideal = 1/f, "
        "of ideal = speedup * f. 'auto' = what `fallback = \"auto\"` would build (thin / dense).",
        "",
        f"Correctness first: {len(errs)} kernels (every shape x fraction) checked against F.conv2d(x, W*mask, bias) on "
        f"fresh random inputs (batch 1 and 3): worst relative error {max(e[-1] for e in errs):.1e} (tolerance 1e-5).",
        "",
        "## Summary: geometric mean over the shapes of each model, speed-up (of ideal)",
        "",
    ]
    configs = sorted({(r["threads"], r["batch"]) for r in rows})
    models = sorted({r["model"] for r in rows})
    L.append("| model | threads | batch | " + " | ".join(f"f = {f}" for f in FRACTIONS) + " | worst of ideal |")
    L.append("|---|---|---|" + "---|" * len(FRACTIONS) + "---|")
    for model in models:
        for t, b in configs:
            cells, worst = [], []
            for f in FRACTIONS:
                sel = [r for r in rows if r["model"] == model and (r["threads"], r["batch"]) == (t, b) and abs(r["f"] - f) < 0.02]
                if not sel:
                    cells.append("-")
                    continue
                cells.append(f"{geomean([r['speedup'] for r in sel]):.2f}x ({geomean([r['of_ideal'] for r in sel]):.2f})")
                worst.append(min(sel, key=lambda r: r["of_ideal"]))
            if worst:
                w = min(worst, key=lambda r: r["of_ideal"])
                L.append(f"| {model} | {t} | {b} | " + " | ".join(cells) + f" | {w['of_ideal']:.2f} ({w['layer']}, f={w['f']:.2f}) |")
    # calibration of the fallback model: measured t_rows/t_dense - f against the model's overhead terms
    resid = [r["rows_ms"] / r["dense_ms"] - 1 / r["predicted"] for r in rows]
    wrong_thin = [r for r in rows if r["auto_thin"] and r["speedup"] < 1.0]
    wrong_dense = [r for r in rows if not r["auto_thin"] and r["speedup"] >= MARGIN]
    lost = [r for r in rows if r["auto_thin"] and r["speedup"] < 1.0]

    def cells(rs: list[dict]) -> str:
        return " (" + ", ".join(f"{r['model']} {r['layer']} b{r['batch']} t{r['threads']} f={r['f']:.2f}: {r['speedup']:.2f}x" for r in rs[:10]) + (", ..." if len(rs) > 10 else "") + ")" if rs else ""

    auto_speed = geomean([r["speedup"] if r["auto_thin"] else 1.0 for r in rows])
    L += [
        "",
        "## Fallback calibration",
        "",
        "Model (`prunekit_lth.rows.predicted_speedup`): t_rows / t_dense = f + BASE_OVERHEAD + SCATTER_MACS / (Cin/groups*kh*kw) "
        f"+ FIXED_MACS / (MACs per call), with BASE_OVERHEAD = {BASE_OVERHEAD:g}, SCATTER_MACS = {SCATTER_MACS:g}, "
        f"FIXED_MACS = {FIXED_MACS:g}; `fallback = \"auto\"` builds the thin path when the predicted speed-up is >= {MARGIN}x "
        "(and K' < Cout). The cells' LayerInfo carries the input shape, as after `compile(example)`.",
        f"Measured minus predicted t_rows/t_dense over all {len(rows)} cells: median {statistics.median(resid):+.3f}, "
        f"10th / 90th percentile {sorted(resid)[int(0.1 * (len(resid) - 1))]:+.3f} / {sorted(resid)[int(0.9 * (len(resid) - 1))]:+.3f}.",
        f"Cells where auto builds thin but thin was slower than dense: {len(wrong_thin)}{cells(wrong_thin)}.",
        f"Cells where auto stays dense but thin was >= {MARGIN}x faster: {len(wrong_dense)}{cells(wrong_dense)}.",
        f"Geometric-mean speed-up over all cells with auto's choice (dense = 1.0x): {auto_speed:.2f}x"
        + (f"; in the cells auto got wrong it loses at worst {min(r['speedup'] for r in lost):.2f}x." if lost else "."),
        "",
        "## Output assembly variants (half the channels kept, one thread, ms)",
        "",
        "| output shape | format | zero + index_copy_ | index_fill_(removed) + index_copy_ | out[:, rows] = y |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for a in asm:
        L.append(f"| {list(a['shape'])} | {a['fmt']} | {a['zero+index_copy_']:.3f} | {a['index_fill_+index_copy_']:.3f} | {a['setitem']:.3f} |")
    L += [
        "",
        "## Channel granularity (128>K' 3x3 @28, batch 1, one thread)",
        "",
        "oneDNN computes fp32 output channels in blocks of 16, so the thin conv's time steps at multiples of 16; the sweep "
        "above uses K' = f * Cout, always a multiple of 16 for these shapes, while Refill's K' = floor(nu) is arbitrary "
        "(the model rounds K' up to the block).",
        "",
        "| K' | thin F.conv2d ms | predicted speed-up of the module vs Cout = 128 |",
        "|---|---|---|",
        *[f"| {k} | {ms:.3f} | {p:.2f}x |" for k, ms, p in gran],
    ]
    L += [
        "",
        "## Every cell",
        "",
        "| model | layer | Cin>Cout k s @H | threads | batch | f | dense ms | rows ms | speedup | ideal | of ideal | predicted | auto | repeats |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cin, cout, k, s, _p, hw = r["key"]
        L.append(
            f"| {r['model']} | {r['layer']} | {cin}>{cout} {k}x{k} s{s} @{hw} | {r['threads']} | {r['batch']} | {r['f']:.2f} | "
            f"{r['dense_ms']:.3f} | {r['rows_ms']:.3f} | {r['speedup']:.2f}x | {1 / r['f']:.2f}x | {r['of_ideal']:.2f} | {r['predicted']:.2f}x | "
            f"{'thin' if r['auto_thin'] else 'dense'} | {r['repeats']}{' *' if r['others'] > OTHERS_MAX else ''} |"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18, batch 1, 2 threads only")
    ap.add_argument("--json", type=Path, help="also dump the raw cells here (for refitting the fallback model)")
    ap.add_argument("--tries", type=int, default=4, help="measurements of a group while the box is busy")
    ap.add_argument("--minutes", type=float, default=8.0, help="stop re-measuring disturbed groups after this long")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timing per shape/batch/thread group")
    args = ap.parse_args()
    t_start = time.perf_counter()
    load0 = loadavg()
    whole = OtherLoad()
    deadline = t_start + 60 * args.minutes * 0.85  # leave time for the last groups and the side tables
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    entries = conv_shapes("resnet18") + ([] if args.quick else conv_shapes("resnet50"))
    errs = []
    for e in entries:
        for f in FRACTIONS:
            layer, wm, mask = build_case(e, f, gen)
            err = check(layer, wm, mask, e["key"][-1], gen)
            errs.append((e["model"], e["layer"], f, err))
            if not err <= 1e-5:
                sys.exit(f"{e['model']} {e['layer']} f={f}: relative error {err:.2e} > 1e-5; not timing a wrong kernel")
    configs = [(2, 1)] if args.quick else [(1, 1), (1, 8), (2, 1), (2, 8)]
    rows = []
    for threads, batch in configs:
        for e in entries:
            rows += measured_group(e, batch, threads, gen, args.budget, args.tries, deadline)
            last = rows[-1]
            print(f"t{threads} b{batch} {e['model']} {e['layer']}: speedup at f={last['f']:.2f} {last['speedup']:.2f}x", flush=True)
    asm = assembly_variants(1)
    gran = granularity(1)
    torch.set_num_threads(before)
    load1 = loadavg()
    others = whole.share()
    cores = os.cpu_count() or 0
    flagged = sum(r["others"] > OTHERS_MAX for r in rows)
    high = max(float(load0.split()[0]), float(load1.split()[0])) if load0 != "n/a" else 0.0
    shared = (
        f"Other processes used {100 * others:.0f} % of the machine's CPU time during the run (from /proc/stat minus "
        f"this process), so the box was {'shared with other jobs' if others > 0.05 or high > cores else 'otherwise quiet'} "
        f"(the load average includes this run's own threads). A shape group measured while others took more than "
        f"{100 * OTHERS_MAX:.0f} % was re-measured (up to {args.tries} tries within the run's {args.minutes:g}-minute budget, the least "
        f"disturbed one kept; 2-thread groups first waited up to 10 s for a quiet half second); "
        f"{flagged} cells still above that are marked * (their 2-thread times can stall when a thread is descheduled)."
    )
    meta = {
        "command": " ".join(["python", "benches/lth_rows_kernel.py", *sys.argv[1:]]),
        "cpu": cpu_model(), "cores": cores, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "secs": time.perf_counter() - t_start, "load0": load0, "load1": load1, "shared": shared,
    }  # fmt: skip
    write(rows, asm, gran, errs, meta)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {OUT.relative_to(ROOT)} in {meta['secs']:.0f} s")


if __name__ == "__main__":
    main()
