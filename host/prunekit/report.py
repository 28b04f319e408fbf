"""Per-layer tables and report.json (written atomically)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prunekit.atomic import write_text_atomic
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


def history_svg(history: list[dict[str, Any]], dense_accuracy: float, title: str) -> str:
    """A dependency-free SVG plot: accuracy and sparsity per fine-tuning epoch (dense accuracy dashed)."""
    w, h, pad = 640, 320, 48
    n = max(len(history), 1)

    def x(i: float) -> float:
        return pad + (w - 2 * pad) * (i / max(n - 1, 1))

    accs = [r["accuracy"] for r in history] + [dense_accuracy]
    lo = max(0.0, min(accs) - 2.0)

    def y_acc(a: float) -> float:
        return h - pad - (h - 2 * pad) * (a - lo) / max(100.0 - lo, 1e-9)

    def y_sp(s: float) -> float:
        return h - pad - (h - 2 * pad) * s

    def poly(points: list[tuple[float, float]], color: str, dash: str = "") -> str:
        pts = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        return f'<polyline fill="none" stroke="{color}" stroke-width="2"{extra} points="{pts}"/>'

    acc_pts = [(x(i), y_acc(r["accuracy"])) for i, r in enumerate(history)]
    sp_pts = [(x(i), y_sp(r["sparsity"])) for i, r in enumerate(history)]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{pad}" y="20" font-size="14">{title}</text>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
        poly([(x(0), y_acc(dense_accuracy)), (x(n - 1), y_acc(dense_accuracy))], "#1f77b4", "4 4"),
        poly(acc_pts, "#1f77b4"),
        poly(sp_pts, "#d62728"),
        f'<text x="{pad}" y="{h - 16}">epoch 0 .. {n - 1}</text>',
        f'<text x="{w - pad - 250}" y="{pad - 8}" fill="#1f77b4">accuracy % ({lo:.1f}..100; dashed: dense)</text>',
        f'<text x="{w - pad - 250}" y="{pad + 8}" fill="#d62728">sparsity (0..1)</text>',
        "</svg>",
    ]
    return "\n".join(parts) + "\n"
