"""Per-layer tables, report.json (written atomically) and PNG plots next to it (matplotlib, optional)."""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunekit.atomic import atomic_write, write_text_atomic
from prunekit.pipeline import LayerState, LeftDense


def pattern_words(block: tuple[int, ...]) -> str:
    """The block pattern in the design's words (other tools name the same pattern differently)."""
    if not block or all(b == 1 for b in block):
        return "unstructured"
    if len(block) == 4:
        out, cin, kh, kw = block
        taps = "all kh x kw taps" if (kh, kw) != (1, 1) else "one tap"
        return f"{out} out x {cin} in channels, {taps}"
    return f"{block[0]} out x {block[1]} in"


def layer_rows(states: list[LayerState], left_dense: dict[str, LeftDense] | None = None) -> list[dict[str, Any]]:
    """One row per prunable layer: the selected ones, then those a host policy left dense (with why)."""
    rows = []
    for st in states:
        sel = st.selection
        dense_bytes = 4 * math.prod(st.info.weight_shape)
        if sel is None:
            pattern, reason = "dense", "never pruned"
        elif sel.dense_reason:
            pattern, reason = "dense", sel.dense_reason
        else:
            pattern, reason = sel.pattern or pattern_words(sel.block), ""
        if st.compiled is not None:
            kernel, reason = st.compiled.kernel, st.compiled.reason or reason
        else:
            kernel = "dense" if pattern == "dense" else "masked-dense"
        rows.append(
            {
                "name": st.info.name,
                "shape": list(st.info.weight_shape),
                "pattern": pattern,
                "sparsity": round(sel.sparsity, 4) if sel is not None else 0.0,
                # what the select was asked for (components that record it in meta), beside what it achieved
                "requested_sparsity": _requested(sel),
                "dense_bytes": dense_bytes,
                "packed_bytes": st.layout.nbytes if st.layout is not None else None,
                "layout": st.layout.format if st.layout is not None else None,
                "kernel": kernel,
                "reason": reason,
            }
        )
    for name, ld in (left_dense or {}).items():
        rows.append({"name": name, "shape": list(ld.shape), "pattern": "dense", "sparsity": 0.0,
                     "dense_bytes": 4 * math.prod(ld.shape), "packed_bytes": None, "layout": None, "kernel": "dense",
                     "reason": ld.reason})  # fmt: skip
    return rows


def _requested(sel: Any) -> float | None:
    if sel is None or not isinstance(getattr(sel, "meta", None), dict):
        return None
    value = sel.meta.get("requested_sparsity")
    return round(float(value), 4) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain aligned text table; ``columns`` are (key, heading)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return "x".join(str(i) for i in v)
        return str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def write_json_atomic(obj: Any, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2, default=str) + "\n", path)


class PlotWarning(UserWarning):
    """A plot was skipped (matplotlib missing, or drawing failed); the run itself is unaffected."""


MISSING_MATPLOTLIB = "plots skipped: matplotlib is not installed; pip install matplotlib (the extra prunekit[plots])"
COLORS = {"sparse": "#1f77b4", "masked": "#9ecae1", "dense": "#b0b0b0", "compiled": "#ff7f0e", "acc": "#1f77b4",
          "sparsity": "#d62728", "model": "#2ca02c"}  # fmt: skip


def write_plots(report: dict[str, Any], out_dir: Path, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write the plots ``report`` has data for into ``out_dir`` and return their paths:

    - ``history.png``: accuracy and sparsity per fine-tuning epoch (``history``; dense accuracy dashed,
      epochs where the masks changed marked);
    - ``layers.png``: sparsity per layer (``layers``), layers left dense marked with why;
    - ``speed.png``: per-layer dense vs compiled time and speed-up (``dense_ms``/``sparse_ms`` in the layer
      rows, as ``prunekit bench`` gives) and the whole model (``model_dense_ms``/``model_sparse_ms`` or a
      run's ``dense_latency_ms``/``sparse_latency_ms``), fallback layers marked.

    Never raises for a plot: without matplotlib, or when one plot fails, ``warn`` (default: a PlotWarning)
    says so and the rest is written. Renders off screen (Agg canvas, no pyplot: no window, no global
    backend change); each file is written atomically.
    """
    say = warn or (lambda msg: warnings.warn(msg, PlotWarning, stacklevel=3))
    try:
        import matplotlib  # noqa: F401  (first, so a missing package fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except Exception:  # ImportError, or a broken install: a plot never stops a run
        say(MISSING_MATPLOTLIB)
        return []

    def new_figure(width: float, height: float) -> Any:
        fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        return fig

    written = []
    for name, draw in (("history.png", _history_figure), ("layers.png", _layers_figure), ("speed.png", _speed_figure)):
        try:
            fig = draw(report, new_figure)
            if fig is None:
                continue
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            data = buf.getvalue()
            path = Path(out_dir) / name
            atomic_write(path, lambda tmp, d=data: Path(tmp).write_bytes(d))
            written.append(path)
        except Exception as exc:
            say(f"plot {name} skipped: {type(exc).__name__}: {exc}")
    return written


def _title(report: dict[str, Any]) -> str:
    where = "/".join(str(report[k]) for k in ("model", "data") if report.get(k))
    return f"{report.get('pipeline', '')} on {where}" if where else str(report.get("pipeline", ""))


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _is_dense(row: dict[str, Any]) -> bool:
    """Left dense by a host policy or the select stage (pattern or kernel ``dense``), or a kernel's dense
    fallback (``dense-fallback``). Not ``reason`` alone: some kernels explain a sparse choice there too."""
    return row.get("pattern") == "dense" or str(row.get("kernel") or "").startswith("dense")


def _history_figure(report: dict[str, Any], new_figure: Callable[[float, float], Any]) -> Any:
    history = report.get("history") or []
    if not history:
        return None
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = new_figure(7.5, 4.0)
    ax = fig.add_subplot()
    ax.plot(epochs, [r["accuracy"] for r in history], marker="o", color=COLORS["acc"], label="accuracy (fine-tuning)")
    if report.get("dense_accuracy") is not None:
        ax.axhline(report["dense_accuracy"], ls="--", color=COLORS["acc"], alpha=0.7,
                   label=f"dense {report['dense_accuracy']:.2f} %")  # fmt: skip
    if report.get("compiled_accuracy") is not None:
        ax.scatter([epochs[-1]], [report["compiled_accuracy"]], marker="*", s=140, color=COLORS["compiled"], zorder=3,
                   label=f"compiled {report['compiled_accuracy']:.2f} %")  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    sp = ax.twinx()
    sp.plot(epochs, [r["sparsity"] for r in history], marker=".", color=COLORS["sparsity"], label="sparsity")
    changed = [r for r in history if r.get("updated")]
    for r in changed:
        ax.axvline(r["epoch"], color="gray", ls=":", alpha=0.5)
    if changed:
        sp.scatter([r["epoch"] for r in changed], [r["sparsity"] for r in changed], marker="v", s=50,
                   color=COLORS["sparsity"], zorder=3, label="masks changed")  # fmt: skip
    sp.set_ylim(0, 1)
    sp.set_ylabel("sparsity (fraction of prunable weights removed)")
    handles = [h for a in (ax, sp) for h in a.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize="small")
    ax.set_title(_title(report))
    return fig


def _bar_height(n: int) -> float:
    return max(2.5, 0.24 * n + 1.2)


def _layers_figure(report: dict[str, Any], new_figure: Callable[[float, float], Any]) -> Any:
    rows = report.get("layers") or []
    if not rows:
        return None
    from matplotlib.patches import Patch

    fig = new_figure(8.0, _bar_height(len(rows)))
    ax = fig.add_subplot()
    ys = range(len(rows))
    kinds = set()
    for y, r in zip(ys, rows):
        dense = _is_dense(r)
        kind = "dense" if dense else ("masked" if r.get("kernel") == "masked-dense" else "sparse")
        kinds.add(kind)
        ax.barh(y, r.get("sparsity") or 0.0, color=COLORS[kind], hatch="//" if dense else None, edgecolor="white")
        if dense:
            what = "fallback" if "fallback" in str(r.get("kernel")) else "dense"
            ax.text(0.01, y, _short(f"{what}: {r.get('reason') or r.get('kernel')}", 60), va="center", fontsize="x-small")
    overall = report.get("achieved_sparsity", report.get("sparsity"))
    if isinstance(overall, (int, float)):
        ax.axvline(overall, color=COLORS["sparsity"], ls="--", label=f"overall {overall:.3f}")
    ax.set_yticks(list(ys), [r["name"] for r in rows], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sparsity (fraction of the layer's weights removed)")
    ax.grid(axis="x", alpha=0.3)
    legend = {"sparse": Patch(color=COLORS["sparse"], label="sparse kernel"),
              "masked": Patch(color=COLORS["masked"], label="masked dense (no kernel)"),
              "dense": Patch(facecolor=COLORS["dense"], hatch="//", label="left dense / fallback")}  # fmt: skip
    handles = [h for k, h in legend.items() if k in kinds] + ax.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small")
    ax.set_title(f"{_title(report)}: sparsity per layer")
    return fig


def _timings(report: dict[str, Any]) -> list[tuple[str, float, float, bool, str]]:
    """(label, dense ms, compiled ms, fallback, reason) per timed layer, then the whole model."""
    out = []
    for r in report.get("layers") or []:
        d, s = r.get("dense_ms", r.get("dense_latency_ms")), r.get("sparse_ms", r.get("sparse_latency_ms"))
        if isinstance(d, (int, float)) and isinstance(s, (int, float)) and s > 0:
            out.append((r["name"], float(d), float(s), _is_dense(r), str(r.get("reason") or "")))
    d = report.get("model_dense_ms", report.get("dense_latency_ms"))
    s = report.get("model_sparse_ms", report.get("sparse_latency_ms"))
    if isinstance(d, (int, float)) and isinstance(s, (int, float)) and s > 0:
        out.append(("whole model", float(d), float(s), False, ""))
    return out


def _speed_figure(report: dict[str, Any], new_figure: Callable[[float, float], Any]) -> Any:
    rows = _timings(report)
    if not rows:
        return None
    fig = new_figure(11.0, _bar_height(len(rows)))
    ms, up = fig.subplots(1, 2, sharey=True, width_ratios=[1, 1])
    ys = list(range(len(rows)))
    h = 0.4
    ms.barh([y - h / 2 for y in ys], [r[1] for r in rows], h, color=COLORS["dense"], label="dense")
    ms.barh([y + h / 2 for y in ys], [r[2] for r in rows], h, color=COLORS["compiled"], label="compiled")
    ms.set_xscale("log")
    ms.set_xlabel("median time (ms, log scale)")
    ms.set_yticks(ys, [r[0] for r in rows], fontsize="small")
    ms.invert_yaxis()
    fig.legend(*ms.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="small")
    ms.grid(axis="x", alpha=0.3)
    from matplotlib.ticker import FuncFormatter, LogLocator

    for y, (name, d, s, fallback, reason) in zip(ys, rows):
        color = COLORS["model"] if name == "whole model" else (COLORS["dense"] if fallback else COLORS["sparse"])
        # bars grow from 1x on a log scale: a slow-down points left, a speed-up right, by ratio
        up.barh(y, d / s - 1.0, left=1.0, color=color, hatch="//" if fallback else None, edgecolor="white")
        label = f"{d / s:.2f}x" + (f"  fallback: {_short(reason, 40)}" if fallback else "")
        up.text(max(d / s, 1.0), y, " " + label, va="center", fontsize="x-small")
    ratios = [r[1] / r[2] for r in rows]
    up.axvline(1.0, color="black", lw=0.8)
    up.set_xscale("log", base=2)
    up.set_xlim(min(min(ratios), 1.0) / 1.5, max(max(ratios), 1.0) * 4)  # room for the labels
    up.xaxis.set_major_locator(LogLocator(base=2))
    up.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    up.set_xlabel("speed-up, dense / compiled (log scale; hatched: dense fallback)")
    up.grid(axis="x", alpha=0.3)
    batch = report.get("batch", report.get("latency_batch"))
    setting = ", ".join(x for x in (f"batch {batch}" if batch else "", f"{report['threads']} threads" if report.get("threads") else "") if x)
    fig.suptitle(f"{_title(report)}: dense vs compiled" + (f" ({setting})" if setting else ""))
    return fig
