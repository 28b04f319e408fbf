"""Row partitioning for Regroup: cluster the output channels of a mask so that rows of one part share columns.

Regroup (method doc, section D) partitions the non-empty rows of the GEMM-view mask ``[Cout, n]``: the reference
wrote a hypergraph in hMETIS format (one vertex per non-empty row, one hyperedge per non-empty column holding the
rows that have a 1 there, :func:`hypergraph`) and ran ``shmetis <file> 8 10`` (min-cut, recursive bisection).

Backends (all seeded and deterministic):

* ``"pymetis"`` (default, a dependency) -- METIS (PyPI ``pymetis``) partitions graphs, not hypergraphs, so it
  runs on the row-similarity graph: an edge between two rows weighted by the Jaccard similarity of their supports
  (the paper's wording), recursive bisection minimising the similarity cut. Balance: METIS' ``ufactor = 1000 *
  imbalance`` is a target, not a bound (parts up to ~20 % over ``rows / parts`` were measured at 0.10).
* ``"kahypar"`` (optional, GPL-3.0: ``pip install -c constraints.txt kahypar==1.3.7``) -- KaHyPar on the
  section D hypergraph with its cut / recursive-bisection preset, the closest open replacement for shmetis.
  Every part holds at most ``(1 + imbalance) * ceil(rows / parts)`` rows (checked; a miss raises). One-pin
  hyperedges, which no partition can cut, are dropped first (KaHyPar 1.3.7 crashes when none with two pins is
  left).
* ``"greedy"`` -- a dependency-free greedy Jaccard clustering (densest free row, then its most similar free
  rows, equal part sizes; ``seed`` unused). Never chosen by ``"auto"``; on request only.
* ``"auto"`` -- ``DEFAULT_BACKEND``, falling back to the other real partitioner only when the default's package
  cannot be imported. The choice was made by measured Regroup quality: ``plugins/lth/PARTITIONER.md``.

A missing or failing partitioner raises :class:`PartitionerError` naming the fix; it never returns a dummy
partition (the reference silently returned the mask unchanged when ``shmetis`` could not run).
"""

from __future__ import annotations

import importlib
import math
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from prunekit.errors import PrunekitError

BACKENDS = ("auto", "kahypar", "pymetis", "greedy")
DEFAULT_BACKEND = "pymetis"  # best measured Regroup quality and speed: plugins/lth/PARTITIONER.md
_FALLBACK = {"kahypar": "pymetis", "pymetis": "kahypar"}
_PIP = {"kahypar": "kahypar==1.3.7", "pymetis": "pymetis==2025.2.2"}


class PartitionerError(PrunekitError):
    """The row partitioner is missing, failed, or was asked for something it cannot do."""


def partition_rows(
    mask2: torch.Tensor,
    parts: int = 8,
    seed: int = 0,
    imbalance: float = 0.10,
    backend: str = "auto",
) -> torch.Tensor:
    """Partition the non-empty rows of a bool ``[Cout, n]`` mask into ``parts`` parts of similar size.

    Returns a LongTensor ``[Cout]``: the part id (``0 .. parts-1``) of each non-empty row, ``-1`` for empty rows.
    Same inputs and seed give the same parts. Parts may come back empty (ids are not renumbered).

    With at most ``parts`` non-empty rows there is nothing to balance: every non-empty row gets a part of its
    own (ids ``0 .. rows-1`` in ascending row order), so no partitioner is called. ``parts == 1`` puts every
    non-empty row in part 0.
    """
    m = _as_mask(mask2)
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise PartitionerError(f"parts must be a positive int, got {parts!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PartitionerError(f"seed must be an int >= 0 (KaHyPar reads -1 as 'random'), got {seed!r}")
    if not (isinstance(imbalance, int | float) and 0.0 <= imbalance < 1.0):
        raise PartitionerError(f"imbalance must be a float in [0, 1), got {imbalance!r}")
    if backend not in BACKENDS:
        raise PartitionerError(f"unknown partitioner backend {backend!r}; choose one of {', '.join(BACKENDS)}")

    rows = torch.nonzero(m.any(1)).flatten()
    out = torch.full((m.shape[0],), -1, dtype=torch.long)
    if rows.numel() == 0:
        return out
    if rows.numel() <= parts or parts == 1:
        out[rows] = torch.arange(rows.numel()) if parts > 1 else 0
        return out

    sub = m[rows]
    name, mod = _resolve(backend)
    if name == "greedy":
        part = _greedy(sub, parts)
    else:
        try:
            part = (
                _kahypar(mod, sub, parts, seed, imbalance)
                if name == "kahypar"
                else _pymetis(mod, sub, parts, seed, imbalance)
            )
        except PartitionerError:
            raise
        except Exception as e:  # the C++ extensions raise assorted types
            raise PartitionerError(
                f"partitioner {name!r} failed on a {tuple(m.shape)} mask ({rows.numel()} non-empty rows, "
                f"parts={parts}): {type(e).__name__}: {e}; try backend='{_FALLBACK[name]}' or fewer parts"
            ) from e
    part = np.asarray(part, dtype=np.int64)
    if part.shape != (rows.numel(),) or part.min() < 0 or part.max() >= parts:
        raise PartitionerError(
            f"partitioner {name!r} returned an invalid partition (shape {part.shape}, ids "
            f"{int(part.min())}..{int(part.max())}, expected {rows.numel()} ids in 0..{parts - 1}); "
            f"try backend='{_FALLBACK.get(name, 'kahypar')}'"
        )
    if name == "kahypar":  # KaHyPar promises this bound; 1.3.7 can miss it on degenerate input (identical rows)
        biggest = int(np.bincount(part, minlength=parts).max())
        if biggest > max_part_size(rows.numel(), parts, imbalance):
            raise PartitionerError(
                f"KaHyPar returned a part of {biggest} rows, over its balance bound "
                f"{max_part_size(rows.numel(), parts, imbalance)} ({rows.numel()} rows, parts={parts}, "
                f"imbalance={imbalance}); use backend='pymetis' for this layer"
            )
    out[rows] = torch.from_numpy(part)
    return out


def available_backends() -> tuple[str, ...]:
    """The backends whose packages import here (``"greedy"`` always)."""
    return tuple(n for n in ("kahypar", "pymetis") if _try_import(n) is not None) + ("greedy",)


def _as_mask(mask2: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask2, torch.Tensor) or mask2.dim() != 2:
        shape = tuple(mask2.shape) if isinstance(mask2, torch.Tensor) else type(mask2).__name__
        raise PartitionerError(f"mask2 must be a 2-D [Cout, n] tensor (weight.view(Cout, -1)), got {shape}")
    return (mask2 != 0).cpu()


def _try_import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _resolve(backend: str) -> tuple[str, ModuleType | None]:
    if backend == "greedy":
        return "greedy", None
    first = DEFAULT_BACKEND if backend == "auto" else backend
    mod = _try_import(first)
    if mod is not None:
        return first, mod
    if backend == "auto":
        other = _FALLBACK[first]
        mod = _try_import(other)
        if mod is not None:
            return other, mod
        raise PartitionerError(
            f"no row partitioner for Regroup is installed (neither {first!r} nor {other!r} imports); fix: "
            f"pip install -c constraints.txt {_PIP[first]} (or {_PIP[other]}), or pass backend='greedy' for "
            "the dependency-free greedy clustering"
        )
    raise PartitionerError(
        f"partitioner backend {backend!r} is not installed (import {backend} failed); fix: pip install -c "
        f"constraints.txt {_PIP[backend]}, or choose backend='{_FALLBACK[backend]}' or 'auto'"
    )


def hypergraph(sub: torch.Tensor) -> tuple[int, np.ndarray, np.ndarray]:
    """Section D step 2 for the non-empty rows ``sub`` ``[r, n]``: one hyperedge per non-empty column.

    Returns ``(num_edges, index, pins)`` in CSR form: hyperedge ``e`` holds the (0-based) vertices
    ``pins[index[e]:index[e+1]]``, ascending; hyperedges in ascending column order.
    """
    cols = sub.any(0)
    edge, vert = np.nonzero(sub[:, cols].T.numpy())  # row-major over (column, row): pins grouped per column
    counts = np.bincount(edge, minlength=int(cols.sum()))
    index = np.concatenate([[0], np.cumsum(counts)])
    return int(cols.sum()), index.astype(np.int64), vert.astype(np.int64)


def _kahypar(mod: ModuleType, sub: torch.Tensor, parts: int, seed: int, imbalance: float) -> np.ndarray:
    num_edges, index, pins = hypergraph(sub)
    r = sub.shape[0]
    # A one-pin hyperedge is never cut, and KaHyPar 1.3.7 segfaults when no multi-pin hyperedge remains after
    # its preprocessing: drop them, and split a hypergraph without any into equal contiguous parts (all optimal).
    size = np.diff(index)
    if not (size > 1).any():
        return (np.arange(r) * parts) // r
    keep = np.repeat(size > 1, size)
    index = np.concatenate([[0], np.cumsum(size[size > 1])])
    pins = pins[keep]
    graph = mod.Hypergraph(r, len(index) - 1, index.tolist(), pins.tolist(), parts)
    ctx = mod.Context()
    with tempfile.TemporaryDirectory(prefix="prunekit-kahypar-") as d:
        ini = Path(d) / "config.ini"
        ini.write_text(KAHYPAR_CONFIGS[_KAHYPAR_CONFIG], encoding="utf-8")
        ctx.loadINIconfiguration(str(ini))
    ctx.setK(parts)
    ctx.setEpsilon(float(imbalance))
    ctx.setSeed(int(seed))
    ctx.suppressOutput(True)
    mod.partition(graph, ctx)
    return np.fromiter((graph.blockID(v) for v in range(r)), dtype=np.int64, count=r)


def jaccard(sub: torch.Tensor) -> torch.Tensor:
    """Jaccard similarity ``|a ∩ b| / |a ∪ b|`` of the row supports of ``sub`` ``[r, n]`` (rows non-empty)."""
    a = sub.to(torch.float32)
    inter = a @ a.T  # exact: integer counts far below 2**24
    size = a.sum(1)
    return inter / (size[:, None] + size[None, :] - inter)


def _pymetis(mod: ModuleType, sub: torch.Tensor, parts: int, seed: int, imbalance: float) -> np.ndarray:
    r = sub.shape[0]
    w = torch.round(jaccard(sub) * 1000).to(torch.int64)
    w.fill_diagonal_(0)
    src, dst = torch.nonzero(w, as_tuple=True)  # row-major: neighbours grouped per vertex, both directions
    xadj = np.concatenate([[0], np.cumsum(np.bincount(src.numpy(), minlength=r))])
    opts = mod.Options()
    opts.seed = int(seed)
    opts.ufactor = max(1, int(round(1000 * imbalance)))
    res = mod.part_graph(
        parts,
        adjacency=mod.CSRAdjacency(xadj, dst.numpy()),
        eweights=w[src, dst].numpy(),
        recursive=_METIS_RECURSIVE,
        options=opts,
    )
    return np.asarray(res.vertex_part, dtype=np.int64)


def _greedy(sub: torch.Tensor, parts: int) -> np.ndarray:
    """Equal-size parts: seed each with the densest free row (lowest index on ties), add its most similar rows."""
    r = sub.shape[0]
    sim = jaccard(sub).to(torch.float64)
    density = sub.sum(1).to(torch.float64)
    sizes = [r // parts + (1 if p < r % parts else 0) for p in range(parts)]
    part = torch.full((r,), -1, dtype=torch.long)
    for p, size in enumerate(sizes):  # one pass per part; each pass is vectorised over rows
        free = part < 0
        start = int(torch.argmax(torch.where(free, density, -1.0)))  # argmax returns the first maximum
        score = torch.where(free, sim[start], -1.0)
        score[start] = 2.0
        order = torch.sort(score, descending=True, stable=True).indices
        part[order[:size]] = p
    return part.numpy()


def max_part_size(rows: int, parts: int, imbalance: float) -> int:
    """KaHyPar's balance bound: no part holds more than ``(1 + imbalance) * ceil(rows / parts)`` rows."""
    return math.floor((1.0 + imbalance) * math.ceil(rows / parts))


# KaHyPar 1.3.7 presets (kahypar/config at tag v1.3.7), kept as strings so the wheel needs no data files.
# "cut_rb" (cut_rKaHyPar_sea20): cut objective, recursive bisection -- hMETIS shmetis' objective and scheme.
# "km1_k" (km1_kKaHyPar_sea20): connectivity objective, direct k-way -- measured as an alternative.
_KAHYPAR_COMMON = """\
p-use-sparsifier=true
p-sparsifier-min-median-he-size=28
p-sparsifier-max-hyperedge-size=1200
p-sparsifier-max-cluster-size=10
p-sparsifier-min-cluster-size=2
p-sparsifier-num-hash-func=5
p-sparsifier-combined-num-hash-func=100
p-detect-communities=true
p-detect-communities-in-ip={ip_communities}
p-reuse-communities=false
p-max-louvain-pass-iterations=100
p-min-eps-improvement=0.0001
p-louvain-edge-weight=hybrid
p-large-he-threshold=1000
p-smallest-maxnet-threshold=50000
p-maxnet-removal-factor=0.01
"""
_KAHYPAR_TAIL = """\
i-algo=pool
i-runs=20
i-bp-algorithm=worst_fit
i-bp-heuristic-prepacking=false
i-bp-early-restart=true
i-bp-late-restart=true
i-r-type=twoway_fm
i-r-runs=-1
i-r-fm-stop=simple
i-r-fm-stop-i=50
r-type={refiner}
r-runs=-1
r-fm-stop=adaptive_opt
r-fm-stop-alpha=1
r-fm-stop-i=350
r-flow-execution-policy=exponential
r-hfc-size-constraint=mf-style
r-hfc-scaling=16
r-hfc-distance-based-piercing=true
r-hfc-mbc=true
"""
KAHYPAR_CONFIGS = {
    "cut_rb": "mode=recursive\nobjective=cut\nseed=-1\ncmaxnet=-1\nvcycles=0\n"
    + _KAHYPAR_COMMON.format(ip_communities="false")
    + "c-type=heavy_lazy\nc-s=3.25\nc-t=160\nc-rating-score=heavy_edge\nc-rating-use-communities=true\n"
    "c-rating-heavy_node_penalty=multiplicative\nc-rating-acceptance-criterion=best\n"
    "c-fixed-vertex-acceptance-criterion=free_vertex_only\ni-mode=direct\ni-technique=flat\n"
    + _KAHYPAR_TAIL.format(refiner="twoway_fm_hyperflow_cutter"),
    "km1_k": "mode=direct\nobjective=km1\nseed=-1\ncmaxnet=1000\nvcycles=0\n"
    + _KAHYPAR_COMMON.format(ip_communities="true")
    + "c-type=ml_style\nc-s=1\nc-t=160\nc-rating-score=heavy_edge\nc-rating-use-communities=true\n"
    "c-rating-heavy_node_penalty=no_penalty\nc-rating-acceptance-criterion=best_prefer_unmatched\n"
    "c-fixed-vertex-acceptance-criterion=fixed_vertex_allowed\ni-mode=recursive\ni-technique=multi\n"
    "i-c-type=ml_style\ni-c-s=1\ni-c-t=150\ni-c-rating-score=heavy_edge\ni-c-rating-use-communities=true\n"
    "i-c-rating-heavy_node_penalty=no_penalty\ni-c-rating-acceptance-criterion=best_prefer_unmatched\n"
    "i-c-fixed-vertex-acceptance-criterion=fixed_vertex_allowed\n"
    + _KAHYPAR_TAIL.format(refiner="kway_fm_hyperflow_cutter_km1"),
}
_KAHYPAR_CONFIG = "cut_rb"
_METIS_RECURSIVE = True  # recursive bisection like shmetis; k-way was measured as an alternative
