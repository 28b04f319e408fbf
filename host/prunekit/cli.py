"""The `prunekit` command: plugins, pipelines, run, bench, export."""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
import warnings
from typing import Any, NoReturn

from prunekit.errors import PrunekitError
from prunekit.hookspecs import STAGES
from prunekit.plugins import ComponentInfo, installed_components, params_fields
from prunekit.registry import load_registry
from prunekit.report import format_table


def _component_row(c: ComponentInfo) -> dict[str, Any]:
    row: dict[str, Any] = {"stage": c.stage, "name": c.name, "distribution": c.distribution, "version": c.version,
                           "target": c.target, "conflicts": list(c.conflicts)}  # fmt: skip
    try:
        cls = c.load()
    except Exception as exc:  # a broken plugin is listed, not fatal to the listing
        return {**row, "summary": f"(fails to load: {type(exc).__name__}: {exc})", "params": [], "needs": []}
    doc = (cls.__doc__ or "").strip().splitlines()
    needs = getattr(cls, "needs", ())
    return {**row, "summary": doc[0] if doc else "", "params": params_fields(cls),
            "needs": "per params" if callable(needs) else sorted(needs or ())}  # fmt: skip


def cmd_plugins(args: argparse.Namespace) -> int:
    comps = sorted(installed_components().values(), key=lambda c: (STAGES.index(c.stage), c.name))
    rows = [_component_row(c) for c in comps]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for stage in STAGES:
        if not any(r["stage"] == stage for r in rows):
            rows.append({"stage": stage, "name": "(none installed)", "params": []})
    rows.sort(key=lambda r: (STAGES.index(r["stage"]), r["name"]))
    for r in rows:
        if r.get("conflicts"):
            r["distribution"] = f"{r['distribution']} CONFLICT with {', '.join(r['conflicts'])}"
        r["params_text"] = ", ".join(f"{p['name']}: {p['type']} = {p['default']!r}" for p in r["params"]) or "-"
    print(format_table(rows, [("stage", "stage"), ("name", "component"), ("distribution", "distribution"), ("version", "version"),
                              ("summary", "summary"), ("params_text", "params (registry keys: type = default)")]))  # fmt: skip
    return 0


def pipeline_status(reg: Any) -> list[dict[str, Any]]:
    found = installed_components()
    rows = []
    for name, spec in reg.pipelines.items():
        missing = []
        for stage in STAGES:
            comp = spec.component(stage)
            if comp is None:
                continue
            if (stage, comp) in found:
                info = found[(stage, comp)]
                if info.conflicts:
                    missing.append({"stage": stage, "component": comp, "distribution": None,
                                    "install": f"conflict: provided by {', '.join((info.distribution, *info.conflicts))}; uninstall all but one"})  # fmt: skip
                continue
            prov = reg.provider(stage, comp)
            missing.append(
                {"stage": stage, "component": comp, "distribution": prov[0] if prov else None, "install": reg.install_hint(prov[0]) if prov else None}
            )
        rows.append(
            {
                "name": name,
                "default": name == reg.default,
                "ready": not missing,
                "components": {s: spec.component(s) for s in STAGES if spec.component(s)},
                "missing": missing,
                "description": spec.description,
            }
        )
    return rows


def cmd_pipelines(args: argparse.Namespace) -> int:
    reg = load_registry(args.registry)
    rows = pipeline_status(reg)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = []
    for r in rows:
        if r["ready"]:
            status = "ready"
        else:
            by_dist: dict[str, list[str]] = {}
            for m in r["missing"]:
                key = f"{m['distribution']}: {m['install']}" if m["distribution"] else (m["install"] or "no known provider")
                by_dist.setdefault(key, []).append(f"{m['stage']}.{m['component']}")
            status = "NOT READY, install " + "; ".join(f"{k} (for {', '.join(v)})" for k, v in by_dist.items())
        table.append({"name": r["name"] + (" (default)" if r["default"] else ""), "stages": " > ".join(r["components"].values()), "status": status})
    print(format_table(table, [("name", "pipeline"), ("stages", "schedule > score > select [> layout > kernel]"), ("status", "status")]))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from prunekit.pipeline import Pipeline
    from prunekit.runjob import run_job

    pipe = Pipeline.load(args.pipeline, args.registry)
    progress = not args.no_progress and sys.stderr.isatty()
    report = run_job(
        pipe,
        model_name=args.model,
        data=args.data,
        epochs=args.epochs,
        threads=args.threads,
        out=args.out,
        dense_path=args.dense,
        resume=args.resume,
        progress=progress,
        latency_batch=args.batch,
        log=lambda m: print(m, file=sys.stderr),
    )
    if report.get("rank", 0):  # another torchrun process: rank 0 prints the table
        return 0
    print(
        format_table(
            report["layers"],
            [("name", "layer"), ("shape", "shape"), ("pattern", "pattern"), ("sparsity", "sparsity"),
             ("requested_sparsity", "requested"), ("dense_bytes", "dense B"),
             ("packed_bytes", "packed B"), ("kernel", "kernel"), ("reason", "why dense")],
        )
    )
    line = (
        f"\n{report['pipeline']} on {report['model']}/{report['data']}: dense {report['dense_accuracy']:.2f}% -> "
        f"pruned {report['pruned_accuracy']:.2f}% at sparsity {report['sparsity']:.4f} (requested {report['requested_sparsity']:.4f})"
    )
    if "speedup" in report:
        line += (
            f"; latency batch {report['latency_batch']}, {report['threads']} threads: dense {report['dense_latency_ms']:.3f} ms, "
            f"sparse {report['sparse_latency_ms']:.3f} ms ({report['speedup']:.2f}x)"
        )
    print(line + f"\nreport: {args.out}/report.json")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from prunekit.bench import run_bench
    from prunekit.pipeline import Pipeline

    pipe = Pipeline.load(args.pipeline, args.registry)
    res = run_bench(pipe, args.model or pipe.host.model, args.batch, args.threads, args.sparsity, args.repeats,
                    layers=not args.no_layers, dense_runtimes=args.baselines, progress=sys.stderr.isatty(),
                    log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(
        format_table(
            res["layers"],
            [("name", "layer"), ("shape", "shape"), ("sparsity", "sparsity"), ("kernel", "kernel"), ("dense_ms", "dense ms"),
             ("sparse_ms", "sparse ms"), ("speedup", "speedup"), ("max_rel_err", "max rel err"), ("reason", "why dense")],
        )
    )
    others = ", ".join(f"{k} {v:.3f} ms" for k, v in res["baselines"].items() if k != "eager")
    print(
        f"\n{res['pipeline']} {res['model']} batch {res['batch']} threads {res['threads']} sparsity {res['achieved_sparsity']:.4f} "
        f"(requested {res['sparsity']:.4f}) "
        f"on {res['cpu']} ({res['isa']}): sparse {res['model_sparse_ms']:.3f} ms; "
        f"{res['speedup_vs_best_dense']:.2f}x vs the fastest dense runtime ({res['best_dense']}), "
        f"{res['speedup']:.2f}x vs PyTorch eager ({res['model_dense_ms']:.3f} ms){'; ' + others if others else ''}; "
        f"max rel err {res['max_rel_err']:.2e}, select {res['select_s']:.2f} s"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from prunekit.export import export_run

    res = export_run(args.run_dir, out=args.out, onnx=args.onnx, registry=args.registry)
    ex = res.exported
    counts: dict[str, int] = {}
    for kernel in ex.kernels.values():
        counts[kernel] = counts.get(kernel, 0) + 1
    kernels = ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "none (masked dense)"
    print(f"compiled {len(ex.kernels)} layers ({kernels}): max rel err {res.compiled_rel_err:.2e} against the masked dense model")
    print(f"wrote {ex.path} ({ex.nbytes / 1e6:.2f} MB); reloaded into a fresh {ex.manifest['model']['factory']}: "
          f"max rel err {res.reload_rel_err:.2e}")  # fmt: skip
    if res.onnx is not None:
        o = res.onnx
        print(f"wrote {o.path} (masked dense, opset {o.opset}, dynamic batch): onnxruntime vs PyTorch at batch {o.batch}: "
              f"max rel err {o.max_rel_err:.2e}")  # fmt: skip
    m = ex.manifest["model"]
    print(f"load it: prunekit.load_compiled(prunekit.models.build_model({m['factory']!r}, {m['num_classes']}), {str(ex.path)!r})")
    return 0


TRACEBACK_ENV = "PRUNEKIT_TRACEBACK"  # set: an unexpected exception shows its traceback


def one_line(text: str) -> str:
    """``text`` as one printable line: control characters and line or paragraph separators that came from
    the user's input (a key, a component name, a path) are written as escapes (``\\n``, ``\\x0c``, ``\\u2028``)."""
    out = []
    for ch in str(text).strip():
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            out.append(repr(ch)[1:-1] if ch.isascii() or ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``prunekit: error: ...`` (exit status 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"prunekit: error: {one_line(message)}; see prunekit {self.prog.split(' ', 1)[-1]} --help\n")


def _bounded(kind: type, low: float, what: str, upper: float | None = None, most: int | None = None):  # noqa: ANN202
    """``kind`` in ``[low, upper)`` (or ``[low, most]``): an out-of-range number is a usage error, not a hang
    (100000 threads) or a run of 10**30 epochs."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (value >= low) or (upper is not None and not value < upper) or (most is not None and value > most):
            bound = f"in [{low}, {upper})" if upper is not None else f">= {low}" + (f" and <= {most}" if most else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bound}")
        return value

    return parse


MAX_THREADS = max(256, 8 * (os.cpu_count() or 1))  # more spawns a pool the machine cannot run (torch hangs)
POSITIVE = _bounded(int, 1, "an integer")
NONNEG = _bounded(int, 0, "an integer")
SPARSITY = _bounded(float, 0.0, "a number", 1.0)
EPOCHS = _bounded(int, 1, "an integer", most=100_000)
THREADS = _bounded(int, 1, "an integer", most=MAX_THREADS)
BATCH = _bounded(int, 1, "an integer", most=4096)
REPEATS = _bounded(int, 1, "an integer", most=100_000)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prunekit", description="Prune networks into hardware-friendly patterns and run them on sparse kernels.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    sp = sub.add_parser("plugins", help="list installed components by stage")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_plugins)

    sp = sub.add_parser("pipelines", help="list the registry's pipelines, ready or what to install")
    sp.add_argument("--registry", default=None, help="registry file (default: $PRUNEKIT_REGISTRY or ./registry.toml)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_pipelines)

    sp = sub.add_parser("run", help="train (or load) dense, prune and fine-tune, evaluate, compile, report")
    sp.add_argument("pipeline", nargs="?", default=None, help="pipeline name (default: the registry's default)")
    sp.add_argument("--registry", default=None)
    sp.add_argument("--model", default=None, help="model name (default: the pipeline's 'model' param)")
    sp.add_argument("--data", default="digits", help="'digits' (built in) or an ImageFolder directory with train/ and val/")
    sp.add_argument("--epochs", type=EPOCHS, default=None, help="fine-tuning epochs (default: the pipeline's)")
    sp.add_argument("--threads", type=THREADS, default=None)
    sp.add_argument("--batch", type=BATCH, default=1, help="batch size for the latency measurement")
    sp.add_argument("--out", default="runs/latest", help="output directory (report.json, state.pt, pruned.pt)")
    sp.add_argument("--dense", default=None, help="trained dense weights (state_dict file) instead of training")
    sp.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("bench", help="time a pipeline's compiled kernels against dense, layer by layer")
    sp.add_argument("pipeline", nargs="?", default=None)
    sp.add_argument("--registry", default=None)
    sp.add_argument("--model", default=None)
    sp.add_argument("--batch", type=BATCH, default=1)
    sp.add_argument("--threads", type=THREADS, default=1)
    sp.add_argument("--sparsity", type=SPARSITY, default=None, help="fraction of weights removed (default: the pipeline's sparsity)")
    sp.add_argument("--repeats", type=REPEATS, default=20)
    sp.add_argument("--no-layers", action="store_true", help="time only the whole model")
    sp.add_argument("--baselines", default=None, metavar="LIST",
                    help="dense runtimes timed beside eager, comma-separated: onnxruntime (default when installed), torch.compile")  # fmt: skip
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("export", help="write a run's compiled model as one safetensors file (and the masked dense model as ONNX)")
    sp.add_argument("run_dir", help="a directory `prunekit run --out DIR` wrote (report.json, state.pt, pruned.pt)")
    sp.add_argument("--out", default=None, help="artifact file (default: RUN_DIR/compiled.safetensors)")
    sp.add_argument("--onnx", default=None, metavar="FILE", help="also export the masked dense model to ONNX, checked in onnxruntime")
    sp.add_argument("--registry", default=None)
    sp.set_defaults(func=cmd_export)
    return p


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:  # fmt: skip
    """A warning as one line ``prunekit: warning: ...`` (a component's SparsityShortfall, a skipped plot)."""
    print(f"prunekit: warning: {one_line(str(message))}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no arguments: the main job on the default pipeline
        args = parser.parse_args(["run", *(argv or [])])
    try:
        return args.func(args)
    except PrunekitError as exc:
        print(f"prunekit: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the machine's refusal (a full disk, permissions, a bad image file): one line
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"prunekit: error: {one_line(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return 2
    except MemoryError:
        print("prunekit: error: out of memory; use a smaller --batch or model, or a machine with more memory", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input: one line to the user, the traceback on request
        if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
            print(f"prunekit: error: out of memory ({one_line(str(exc))[:160]}); use a smaller --batch or model",
                  file=sys.stderr)  # fmt: skip
            return 2
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"prunekit: internal error: {type(exc).__name__}: {one_line(str(exc))[:300]}; this is a bug in prunekit "
              f"or a plugin: rerun with {TRACEBACK_ENV}=1 for the traceback and report it", file=sys.stderr)  # fmt: skip
        return 70


if __name__ == "__main__":
    sys.exit(main())
