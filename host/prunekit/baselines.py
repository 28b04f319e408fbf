"""Dense baselines: what users run instead of prunekit, timed in the same interleaved run.

Speed is judged against the fastest dense runtime on the same machine, not only PyTorch eager. Each
baseline runs the *same masked dense model* (pruned weights as zeros), with the same thread count, and is
checked against eager before it is timed:

* ``eager``: PyTorch eager (always);
* ``onnxruntime``: the model exported to ONNX and run by ONNX Runtime's CPU execution provider
  (``intra_op_num_threads`` = threads), when onnxruntime is installed (the host's ``runtimes`` extra);
* ``torch.compile``: inductor with freezing (``torch.compile`` of the frozen eval model); only when asked,
  because compiling takes a minute or more for a ResNet-50.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.verify import max_rel_err

KNOWN = ("eager", "onnxruntime", "torch.compile")
DEFAULT = ("eager", "onnxruntime")
TOLERANCE = 1e-4


@attrs.frozen
class Baseline:
    name: str
    run: Callable[[], Any]
    max_rel_err: float
    note: str = ""


def parse(names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"eager,onnxruntime"`` or a list -> validated names (``eager`` is always included)."""
    if names is None:
        return DEFAULT
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise PrunekitError(f"unknown dense baseline(s) {', '.join(unknown)}; choose from {', '.join(KNOWN)}")
    return tuple(dict.fromkeys(["eager", *names]))


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _onnxruntime(reference: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    import onnxruntime as ort

    from prunekit.export import _torch_onnx_export

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dense.onnx"
        _torch_onnx_export(reference, x, str(path), 17, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    return lambda: sess.run(None, feed)[0]


def _compiled(reference: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    import torch._inductor.config as inductor_config

    fn = torch.compile(reference, dynamic=False)
    # compile now (the first call), in the grad mode the timing uses, with weights frozen into the graph
    with inductor_config.patch(freezing=True), torch.inference_mode():
        fn(x)
    return lambda: fn(x)


def build(names: tuple[str, ...], reference: nn.Module, x: torch.Tensor, threads: int, log: Callable[[str], None] = print) -> dict[str, Baseline]:
    """The requested baselines that can run here, each checked against eager on ``x`` (a baseline that is
    unavailable or wrong is left out with a log line, never timed)."""
    with torch.inference_mode():
        ref = reference(x)
    out = {"eager": Baseline("eager", lambda: reference(x), 0.0)}
    for name in names:
        if name == "eager":
            continue
        if name == "onnxruntime" and not onnxruntime_available():
            log("baseline onnxruntime skipped: not installed (pip install onnxruntime onnx; the 'runtimes' extra)")
            continue
        try:
            run = _onnxruntime(reference, x, threads) if name == "onnxruntime" else _compiled(reference, x)
            with torch.inference_mode():
                got = torch.as_tensor(run())
        except PrunekitError as exc:
            log(f"baseline {name} skipped: {exc}")
            continue
        except Exception as exc:  # a runtime that cannot take this model is reported, not fatal
            log(f"baseline {name} skipped: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        err = max_rel_err(got, ref)
        if not err <= TOLERANCE:
            log(f"baseline {name} skipped: its output differs from eager by {err:.2e} (> {TOLERANCE:g})")
            continue
        out[name] = Baseline(name, run, err)
    return out
