"""Measure Regroup quality per row partitioner on ResNet-18/50-like layer shapes; print markdown tables.

For each layer shape, mask kind (random Bernoulli, or IMP-like: magnitude threshold of a synthetic weight with
row, input-channel and tap scales plus a low-rank row x input-channel interaction, so supports correlate) and
density, every backend partitions the rows (parts=8, seeds 0..S-1) and regroup runs with the reference constants.
Reported: kept = fraction of the original nonzeros inside blocks (higher = more of the ticket survives), fill =
fraction of the regrouped mask's ones that were original nonzeros (higher = narrower blocks for what they keep),
density after regroup, blocks, part sizes, rows zeroed, and the partitioner's median time (after a warm-up call
per backend). ``kahypar`` is the hypergraph of section D with KaHyPar's cut/recursive-bisection preset (the
shmetis analogue), ``kahypar-km1`` its connectivity/direct k-way preset, ``pymetis`` METIS recursive bisection on
the Jaccard row-similarity graph, ``pymetis-kway`` the same with k-way, ``greedy`` the dependency-free
clustering, ``contiguous`` (rows 0..Cout/8-1, ...) a no-partitioner baseline that shows what partitioning adds.
A last table runs the default backend on small layers (Cout 32/64/128) with several parts / min_rows settings.

    .venv/bin/python plugins/lth/tools/partitioner_quality.py            # full table (minutes)
    .venv/bin/python plugins/lth/tools/partitioner_quality.py --quick    # two layers, one seed
    .venv/bin/python plugins/lth/tools/partitioner_quality.py --timing   # one 512x4608 layer, median of 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch
from prunekit_lth import partition as P
from prunekit_lth.regroup import regroup

# (name, Cout, Cin, k): ResNet-18 CIFAR and ResNet-50 layer shapes; n = Cin * k * k
LAYERS = [
    ("r18.layer2.conv2", 128, 128, 3),
    ("r18.layer3.conv2", 256, 256, 3),
    ("r18.layer4.conv2", 512, 512, 3),
    ("r18.layer4.downsample", 512, 256, 1),
    ("r50.layer1.conv3", 256, 64, 1),
    ("r50.layer3.conv3", 1024, 256, 1),
    ("r50.layer4.conv1", 512, 2048, 1),
]
DENSITIES = (0.3, 0.1)
BACKENDS = ("kahypar", "kahypar-km1", "pymetis", "pymetis-kway", "greedy", "contiguous")
SMALL = [(32, 16, 3), (64, 32, 3), (128, 64, 3)]  # digits-like: (Cout, Cin, k)


def make_mask(kind: str, cout: int, cin: int, k: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = cin * k * k
    if kind == "random":
        return torch.rand(cout, n, generator=g) < density
    rank = 4
    row = torch.randn(cout, 1, generator=g) * 0.5
    chan = torch.randn(1, cin, generator=g) * 0.5
    inter = (torch.randn(cout, rank, generator=g) @ torch.randn(rank, cin, generator=g)) / rank**0.5 * 0.7
    tap = torch.randn(1, 1, k * k, generator=g) * 0.3
    log_scale = (row + chan + inter)[:, :, None] + tap  # [cout, cin, k*k]: taps of one input channel share scales
    w = torch.randn(cout, cin, k * k, generator=g) * log_scale.exp()
    score = w.abs().reshape(cout, n)
    keep = int(round(density * cout * n))
    thr = torch.topk(score.flatten(), keep).values[-1]
    return score >= thr


def run_backend(name: str, m: torch.Tensor, seed: int) -> torch.Tensor:
    if name == "contiguous":
        part = (torch.arange(m.shape[0]) * 8) // m.shape[0]
        return torch.where(m.any(1), part, -1)
    if name == "kahypar-km1":
        old, P._KAHYPAR_CONFIG = P._KAHYPAR_CONFIG, "km1_k"
        try:
            return P.partition_rows(m, 8, seed=seed, backend="kahypar")
        finally:
            P._KAHYPAR_CONFIG = old
    if name == "pymetis-kway":
        P._METIS_RECURSIVE = False
        try:
            return P.partition_rows(m, 8, seed=seed, backend="pymetis")
        finally:
            P._METIS_RECURSIVE = True
    return P.partition_rows(m, 8, seed=seed, backend=name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two layers, one density, one seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--timing", action="store_true", help="only time one 512x4608 layer (median of 7)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timing:
        timing()
        return
    layers = LAYERS[1:3] if args.quick else LAYERS
    densities = DENSITIES[:1] if args.quick else DENSITIES
    seeds = range(1 if args.quick else args.seeds)

    warm = torch.rand(256, 576, generator=torch.Generator().manual_seed(1)) < 0.2
    for b in BACKENDS:
        run_backend(b, warm, 0)

    print(
        f"torch threads: {torch.get_num_threads()}; load average at start {os.getloadavg()[0]:.2f}; parts=8, ratio=1.5, tile=32, min_rows=16, imbalance=0.10; "
        f"seeds {list(seeds)}; kept/fill/density are means over seeds, times are medians"
    )
    print()
    print(
        "| layer | Cout x n | mask | density | backend | kept % | fill % | density after | blocks | part sizes "
        "| unchanged runs | rows zeroed | partition s | regroup s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cells: list[dict[str, dict[str, float]]] = []
    for lname, cout, cin, k in layers:
        n = cin * k * k
        for kind in ("random", "imp-like"):
            for d in densities:
                m = make_mask(kind, cout, cin, k, d, seed=7)
                cell: dict[str, dict[str, float]] = {}
                for b in BACKENDS:
                    res = defaultdict(list)
                    for s in seeds:
                        t0 = time.perf_counter()
                        part = run_backend(b, m, s)
                        t1 = time.perf_counter()
                        r = regroup(m, part=part)
                        t2 = time.perf_counter()
                        sizes = torch.bincount(part[part >= 0], minlength=8)
                        res["kept"].append(r.kept_orig / max(1, r.kept_orig + r.dropped))
                        res["fill"].append(r.kept_orig / max(1, r.kept_orig + r.refilled))
                        res["after"].append(r.density_after)
                        res["blocks"].append(len(r.blocks))
                        res["lo"].append(int(sizes.min()))
                        res["hi"].append(int(sizes.max()))
                        res["unchanged"].append(int(r.unchanged))
                        res["zeroed"].append(r.rows_without_block)
                        res["tp"].append(t1 - t0)
                        res["tr"].append(t2 - t1)
                    c = {key: statistics.mean(v) for key, v in res.items()}
                    c.update(
                        tp=statistics.median(res["tp"]),
                        tr=statistics.median(res["tr"]),
                        unchanged=sum(res["unchanged"]),
                        lo=min(res["lo"]),
                        hi=max(res["hi"]),
                        before=r.density_before,
                        kind=kind,
                    )
                    cell[b] = c
                    print(
                        f"| {lname} | {cout}x{n} | {kind} | {r.density_before:.2f} | {b} | {100 * c['kept']:.1f} | "
                        f"{100 * c['fill']:.1f} | {c['after']:.3f} | {c['blocks']:.1f} | {c['lo']}-{c['hi']} | "
                        f"{c['unchanged']}/{len(res['tp'])} | {c['zeroed']:.0f} | {c['tp']:.3f} | {c['tr']:.3f} |",
                        flush=True,
                    )
                cells.append(cell)
    # Only cells where every backend produced blocks in every run: an unchanged mask scores 100 % kept trivially.
    used = [c for c in cells if all(c[b]["unchanged"] == 0 for b in BACKENDS)]
    print()
    print(
        f"Summary over the {len(used)} of {len(cells)} cells where every backend produced blocks in every run "
        "(means; partition time summed over all cells):"
    )
    print()
    print(
        "| backend | kept % | kept % random | kept % imp-like | fill % | fill % imp-like | density after / before "
        "| partition s total |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for b in BACKENDS:

        def mean(key: str, kind: str | None = None, b: str = b) -> float:
            vals = [c[b][key] for c in used if kind is None or c[b]["kind"] == kind]
            return statistics.mean(vals) if vals else float("nan")

        ratio = statistics.mean(c[b]["after"] / c[b]["before"] for c in used)
        print(
            f"| {b} | {100 * mean('kept'):.1f} | {100 * mean('kept', 'random'):.1f} | "
            f"{100 * mean('kept', 'imp-like'):.1f} | {100 * mean('fill'):.1f} | {100 * mean('fill', 'imp-like'):.1f} "
            f"| {ratio:.3f} | {sum(c[b]['tp'] for c in cells):.1f} |"
        )
    small_layers(seeds)
    print()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


def timing(repeats: int = 7) -> None:
    """Median wall time of regroup (partition given) and of each partitioner on one 512x4608 IMP-like layer."""
    m = make_mask("imp-like", 512, 512, 3, 0.2, seed=7)
    part = P.partition_rows(m, 8, backend="pymetis")

    def median(fn) -> float:
        fn()  # warm-up
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    print(
        f"512x4608 IMP-like mask, density 0.20, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}, median of {repeats} after a warm-up:"
    )
    print()
    print("| step | seconds |")
    print("|---|---|")
    print(f"| regroup(mask, part=...) (no partitioner) | {median(lambda: regroup(m, part=part)):.4f} |")
    for b in P.available_backends():
        print(f"| partition_rows(backend={b!r}) | {median(lambda b=b: P.partition_rows(m, 8, backend=b)):.4f} |")
    print(f"| regroup(mask) end to end, default backend | {median(lambda: regroup(m)):.4f} |")
    print()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


def small_layers(seeds: range) -> None:
    print()
    print(f"Small layers, IMP-like masks at density 0.2, default backend ({P.DEFAULT_BACKEND}), means over seeds:")
    print()
    print("| Cout x n | parts | min_rows | kept % | fill % | density after | blocks | rows zeroed | unchanged runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cout, cin, k in SMALL:
        m = make_mask("imp-like", cout, cin, k, 0.2, seed=7)
        settings = {(8, 16), (8, 4), (max(1, cout // 32), 16), (max(1, cout // 16), 8), (1, 16)}
        for parts, min_rows in sorted(settings, key=lambda s: (-s[0], -s[1])):
            rs = [regroup(m, parts=parts, min_rows=min_rows, seed=s) for s in seeds]
            kept = statistics.mean(r.kept_orig / max(1, r.kept_orig + r.dropped) for r in rs)
            fill = statistics.mean(r.kept_orig / max(1, r.kept_orig + r.refilled) for r in rs)
            print(
                f"| {cout}x{m.shape[1]} | {parts} | {min_rows} | {100 * kept:.1f} | {100 * fill:.1f} | "
                f"{statistics.mean(r.density_after for r in rs):.3f} | {statistics.mean(len(r.blocks) for r in rs):.1f} | "
                f"{statistics.mean(r.rows_without_block for r in rs):.0f} | {sum(r.unchanged for r in rs)}/{len(rs)} |"
            )


if __name__ == "__main__":
    main()
