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


def _onnx_graph(reference: nn.Module, x: torch.Tensor, tmp: Path) -> Path:
    """``reference`` as ONNX, its weights in one external file written tensor by tensor from the model's
    own storage: the exporter's in-memory copies of the weights (constant folding, the protobuf, about 3.5x
    the weights at its peak) are never made, which keeps ``prunekit bench`` within its memory bound."""
    import numpy as np
    import onnx
    from onnx.helper import np_dtype_to_tensor_dtype

    from prunekit.export import _torch_onnx_export

    graph = tmp / "graph.onnx"
    _torch_onnx_export(reference, x, str(graph), 17, graph, export_params=False)
    proto = onnx.load(str(graph))
    tensors = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    inputs = [i for i in proto.graph.input if i.name in tensors]
    with open(tmp / "weights.bin", "wb") as f:
        for inp in inputs:
            t = tensors[inp.name].detach().cpu().contiguous()
            arr = t.numpy()
            f.seek(-f.tell() % 4096, 1)  # page-aligned: onnxruntime may map the file instead of reading it
            init = onnx.TensorProto(name=inp.name, data_type=np_dtype_to_tensor_dtype(np.dtype(arr.dtype)), dims=arr.shape,
                                    data_location=onnx.TensorProto.EXTERNAL)  # fmt: skip
            for k, v in (("location", "weights.bin"), ("offset", str(f.tell())), ("length", str(arr.nbytes))):
                init.external_data.add(key=k, value=v)
            f.write(memoryview(arr).cast("B") if arr.nbytes else b"")
            proto.graph.initializer.append(init)
    for inp in inputs:  # initializers now, not inputs: onnxruntime folds and prepacks them like an export's
        proto.graph.input.remove(inp)
    unfed = [i.name for i in proto.graph.input if i.name != "input"]
    if unfed:  # a tensor the exporter named after no parameter or buffer: the session could not run
        raise PrunekitError(f"the ONNX graph takes {unfed[0]!r}, no parameter or buffer of the model")
    path = tmp / "dense.onnx"
    onnx.save(proto, str(path))
    return path


def _onnxruntime(reference: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = _onnx_graph(reference, x, Path(tmp))
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
