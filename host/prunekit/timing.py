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
) -> dict[str, dict[str, float]]:
    """Median and spread (ms) of each callable, run in alternating order so drift hits all alike."""
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
