"""Per-layer tables and report.json (written atomically)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from prunekit.pipeline import LayerState


def pattern_words(block: tuple[int, ...]) -> str:
    """The block pattern in the design's words (other tools name the same pattern differently)."""
    if not block or all(b == 1 for b in block):
        return "unstructured"
    if len(block) == 4:
        out, cin, kh, kw = block
        taps = "all kh x kw taps" if (kh, kw) != (1, 1) else "one tap"
        return f"{out} out x {cin} in channels, {taps}"
    return f"{block[0]} out x {block[1]} in"


def layer_rows(states: list[LayerState]) -> list[dict[str, Any]]:
    rows = []
    for st in states:
        sel = st.selection
        dense_bytes = 4 * math.prod(st.info.weight_shape)
        rows.append(
            {
                "name": st.info.name,
                "shape": list(st.info.weight_shape),
                "pattern": pattern_words(sel.block) if sel is not None else "dense",
                "sparsity": round(sel.sparsity, 4) if sel is not None else 0.0,
                "dense_bytes": dense_bytes,
                "packed_bytes": st.layout.nbytes if st.layout is not None else None,
                "layout": st.layout.format if st.layout is not None else None,
                "kernel": st.compiled.kernel if st.compiled is not None else "masked-dense",
                "reason": st.compiled.reason if st.compiled is not None else "",
            }
        )
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
