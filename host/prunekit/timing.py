"""Honest timing: warm-up, many repeats, interleaved candidates, medians, one thread setting for all."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float = 0.0,
    block: int = 1,
) -> dict[str, dict[str, float]]:
    """Median and spread (ms) of each callable, run in alternating order so drift hits all alike.

    ``block`` > 1: each turn runs one callable ``block + 1`` times in a row and times the last ``block``;
    the untimed first call absorbs what the previous runtime left behind (ONNX Runtime's and OpenMP's
    worker threads spin for a while after a call and take the cores from the next runtime's first call, a
    cost no deployment running one runtime pays). ``repeats`` counts turns."""
    names = list(fns)
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        samples: dict[str, list[float]] = {n: [] for n in names}
        start = time.perf_counter()
        i = 0
        while i < repeats or (time.perf_counter() - start) < min_time_s:
            order = names if i % 2 == 0 else names[::-1]
            for n in order:
                if block > 1:
                    fns[n]()
                for _ in range(block):
                    t0 = time.perf_counter()
                    fns[n]()
                    samples[n].append((time.perf_counter() - t0) * 1e3)
            i += 1
            if i >= 10 * repeats:
                break
    out = {}
    for n, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 4 else [min(s), statistics.median(s), max(s)]
        out[n] = {"median_ms": statistics.median(s), "q1_ms": q[0], "q3_ms": q[2], "repeats": len(s)}
    return out


def cpu_model() -> str:
    """The CPU model string (every results table prints it: sessions land on different machines)."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_isa() -> str:
    """The widest x86 SIMD extensions this CPU reports (avx512f / avx2 / amx), for results tables."""
    try:
        flags = next(line for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    names = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    return " ".join(names) or "no AVX2"
