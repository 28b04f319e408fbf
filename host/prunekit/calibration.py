"""Calibration: data-derived layer statistics for components that declare ``needs``.

A component (any stage) may declare ``needs = {"activations"}`` or ``{"activations", "grads"}``. Before a
mask update the host then runs the calibration batches through the model once, collects a
``LayerStats`` per selected layer (see ``prunekit.records.LayerStats`` for every field) and passes it to
the score and select hooks as ``stats``. The statistics are method-neutral sums; what a criterion makes of
them (Wanda's ``|W| * ||X_j||``, Taylor's ``|W * dL/dW|``, channel norms) is the component's business.

Where the batches come from: the library user passes them (``pipeline.set_calibration(batches)``);
``prunekit run`` draws ``calibration_batches`` seeded batches from the training data; ``prunekit bench``
uses synthetic inputs and refuses ``"grads"`` (no labels) up front.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import PrunekitError
from prunekit.records import LayerStats

NEEDS: dict[str, str] = {
    "activations": "layer input column norms and output channel sums over the calibration inputs (no labels)",
    "grads": "loss gradients of the effective weights over the calibration batches (needs labels)",
}


@attrs.frozen
class Calibration:
    """Calibration batches ``(inputs, labels or None)`` and the loss used for ``"grads"``."""

    batches: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    source: str = "user batches"

    @property
    def has_labels(self) -> bool:
        return bool(self.batches) and all(y is not None for _, y in self.batches)


def as_calibration(batches: Iterable[Any] | Calibration, loss: Callable | None = None, source: str = "user batches") -> Calibration:
    """Normalise an iterable of ``x`` or ``(x, y)`` batches (a DataLoader works) into a Calibration."""
    if isinstance(batches, Calibration):
        return batches
    out = []
    for i, b in enumerate(batches):
        if isinstance(b, torch.Tensor):
            out.append((b, None))
        elif isinstance(b, (tuple, list)) and len(b) >= 1 and isinstance(b[0], torch.Tensor):
            y = b[1] if len(b) > 1 and isinstance(b[1], torch.Tensor) else None
            out.append((b[0], y))
        else:
            raise PrunekitError(
                f"calibration batch {i} is a {type(b).__name__}; pass tensors x or (x, y) pairs, e.g. a DataLoader"
            )
    if not out:
        raise PrunekitError("the calibration data is empty; pass at least one batch")
    return Calibration(tuple(out), loss if loss is not None else F.cross_entropy, source)


def draw_batches(dataset: Any, batches: int, batch_size: int, seed: int) -> Calibration:
    """``batches`` seeded batches of ``batch_size`` distinct samples drawn from ``dataset`` (x, y items)."""
    n = len(dataset)
    if n == 0:
        raise PrunekitError("the training data is empty; calibration needs at least one sample")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    size = max(1, min(batch_size, n))
    out = []
    for b in range(batches):
        idx = order[(b * size) % n :][:size]
        if len(idx) < size:
            idx = torch.cat([idx, order[: size - len(idx)]])
        items = [dataset[int(i)] for i in idx]
        x = torch.stack([it[0] for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
        out.append((x, y))
    return Calibration(tuple(out), F.cross_entropy, f"{batches} seeded training batches of {size}")


def synthetic(shape: tuple[int, ...], batches: int, batch_size: int, seed: int) -> Calibration:
    """Unlabelled standard-normal inputs (``prunekit bench``: random weights, no data)."""
    g = torch.Generator().manual_seed(seed)
    xs = tuple((torch.randn(batch_size, *shape, generator=g), None) for _ in range(batches))
    return Calibration(xs, F.cross_entropy, f"{batches} synthetic batches of {batch_size} (no labels)")


def input_column_sq(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over input rows of ``x_col**2`` per GEMM column, and the number of rows summed.

    Conv: the columns are ``(cin, kh, kw)`` of im2col with zero padding, computed tap by tap on strided
    views (no im2col buffer). Linear: the ``in`` features over every leading index.
    """
    x = x.detach().to(torch.float64)
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        return rows.square().sum(0), rows.shape[0]
    kh, kw = module.kernel_size
    (sh, sw), (dh, dw) = module.stride, module.dilation
    ph, pw = _numeric_padding(module)
    xp = F.pad(x, (pw, pw, ph, ph))
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = x.new_zeros(x.shape[1], kh, kw)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw]
            out[:, i, j] = patch.square().sum((0, 2, 3))
    return out.reshape(-1), x.shape[0] * oh * ow


def _numeric_padding(module: nn.Conv2d) -> tuple[int, int]:
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0, 0)
    return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))


def _channel_dim_sum(y: torch.Tensor, linear: bool) -> torch.Tensor:
    """Sum of ``y`` over everything but the output-channel axis."""
    if linear:
        return y.reshape(-1, y.shape[-1]).sum(0)
    return y.sum(dim=(0, *range(2, y.dim())))


@attrs.define
class _Acc:
    linear: bool
    positions: int = 0
    samples: int = 0
    input_sq: torch.Tensor | None = None
    output_abs: torch.Tensor | None = None
    output_sq: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None
    output_taylor: torch.Tensor | None = None

    def add(self, field: str, value: torch.Tensor) -> None:
        old = getattr(self, field)
        setattr(self, field, value if old is None else old + value)


def collect(
    model: nn.Module, modules: dict[str, nn.Module], calibration: Calibration, needs: frozenset[str] | set[str]
) -> dict[str, LayerStats]:
    """One pass of the calibration batches through ``model``; a LayerStats per entry of ``modules``.

    The model runs in eval mode (batch-norm statistics are read, never updated) and parameter ``.grad``
    fields are left untouched (gradients come from ``torch.autograd.grad``).
    """
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise PrunekitError(f"unknown calibration need(s) {sorted(unknown)}; known: {', '.join(NEEDS)}")
    want_act, want_grad = "activations" in needs, "grads" in needs
    if want_grad and not calibration.has_labels:
        raise PrunekitError(
            f"gradient statistics need labelled batches, and the calibration data ({calibration.source}) has none; "
            "pass (x, y) batches"
        )
    accs = {name: _Acc(linear=isinstance(m, nn.Linear)) for name, m in modules.items()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    handles = []
    captured_w: dict[str, torch.Tensor] = {}

    def pre_hook(name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple) -> None:
            acc = accs[name]
            if want_act:
                sq, rows = input_column_sq(mod, args[0])
                acc.add("input_sq", sq)
                acc.positions += rows
            if want_grad:
                captured_w[name] = mod.weight  # the cached effective weight this forward uses

        return hook

    def post_hook(name: str):  # noqa: ANN202
        def hook(_mod: nn.Module, _args: tuple, y: torch.Tensor) -> torch.Tensor | None:
            acc = accs[name]
            if want_act:
                yd = y.detach().to(torch.float64)
                acc.add("output_abs", _channel_dim_sum(yd.abs(), acc.linear))
                acc.add("output_sq", _channel_dim_sum(yd.square(), acc.linear))
            if not (want_act and want_grad and y.requires_grad):
                return None
            yd = y.detach()

            def on_grad(g: torch.Tensor, acc: _Acc = acc, yd: torch.Tensor = yd) -> None:
                prod = (yd * g).to(torch.float64)
                per_sample = prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1) if acc.linear else prod.sum((2, 3))
                acc.add("output_taylor", per_sample.abs().sum(0))

            y.register_hook(on_grad)
            # the model sees a copy, so an in-place op after the layer (ReLU(inplace=True)) cannot change y
            return y.clone()

        return hook

    for name, mod in modules.items():
        handles.append(mod.register_forward_pre_hook(pre_hook(name)))
        handles.append(mod.register_forward_hook(post_hook(name)))
    try:
        for x, y in calibration.batches:
            x = x.to(device)
            for acc in accs.values():
                acc.samples += x.shape[0]
            if not want_grad:
                with torch.no_grad():
                    model(x)
                continue
            with torch.enable_grad(), parametrize.cached():
                captured_w.clear()
                loss = calibration.loss(model(x), y.to(device))
                names = [n for n in modules if n in captured_w and captured_w[n].requires_grad]
                grads = torch.autograd.grad(loss, [captured_w[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    g = g.detach().to(torch.float64)
                    accs[n].add("grad", g)
                    accs[n].add("grad_sq", g.square())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    def f32(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(torch.float32).cpu()

    return {
        name: LayerStats(
            name=name,
            batches=len(calibration.batches),
            samples=a.samples,
            positions=a.positions,
            input_sq=f32(a.input_sq),
            output_abs=f32(a.output_abs),
            output_sq=f32(a.output_sq),
            grad=f32(a.grad),
            grad_sq=f32(a.grad_sq),
            output_taylor=f32(a.output_taylor),
        )
        for name, a in accs.items()
    }
