"""GPU benchmark of the triton-block kernels -> benches/results/triton.md (kernels.md 3.1 shapes, 3.2 protocol).

On a CUDA machine (H100/H200), from the repository root::

    python benches/bench_triton.py                         # ViT-B MLP + ResNet-50 convs, batch 256, s = .5/.75/.9
    python benches/bench_triton.py --layers vit --dtypes fp32-ieee,fp32-tf32,bf16
    python benches/bench_triton.py --layers r50-l3,r50-l4 --bsr-tune none     # a subset; rows merge into the JSON

Every timing is ``triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")`` (flushes L2 between
repetitions). Baselines: (a) dense cuBLAS ``F.linear`` / cuDNN ``F.conv2d`` (``cudnn.benchmark = True``) with TF32
off (``fp32_precision = "ieee"``) for the IEEE rows and on (``"tf32"``) for the TF32 rows; (b) PyTorch's Triton
BSR kernel ``torch.sparse._triton_ops.bsr_dense_addmm`` on the same blocks (square b x b only; it needs blocks
>= 16, so 1xN rows have no such baseline), tuned for this device with ``tune_bsr_dense_addmm(..., store=True)``
(the shipped tuning table covers only A100), dense operand column-major; for convs on the explicit im2col GEMM,
im2col excluded from its time. PyTorch BSR accumulates fp32 in fp64 with TF32 off, so it is reported only in
IEEE-fp32 and bf16 rows. Rows accumulate in ``triton.json`` (keyed by layer, pattern, sparsity, dtype) so the
sweep can run in several calls; ``triton.md`` is rewritten from all rows, with the device name.

Without a GPU: a plain run prints why and exits 0; ``--smoke`` runs tiny shapes on the Triton CPU interpreter
(``TRITON_INTERPRET=1``) with wall-clock medians, to exercise this script only (those times mean nothing).
Under pytest, ``test_bench_gpu`` is skipped without CUDA and ``test_bench_smoke`` runs the smoke mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 256
SPARSITIES = (0.5, 0.75, 0.9)
VIT_TOKENS = 197

# kernels.md 3.1: ViT-B/16 MLP and the steady-state ResNet-50 bottleneck convs (224^2 input).
LAYERS: dict[str, dict[str, Any]] = {
    "vit-fc1": dict(kind="linear", out=3072, inp=768, tokens=VIT_TOKENS),
    "vit-fc2": dict(kind="linear", out=768, inp=3072, tokens=VIT_TOKENS),
    "r50-l1a": dict(kind="conv2d", out=64, inp=256, k=1, hw=56),
    "r50-l1b": dict(kind="conv2d", out=64, inp=64, k=3, hw=56),
    "r50-l1c": dict(kind="conv2d", out=256, inp=64, k=1, hw=56),
    "r50-l2a": dict(kind="conv2d", out=128, inp=512, k=1, hw=28),
    "r50-l2b": dict(kind="conv2d", out=128, inp=128, k=3, hw=28),
    "r50-l2c": dict(kind="conv2d", out=512, inp=128, k=1, hw=28),
    "r50-l3a": dict(kind="conv2d", out=256, inp=1024, k=1, hw=14),
    "r50-l3b": dict(kind="conv2d", out=256, inp=256, k=3, hw=14),
    "r50-l3c": dict(kind="conv2d", out=1024, inp=256, k=1, hw=14),
    "r50-l4a": dict(kind="conv2d", out=512, inp=2048, k=1, hw=7),
    "r50-l4b": dict(kind="conv2d", out=512, inp=512, k=3, hw=7),
    "r50-l4c": dict(kind="conv2d", out=2048, inp=512, k=1, hw=7),
}
SMOKE_LAYERS: dict[str, dict[str, Any]] = {
    "smoke-fc": dict(kind="linear", out=64, inp=128, tokens=5),
    "smoke-conv": dict(kind="conv2d", out=64, inp=32, k=3, hw=5),
}
# pattern -> (rows, in-channels per block, uniform rows): 1xN = SUBP-uniform rows, b x b = layer-global blocks
PATTERNS: dict[str, tuple[int, int, bool]] = {
    "1x16": (16, 1, True),
    "1x32": (32, 1, True),
    "16x16": (16, 16, False),
    "32x32": (32, 32, False),
    "64x64": (64, 64, False),
}
DTYPES = {"fp32-ieee": (torch.float32, "ieee"), "fp32-tf32": (torch.float32, "tf32"), "bf16": (torch.bfloat16, "ieee")}


def set_dense_precision(mode: str) -> None:
    """TF32 for cuBLAS matmul and cuDNN conv, through the fp32_precision API only (mixing APIs is an error)."""
    p = "tf32" if mode == "fp32-tf32" else "ieee"
    torch.backends.cuda.matmul.fp32_precision = p
    torch.backends.cudnn.conv.fp32_precision = p


def time_ms(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def layer_info(name: str, spec: dict[str, Any]):  # noqa: ANN201
    from prunekit.records import LayerInfo

    if spec["kind"] == "linear":
        return LayerInfo(name, "linear", (spec["out"], spec["inp"]))
    k = spec["k"]
    return LayerInfo(name, "conv2d", (spec["out"], spec["inp"], k, k), padding=(k // 2, k // 2))


def torch_bsr(
    wm2: torch.Tensor, b: int, dense_kp: torch.Tensor, tune: bool
) -> tuple[Callable[[], torch.Tensor], str]:
    """PyTorch's Triton BSR @ dense on the same b x b blocks, meta-parameters tuned for this device."""
    from torch.sparse._triton_ops import bsr_dense_addmm

    bsr = wm2.to_sparse_bsr((b, b))
    out = dense_kp.new_empty(wm2.shape[0], dense_kp.shape[1])
    meta = None
    how = "torch defaults"
    if tune:
        from torch.sparse._triton_ops_meta import tune_bsr_dense_addmm

        meta = tune_bsr_dense_addmm(out, bsr, dense_kp, beta=0, alpha=1, out=out, store=True)
        how = "tuned " + ",".join(f"{k}={v}" for k, v in sorted(meta.items()))
    return (lambda: bsr_dense_addmm(out, bsr, dense_kp, beta=0, alpha=1, out=out, meta=meta)), how


def measure(
    name: str, spec: dict[str, Any], pattern: str, sparsity: float, dtype_name: str, batch: int, bsr_tune: str,
    dense_cache: dict[tuple[str, str], float],
) -> dict[str, Any]:  # fmt: skip
    from prunekit_triton.build import TritonBlockKernel
    from prunekit_triton.layout import pack
    from prunekit_triton.synthetic import random_block_selection

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, prec = DTYPES[dtype_name]
    rows, cols, uniform = PATTERNS[pattern]
    layer = layer_info(name, spec)
    block = (rows, cols) if layer.kind == "linear" else (rows, cols, 0, 0)
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}|{pattern}|{sparsity}".encode()))  # same masks every run
    sel = random_block_selection(layer, block, sparsity, uniform=uniform, permute=False, generator=g)
    w = (torch.randn(layer.weight_shape, generator=g) / spec["inp"] ** 0.5).to(dev, dtype)
    wm = w * sel.mask.to(dev)
    lay = pack(layer, wm, sel)
    mod = TritonBlockKernel().prunekit_build_kernel(
        layer=layer, layout=lay, bias=None, params=TritonBlockKernel.Params(precision=prec)
    ).module
    m, k = layer.gemm_shape
    if layer.kind == "linear":
        p = batch * spec["tokens"]
        x = torch.randn(p, spec["inp"], device=dev, dtype=dtype)

        def dense() -> object:
            return F.linear(x, wm)
    else:
        hw = spec["hw"]
        p = batch * hw * hw
        x = torch.randn(batch, spec["inp"], hw, hw, device=dev, dtype=dtype)
        pad = spec["k"] // 2

        def dense() -> object:
            return F.conv2d(x, wm, None, 1, pad)

    set_dense_precision(dtype_name)
    with torch.inference_mode():
        y = mod(x)  # first call: autotune (cached per shape key) and compile
        ref = dense()
        err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
        t_sparse = time_ms(lambda: mod(x))
        key = (name, dtype_name)
        if key not in dense_cache:
            dense_cache[key] = time_ms(dense)
        t_dense = dense_cache[key]
        t_bsr, bsr_err, bsr_how = None, None, "n/a (blocks < 16 wide: not BSR-expressible)" if cols == 1 else "n/a"
        if cols > 1 and dtype_name != "fp32-tf32" and dev == "cuda":
            wm2 = wm.reshape(m, k)
            if layer.kind == "linear":
                dense_kp = x.t()  # column-major [K, P] operand
            else:  # explicit im2col GEMM; its construction is not timed
                cols_ = F.unfold(x, spec["k"], padding=spec["k"] // 2)
                dense_kp = cols_.permute(1, 0, 2).reshape(k, p).t().contiguous().t()
            try:
                fn, bsr_how = torch_bsr(wm2, rows, dense_kp, bsr_tune == "torch")
                ref_mp = ref.t() if layer.kind == "linear" else ref.transpose(0, 1).reshape(m, p)
                out = fn().float()
                bsr_err = ((out - ref_mp.float()).abs().max() / ref_mp.float().abs().max().clamp_min(1e-30)).item()
                t_bsr = time_ms(fn)
            except Exception as exc:  # report, do not abort the sweep
                bsr_how = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
        elif dtype_name == "fp32-tf32" and cols > 1:
            bsr_how = "n/a (PyTorch BSR fp32 is IEEE with fp64 accumulation)"
    s_real = 1.0 - float(sel.mask.float().mean())
    flops = 2.0 * m * k * p
    return {
        "layer": name, "kind": layer.kind, "M": m, "K": k, "P": p, "batch": batch, "pattern": pattern,
        "uniform": uniform, "sparsity": sparsity, "sparsity_real": round(s_real, 4), "dtype": dtype_name,
        "t_dense_ms": t_dense, "t_sparse_ms": t_sparse, "speedup": t_dense / t_sparse,
        "frac_ideal": t_dense / t_sparse * (1.0 - s_real),
        "useful_TFLOPs": flops * (1.0 - s_real) / (t_sparse * 1e-3) / 1e12,
        "dense_TFLOPs": flops / (t_dense * 1e-3) / 1e12,
        "t_torch_bsr_ms": t_bsr, "torch_bsr_meta": bsr_how,
        "speedup_vs_torch_bsr": (t_bsr / t_sparse) if t_bsr else None,
        "chunk": lay.meta["bk"], "max_rel_err": err, "torch_bsr_err": bsr_err,
    }  # fmt: skip


def device_facts() -> dict[str, str]:
    import triton

    facts = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name()
        facts["cuda"] = str(torch.version.cuda)
        try:
            import subprocess

            facts["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            facts["driver"] = "?"
    else:
        facts["device"] = f"CPU ({platform.processor() or platform.machine()}), Triton interpreter: times are meaningless"
    return facts


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _sp(r: dict[str, Any]) -> str:
    """Requested sparsity, with the achieved one when whole blocks made it differ."""
    real = r["sparsity_real"]
    return f"{r['sparsity']:g}" if abs(real - r["sparsity"]) < 5e-4 else f"{r['sparsity']:g} ({real:.3f})"


def write_markdown(path: Path, rows: list[dict[str, Any]], facts: dict[str, str], command: str) -> None:
    lines = [
        "# triton-block GPU benchmark",
        "",
        f"Device: **{facts.get('device')}**; driver {facts.get('driver', '?')}, CUDA {facts.get('cuda', '?')}, "
        f"torch {facts['torch']}, triton {facts['triton']}. Produced by `{command}`.",
        "",
        "Protocol (kernels.md 3.2): `triton.testing.do_bench(warmup=25, rep=100, return_mode=\"median\")`, batch "
        f"{rows[0]['batch'] if rows else BATCH}, bias off, random block masks (1xN: SUBP-uniform rows; b x b: "
        "layer-global), no permutations. Dense = cuBLAS F.linear / cuDNN F.conv2d (cudnn.benchmark) with TF32 off for "
        "fp32-ieee rows and on for fp32-tf32 rows; bf16 rows bf16 on both sides. Sparse = triton-block, autotuned per "
        "shape (first call, not timed). speedup = t_dense / t_sparse; frac_ideal = speedup x (1 - s). PyTorch BSR = "
        "`bsr_dense_addmm` on the same blocks (convs: on the im2col GEMM, im2col not timed).",
        "",
        "| layer | M | K | P | pattern | s | dtype | dense ms | sparse ms | speed-up | frac ideal | useful TFLOP/s "
        "| torch BSR ms | vs torch BSR | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["layer"], r["pattern"], r["dtype"], r["sparsity"])):
        lines.append(
            f"| {r['layer']} | {r['M']} | {r['K']} | {r['P']} | {r['pattern']} | {_sp(r)} | {r['dtype']} "
            f"| {_fmt(r['t_dense_ms'])} | {_fmt(r['t_sparse_ms'])} | {_fmt(r['speedup'], '.2f')}x "
            f"| {_fmt(r['frac_ideal'], '.2f')} | {_fmt(r['useful_TFLOPs'], '.1f')} | {_fmt(r['t_torch_bsr_ms'])} "
            f"| {_fmt(r['speedup_vs_torch_bsr'], '.2f')} | {r['max_rel_err']:.1e} |"
        )
    metas = sorted({f"{r['layer']}/{r['pattern']}/{r['dtype']}/s{r['sparsity']}: {r['torch_bsr_meta']}" for r in rows if r["t_torch_bsr_ms"]})
    if metas:
        lines += ["", "PyTorch BSR meta-parameters used:", ""] + [f"- {m}" for m in metas]
    path.write_text("\n".join(lines) + "\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="vit,r50", help="comma list of layer ids or prefixes (vit, r50, r50-l3, vit-fc1)")
    ap.add_argument("--patterns", default="1x32,32x32", help=f"comma list of {', '.join(PATTERNS)}")
    ap.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    ap.add_argument("--dtypes", default="fp32-ieee,fp32-tf32", help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--bsr-tune", choices=("torch", "none"), default="torch", help="tune PyTorch BSR for this device")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for triton.md and triton.json")
    ap.add_argument("--fresh", action="store_true", help="drop earlier rows of triton.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (exercise only)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("bench_triton: no CUDA device here; nothing measured (use --smoke to exercise the script on the CPU interpreter)")
        return 0
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    catalogue = SMOKE_LAYERS if args.smoke else LAYERS
    wanted = [w.strip() for w in args.layers.split(",") if w.strip()]
    names = [n for n in catalogue if args.smoke or any(n == w or n.startswith(w) for w in wanted)]
    batch = 2 if args.smoke else args.batch
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "triton.json"
    rows: dict[str, dict[str, Any]] = {}
    if store.exists() and not args.fresh:
        rows = {r["key"]: r for r in json.loads(store.read_text())["rows"]}
    facts = device_facts()
    dense_cache: dict[tuple[str, str], float] = {}
    for name in names:
        for pattern in args.patterns.split(","):
            for dtype_name in args.dtypes.split(","):
                for s in (float(v) for v in args.sparsities.split(",")):
                    r = measure(name, catalogue[name], pattern, s, dtype_name, batch, args.bsr_tune, dense_cache)
                    r["key"] = f"{name}|{pattern}|{dtype_name}|{s}|{batch}"
                    r["device"] = facts["device"]
                    rows[r["key"]] = r
                    print(
                        f"{name:9s} {pattern:6s} {dtype_name:9s} s={r['sparsity_real']:.3f} dense {r['t_dense_ms']:.3f} ms "
                        f"sparse {r['t_sparse_ms']:.3f} ms x{r['speedup']:.2f} bsr {_fmt(r['t_torch_bsr_ms'])} "
                        f"err {r['max_rel_err']:.1e}",
                        flush=True,
                    )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    kept = [r for r in rows.values() if r["device"] == facts["device"]]  # never mix devices in one table
    store.write_text(json.dumps({"facts": facts, "rows": kept}, indent=1))
    command = "python benches/bench_triton.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_markdown(out_dir / "triton.md", kept, facts, command.strip())
    print(f"wrote {out_dir / 'triton.md'} ({len(kept)} rows, {facts['device']})")
    return 0


def test_bench_gpu(tmp_path: Path) -> None:
    """The real sweep on one small subset (skipped without CUDA)."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the triton-block GPU benchmark needs an H100/H200-class GPU")
    assert main(["--layers", "vit-fc1", "--patterns", "32x32", "--sparsities", "0.9", "--out", str(tmp_path)]) == 0
    assert "vit-fc1" in (tmp_path / "triton.md").read_text()


def test_bench_smoke(tmp_path: Path) -> None:
    """The script's code path on the CPU interpreter (tiny shapes, no meaningful time)."""
    import pytest

    if torch.cuda.is_available():
        pytest.skip("CUDA present: test_bench_gpu covers the script")
    assert main(["--smoke", "--patterns", "1x32,32x32", "--sparsities", "0.5", "--dtypes", "fp32-ieee", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "triton.md").read_text()
    assert "smoke-conv" in text and "smoke-fc" in text and "interpreter" in text
    rows = json.loads((tmp_path / "triton.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["max_rel_err"] <= 1e-5 for r in rows)


if __name__ == "__main__":
    sys.exit(main())
