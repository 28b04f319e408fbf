"""Checking a compiled model against the masked dense model it replaces, layer by layer.

The masked dense model's per-layer inputs and outputs are captured in one pass *before* compiling, so no
reference copy of the model is needed; after compiling, each kernel module runs on its captured input
and is compared with the captured output.
"""

from __future__ import annotations

import copy

import attrs
import torch
from torch import nn

from prunekit.errors import KernelMismatchError


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy whose parameters and buffers *are* the model's tensors (no second copy of the
    weights): after compile() replaces the model's layers, the copy still holds the dense ones."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: error relative to the output's scale (inf when shapes differ or NaN)."""
    if out.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    scale = float(ref.abs().max())
    err = float((out.to(ref.dtype) - ref).abs().max()) / (scale if scale > 0 else 1.0)
    return err if err == err else float("inf")  # NaN compares unequal: report it as infinitely wrong


@attrs.frozen
class LayerIO:
    inp: torch.Tensor
    out: torch.Tensor


def capture_io(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, LayerIO]]:
    """Run ``x`` once (inference mode) and keep every named layer's first input and output."""
    got: dict[str, LayerIO] = {}
    handles = []

    def hook(name: str):  # noqa: ANN202
        def fn(_m: nn.Module, args: tuple, y: torch.Tensor) -> None:
            if name not in got:
                got[name] = LayerIO(args[0].detach().clone(), y.detach().clone())

        return fn

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, got


def layer_errors(model: nn.Module, captured: dict[str, LayerIO]) -> dict[str, float]:
    """Relative error of each (now compiled) layer on its captured input."""
    errs = {}
    with torch.inference_mode():
        for name, io in captured.items():
            errs[name] = max_rel_err(model.get_submodule(name)(io.inp), io.out)
    return errs


def check_tolerance(what: str, model_err: float, errs: dict[str, float], kernels: dict[str, str], tolerance: float) -> None:
    """Raise KernelMismatchError (one line, naming the worst layer) when an error exceeds ``tolerance``."""
    worst = max(errs, key=lambda n: errs[n]) if errs else None
    if model_err <= tolerance and (worst is None or errs[worst] <= tolerance):
        return
    layer = ""
    if worst is not None:
        layer = f"; worst layer {worst} (kernel {kernels.get(worst, '?')}): rel err {errs[worst]:.2e}"
    raise KernelMismatchError(
        f"{what}: the compiled model differs from the masked dense model: max rel err {model_err:.2e} > "
        f"tolerance {tolerance:.0e}{layer}; the kernel component is wrong for this layer: fix it, or set "
        "tolerance in the pipeline's params if this precision is intended"
    )
