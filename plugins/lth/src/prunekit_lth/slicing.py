"""Physically sliced export of a channel-pruned (Refill) network, exact against the masked network.

``slice_model(model, keep)`` returns a thinner copy whose selected convs lose their removed output
channels, together with their batch norms and the matching input channels of every consumer. The
reference it must equal (in eval mode) is the *masked* network: each selected conv's weight rows of
removed channels zeroed, everything else unchanged.

A removed channel is not zero downstream: the conv outputs its bias (or 0), BN turns that into
``beta - gamma * mu / sqrt(var + eps)`` (+ gamma * bias / ...), the activation maps it again. The value
is constant over space, and the graph walk below carries it through every per-channel op. At each
consumer the channel may be cut when its contribution is a constant that folds into the consumer's
bias exactly:

* conv consumer: the value is 0, or the conv has no zero padding (padding 0 or a non-``zeros``
  padding mode): then every output position sees the same taps of the constant field;
* Linear after flatten / global pooling: always (no padding);
* anything the value passes through non-constantly (a zero-padded depthwise conv or avg-pool) makes
  it non-constant: such a channel is kept (weights zero, exact) and counted as ``kept_for_exactness``.

Channels whose output reaches a residual ``add`` without passing a conv are not sliced (the other
operand would have to lose them too): ``residual_coupled``. Outputs that reach anything else the walk
does not know (``cat``, a model output, reshapes other than flatten, modules called twice) are not
sliced either: ``unsupported`` with the reason. Grouped consumers (not depthwise) keep extra channels
so every group keeps the same count: ``kept_for_groups``. Depthwise convs (groups = channels) are
sliced through like a per-channel op. Grouped producers are not sliced. A conv keeps at least one
output channel (PyTorch has no zero-channel conv). Exactness holds in eval mode (BN running stats).
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError

# ------------------------------------------------------------------------------------------ report


@attrs.frozen
class LayerSlice:
    """What happened to one selected conv (``removed`` = masked-out channels, split by outcome)."""

    name: str
    channels_before: int
    channels_after: int
    removed: int
    sliced: int
    folded: int  # sliced channels whose constant went into a consumer's bias
    kept_for_exactness: int
    kept_for_groups: int
    residual_coupled: int
    unsupported: int
    reason: str
    params_before: int
    params_after: int
    macs_before: int | None  # multiply-accumulates per sample of this conv (needs ``example``)
    macs_after: int | None


@attrs.frozen
class SliceReport:
    layers: tuple[LayerSlice, ...]
    params_before: int
    params_after: int
    macs_before: int | None  # multiply-accumulates per sample of every Conv2d / Linear (needs ``example``)
    macs_after: int | None

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def layer(self, name: str) -> LayerSlice:
        for ls in self.layers:
            if ls.name == name:
                return ls
        raise KeyError(name)


# ------------------------------------------------------------------------------------------ graph walk


@attrs.define
class End:
    """A consumer the channels reach: its module name, the channel values there and their constancy."""

    kind: str  # "conv" | "gconv" | "linear"
    name: str
    value: torch.Tensor  # [C] value of each removed channel at the consumer's input
    const: torch.Tensor  # [C] bool: the value is constant over space
    hw: int = 1  # Linear: features per channel after flatten


@attrs.define
class Walk:
    ends: list[End] = attrs.field(factory=list)
    chain: list[tuple[str, str]] = attrs.field(factory=list)  # (module name, "bn" | "dw") sliced along
    coupled: str = ""
    unsupported: str = ""


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS: set[Callable] = {
    F.relu, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.hardtanh, F.silu, F.gelu, F.elu, F.hardswish,
    F.hardsigmoid, torch.sigmoid, torch.tanh, F.dropout, F.mish,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
_ADD = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_NEUTRAL_METHODS = {"size", "dim"}  # read the shape, not the channels


def _describe(node: fx.Node) -> str:
    t = node.target
    return f"{node.op} {getattr(t, '__name__', t)}"


def _zero_pad(conv: nn.Conv2d) -> bool:
    """Does the conv pad with zeros (so a constant field is not constant at the border)?"""
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


class _Walker:
    """Follow one conv's output channels through per-channel ops to the layers that consume them."""

    def __init__(self, gm: fx.GraphModule, modules: dict[str, nn.Module], calls: Counter) -> None:
        self.gm, self.modules, self.calls = gm, modules, calls

    def walk(self, node: fx.Node, value: torch.Tensor) -> Walk:
        out = Walk()
        self._visit(node, value, torch.ones_like(value, dtype=torch.bool), False, out)
        return out

    def _visit(self, node: fx.Node, v: torch.Tensor, const: torch.Tensor, flat: bool, out: Walk) -> None:
        if not node.users and node.op != "output":
            return
        for user in node.users:
            if out.coupled or out.unsupported:
                return
            self._user(node, user, v, const, flat, out)

    def _user(self, src: fx.Node, user: fx.Node, v: torch.Tensor, const: torch.Tensor, flat: bool, out: Walk) -> None:
        C = v.numel()
        if user.op == "output":
            out.unsupported = "the channels are a model output"
            return
        if (user.op == "call_function" and user.target in _ADD) or (user.op == "call_method" and user.target in _ADD_METHODS):
            out.coupled = f"reaches a residual {getattr(user.target, '__name__', user.target)} ({user.name})"
            return
        if user.op == "call_method" and user.target in _NEUTRAL_METHODS:
            return
        if user.op == "call_module":
            mod = self.modules[user.target]
            if isinstance(mod, (nn.BatchNorm2d, nn.Conv2d, nn.Linear)) and self.calls[user.target] != 1:
                out.unsupported = f"module {user.target} is called {self.calls[user.target]} times"
                return
            if user.args[0] is not src or len(user.args) != 1 or user.kwargs:
                out.unsupported = f"unexpected call of {user.target}"
                return
            self._module(user, mod, v, const, flat, out, C)
            return
        if user.op in ("call_function", "call_method") and user.args and user.args[0] is src:
            if any(isinstance(a, fx.Node) for a in user.args[1:] if not _is_size_arg(a)) or any(
                isinstance(a, fx.Node) for a in user.kwargs.values()
            ):
                out.unsupported = f"{_describe(user)} takes another tensor"
                return
            fn, args, kwargs = user.target, user.args[1:], dict(user.kwargs)
            if (user.op == "call_function" and fn in _ELEMENTWISE_FUNCTIONS) or (
                user.op == "call_method" and fn in _ELEMENTWISE_METHODS
            ):
                nv = _apply(fn, user.op, v, flat, args, kwargs)
                self._visit(user, nv, const, flat, out)
                return
            if not flat and _is_flatten(user):
                self._visit(user, v, const, True, out)
                return
            if not flat and _is_spatial_mean(user):
                keep = bool(kwargs.get("keepdim", args[1] if len(args) > 1 else False))
                self._visit(user, v, const, not keep, out)
                return
            if not flat and user.op == "call_function" and fn in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool2d):
                self._visit(user, v, const, False, out)
                return
        out.unsupported = f"the channels reach {_describe(user)} ({user.name})"

    def _module(self, user: fx.Node, mod: nn.Module, v: torch.Tensor, const: torch.Tensor, flat: bool, out: Walk, C: int) -> None:
        if flat:
            if isinstance(mod, nn.Linear):
                if mod.in_features % C:
                    out.unsupported = f"Linear {user.target} has {mod.in_features} inputs, not a multiple of {C} channels"
                    return
                out.ends.append(End("linear", user.target, v, const, mod.in_features // C))
                return
            if isinstance(mod, _ELEMENTWISE_MODULES):
                self._visit(user, _eval(mod, v, True), const, True, out)
                return
            out.unsupported = f"flattened channels reach {type(mod).__name__} {user.target}"
            return
        if isinstance(mod, nn.BatchNorm2d):
            if mod.num_features != C or not mod.track_running_stats or mod.running_mean is None:
                out.unsupported = f"BatchNorm {user.target} has no running statistics or {mod.num_features} != {C} channels"
                return
            out.chain.append((user.target, "bn"))
            self._visit(user, _eval(mod, v, False), const, False, out)
            return
        if isinstance(mod, _ELEMENTWISE_MODULES):
            self._visit(user, _eval(mod, v, False), const, False, out)
            return
        if isinstance(mod, (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
            self._visit(user, v, const, False, out)  # max/average of a constant field (max pads with -inf)
            return
        if isinstance(mod, nn.AvgPool2d):
            pad = mod.padding if isinstance(mod.padding, tuple) else (mod.padding, mod.padding)
            exact = (not any(pad) or not mod.count_include_pad) and not mod.ceil_mode and mod.divisor_override is None
            self._visit(user, v, const & ((v == 0) | exact), False, out)
            return
        if isinstance(mod, nn.Flatten):
            if mod.start_dim != 1 or mod.end_dim != -1:
                out.unsupported = f"Flatten {user.target} is not flatten(1)"
                return
            self._visit(user, v, const, True, out)
            return
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels != C:
                out.unsupported = f"conv {user.target} has {mod.in_channels} input channels, the producer {C}"
                return
            if mod.groups == 1:
                out.ends.append(End("conv", user.target, v, const))
                return
            if mod.groups == C and mod.out_channels == C:  # depthwise: channel c -> channel c
                w = mod.weight.detach()
                b = mod.bias.detach() if mod.bias is not None else torch.zeros_like(v)
                nv = v * w.sum(dim=(1, 2, 3)).to(v.dtype) + b.to(v.dtype)
                out.chain.append((user.target, "dw"))
                self._visit(user, nv, const & ((v == 0) | (not _zero_pad(mod))), False, out)
                return
            out.ends.append(End("gconv", user.target, v, const))
            return
        out.unsupported = f"the channels reach {type(mod).__name__} {user.target}"


def _is_size_arg(a: Any) -> bool:
    return isinstance(a, fx.Node) and a.op == "call_method" and a.target == "size"


def _is_flatten(node: fx.Node) -> bool:
    args, kwargs = node.args[1:], node.kwargs
    if (node.op == "call_function" and node.target is torch.flatten) or (node.op == "call_method" and node.target == "flatten"):
        start = kwargs.get("start_dim", args[0] if args else 0)
        end = kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target in ("view", "reshape") and len(args) == 2:
        return args[1] == -1  # x.view(x.size(0), -1)
    return False


def _is_spatial_mean(node: fx.Node) -> bool:
    if not ((node.op == "call_function" and node.target is torch.mean) or (node.op == "call_method" and node.target == "mean")):
        return False
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]


def _probe(v: torch.Tensor, flat: bool) -> torch.Tensor:
    return v.view(1, -1) if flat else v.view(1, -1, 1, 1)


def _eval(mod: nn.Module, v: torch.Tensor, flat: bool) -> torch.Tensor:
    """The module's output on the constant channel values (eval mode: BN uses its running stats)."""
    was = mod.training
    mod.eval()
    try:
        with torch.no_grad():
            return mod(_probe(v, flat).clone()).reshape(-1)
    finally:
        mod.train(was)


def _apply(fn: Any, op: str, v: torch.Tensor, flat: bool, args: tuple, kwargs: dict) -> torch.Tensor:
    x = _probe(v, flat).clone()
    if fn is F.dropout:
        return v.clone()  # identity in eval mode
    with torch.no_grad():
        y = getattr(x, fn)(*args, **kwargs) if op == "call_method" else fn(x, *args, **kwargs)
    return y.reshape(-1)


# ------------------------------------------------------------------------------------------ plans


@attrs.define
class _Plan:
    """Per-module edits, applied after every decision is made on the masked full model."""

    out_keep: torch.Tensor | None = None  # conv / BN / depthwise: kept output channels (bool)
    in_keep: torch.Tensor | None = None  # conv / Linear: kept input channels or features (bool)
    bias_delta: torch.Tensor | None = None  # folded constants, full output size


def _plan(plans: dict[str, _Plan], name: str) -> _Plan:
    return plans.setdefault(name, _Plan())


def _and(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b.clone() if a is None else a & b


def _add(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b.clone() if a is None else a + b


def masked_model(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with the weight rows of every removed channel zeroed: the reference network."""
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    for name, k in _check_keep(mods, keep).items():
        with torch.no_grad():
            mods[name].weight[~k.to(mods[name].weight.device)] = 0
    return out


def _check_keep(mods: dict[str, nn.Module], keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, k in keep.items():
        mod = mods.get(name)
        if not isinstance(mod, nn.Conv2d):
            what = "no such module" if mod is None else type(mod).__name__
            raise PrunekitError(f"slice_model: keep names {name!r} ({what}); name the model's Conv2d layers")
        k = torch.as_tensor(k).detach().cpu()
        if k.dtype != torch.bool or tuple(k.shape) != (mod.out_channels,):
            raise PrunekitError(
                f"slice_model: keep[{name!r}] must be a bool [{mod.out_channels}] of kept output channels, "
                f"got {k.dtype} {tuple(k.shape)}; pass RefillResult.keep"
            )
        out[name] = k
    return out


def slice_model(
    model: nn.Module, keep: dict[str, torch.Tensor], example: torch.Tensor | None = None
) -> tuple[nn.Module, SliceReport]:
    """A physically thinner copy of ``model`` (see the module docstring) and what was sliced.

    ``keep[name]`` is a bool ``[Cout]`` of the channels conv ``name`` keeps. ``example`` (one input
    batch) adds per-sample MAC counts to the report. ``model`` is not modified.
    """
    masked = masked_model(model, keep)
    mods = dict(masked.named_modules())
    keep = _check_keep(mods, keep)
    try:
        gm = fx.symbolic_trace(masked)
    except Exception as exc:  # tracing failures come in many types
        raise PrunekitError(
            f"slice_model: the model cannot be traced with torch.fx ({type(exc).__name__}: {exc}); "
            "slice_model needs an fx-traceable model (no data-dependent control flow)"
        ) from None
    gmods = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    walker = _Walker(gm, gmods, calls)
    plans: dict[str, _Plan] = {}
    decisions: dict[str, dict[str, Any]] = {}
    for name, k in keep.items():
        conv = mods[name]
        removed = ~k
        d = {"removed": int(removed.sum()), "sliced": torch.zeros_like(k), "folded": 0, "exact": 0, "groups": 0,
             "coupled": 0, "unsupported": 0, "reason": ""}  # fmt: skip
        decisions[name] = d
        if not removed.any():
            continue
        if conv.groups != 1:
            d["unsupported"], d["reason"] = d["removed"], f"grouped producer (groups={conv.groups}) is not sliced"
            continue
        if calls[name] != 1 or name not in nodes:
            d["unsupported"], d["reason"] = d["removed"], f"module {name} is called {calls[name]} times"
            continue
        b = conv.bias.detach() if conv.bias is not None else None
        w = conv.weight.detach()
        v0 = b.clone() if b is not None else torch.zeros(conv.out_channels, dtype=w.dtype, device=w.device)
        walk = walker.walk(nodes[name], v0)
        if walk.coupled or walk.unsupported:
            key = "coupled" if walk.coupled else "unsupported"
            d[key], d["reason"] = d["removed"], walk.coupled or walk.unsupported
            continue
        if not walk.ends:
            d["unsupported"], d["reason"] = d["removed"], "the channels reach no consumer"
            continue
        cut = removed.clone()
        for e in walk.ends:
            ok = e.const.cpu() & (e.value.cpu() == 0)
            if e.kind == "linear" or not _zero_pad(mods[e.name]):
                ok = e.const.cpu().clone()
            cut &= ok
        d["exact"] = int((removed & ~cut).sum())
        before_groups = int(cut.sum())
        cut = _equalize_groups(cut, [mods[e.name] for e in walk.ends if e.kind == "gconv"])
        d["groups"] = before_groups - int(cut.sum())
        if bool(cut.all()):  # PyTorch has no zero-channel conv: keep the last one (zero weights: exact)
            cut[-1] = False
            d["exact"] += 1
        d["sliced"] = cut
        if not cut.any():
            d["reason"] = "no removed channel folds exactly into its consumers"
            continue
        nonzero = torch.zeros_like(cut)
        for e in walk.ends:
            nonzero |= e.value.cpu() != 0
            _fold(plans, e, mods[e.name], cut)
        d["folded"] = int((cut & nonzero).sum())
        p = _plan(plans, name)
        p.out_keep = _and(p.out_keep, ~cut)
        for mname, _kind in walk.chain:
            q = _plan(plans, mname)
            q.out_keep = _and(q.out_keep, ~cut)
            if _kind == "dw":
                q.in_keep = _and(q.in_keep, ~cut)
    sliced = copy.deepcopy(masked)
    smods = dict(sliced.named_modules())
    for mname, p in plans.items():
        _replace(sliced, mname, _rebuild(smods[mname], p))
    return sliced, _report(model, masked, sliced, keep, decisions, example)


def _equalize_groups(cut: torch.Tensor, gconvs: list[nn.Conv2d]) -> torch.Tensor:
    """Un-cut channels so that every group of each grouped consumer loses the same number (the fewest)."""
    cut = cut.clone()
    for conv in gconvs:
        per = conv.in_channels // conv.groups
        groups = cut.view(conv.groups, per)
        least = int(groups.sum(1).min())
        for g in range(conv.groups):
            idx = torch.nonzero(groups[g]).flatten()
            groups[g, idx[least:]] = False  # keep the highest-index extras
    return cut


def _fold(plans: dict[str, _Plan], e: End, mod: nn.Module, cut: torch.Tensor) -> None:
    """Record the consumer's input slicing and fold the cut channels' constants into its bias."""
    v = torch.where(cut.to(e.value.device), e.value, torch.zeros_like(e.value))
    w = mod.weight.detach()
    p = _plan(plans, e.name)
    if e.kind == "linear":
        feats = cut.repeat_interleave(e.hw)
        delta = w @ v.to(w.dtype).repeat_interleave(e.hw)
        p.in_keep = _and(p.in_keep, ~feats)
    elif e.kind == "conv":
        delta = w.sum(dim=(2, 3)) @ v.to(w.dtype)
        p.in_keep = _and(p.in_keep, ~cut)
    else:  # grouped: output o of group g reads input channels of group g only
        g = mod.groups
        per_in, per_out = mod.in_channels // g, mod.out_channels // g
        vg = v.to(w.dtype).view(g, per_in)
        delta = (w.sum(dim=(2, 3)).view(g, per_out, per_in) * vg[:, None, :]).sum(-1).reshape(-1)
        p.in_keep = _and(p.in_keep, ~cut)
    p.bias_delta = _add(p.bias_delta, delta)


def _rebuild(mod: nn.Module, p: _Plan) -> nn.Module:
    dev = next(iter(mod.parameters())).device if any(True for _ in mod.parameters()) else None
    if isinstance(mod, nn.BatchNorm2d):
        k = p.out_keep.to(mod.running_mean.device)
        new = nn.BatchNorm2d(int(k.sum()), mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        with torch.no_grad():
            if mod.affine:
                new.weight.copy_(mod.weight[k])
                new.bias.copy_(mod.bias[k])
            new.running_mean.copy_(mod.running_mean[k])
            new.running_var.copy_(mod.running_var[k])
            new.num_batches_tracked.copy_(mod.num_batches_tracked)
        return new.to(mod.running_mean.device).train(mod.training)
    if isinstance(mod, nn.Linear):
        w, b = mod.weight.detach(), mod.bias.detach() if mod.bias is not None else None
        ik = p.in_keep.to(w.device)
        bias = _new_bias(b, p.bias_delta, mod.out_features, w)
        new = nn.Linear(int(ik.sum()), mod.out_features, bias=bias is not None)
        with torch.no_grad():
            new.weight.copy_(w[:, ik])
            if bias is not None:
                new.bias.copy_(bias)
        return new.to(device=dev, dtype=w.dtype).train(mod.training)
    assert isinstance(mod, nn.Conv2d)
    w, b = mod.weight.detach(), mod.bias.detach() if mod.bias is not None else None
    ok = (p.out_keep if p.out_keep is not None else torch.ones(mod.out_channels, dtype=torch.bool)).to(w.device)
    bias = _new_bias(b, p.bias_delta, mod.out_channels, w)
    g = mod.groups
    if g > 1 and g == mod.in_channels == mod.out_channels:  # depthwise, sliced through
        ik = p.in_keep.to(w.device) if p.in_keep is not None else ok
        if not torch.equal(ik, ok):
            raise PrunekitError(f"slice_model: internal error, depthwise conv sliced unevenly ({ik.sum()} in, {ok.sum()} out)")
        weight, groups, cin = w[ok], int(ok.sum()), int(ok.sum())
    else:
        ik = (p.in_keep if p.in_keep is not None else torch.ones(mod.in_channels, dtype=torch.bool)).to(w.device)
        per_in = mod.in_channels // g
        local = ik.view(g, per_in)
        counts = local.sum(1)
        if not bool((counts == counts[0]).all()):
            raise PrunekitError(f"slice_model: internal error, grouped conv inputs sliced unevenly {counts.tolist()}")
        idx = torch.nonzero(local)[:, 1].view(g, -1)  # kept local input channels per group
        per_out = mod.out_channels // g
        sel = idx.repeat_interleave(per_out, 0)  # [Cout, kept per group]
        weight = torch.gather(w, 1, sel[:, :, None, None].expand(-1, -1, *w.shape[2:]))[ok]
        groups, cin = g, int(ik.sum())
    new = nn.Conv2d(
        cin, int(ok.sum()), mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups,
        bias=bias is not None, padding_mode=mod.padding_mode,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias[ok])
    return new.to(device=dev, dtype=w.dtype).train(mod.training)


def _new_bias(b: torch.Tensor | None, delta: torch.Tensor | None, n: int, w: torch.Tensor) -> torch.Tensor | None:
    if delta is None:
        return b
    base = b if b is not None else torch.zeros(n, dtype=w.dtype, device=w.device)
    return base + delta.to(base.dtype)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ------------------------------------------------------------------------------------------ accounting


def _params(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def _macs(model: nn.Module, example: torch.Tensor | None) -> dict[str, int] | None:
    """MACs per sample of every Conv2d / Linear on ``example``."""
    if example is None:
        return None
    out: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):

            def hook(mod: nn.Module, args: tuple, y: torch.Tensor, name: str = name) -> None:
                per_out = mod.weight[0].numel()
                out[name] = out.get(name, 0) + y.numel() // max(example.shape[0], 1) * per_out

            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return out


def _report(
    model: nn.Module, masked: nn.Module, sliced: nn.Module, keep: dict[str, torch.Tensor],
    decisions: dict[str, dict[str, Any]], example: torch.Tensor | None,
) -> SliceReport:  # fmt: skip
    m_before, m_after = _macs(masked, example), _macs(sliced, example)
    mods, smods = dict(masked.named_modules()), dict(sliced.named_modules())
    layers = []
    for name, d in decisions.items():
        cut = d["sliced"]
        layers.append(
            LayerSlice(
                name=name,
                channels_before=mods[name].out_channels,
                channels_after=smods[name].out_channels,
                removed=d["removed"],
                sliced=int(cut.sum()),
                folded=d["folded"],
                kept_for_exactness=d["exact"],
                kept_for_groups=d["groups"],
                residual_coupled=d["coupled"],
                unsupported=d["unsupported"],
                reason=d["reason"],
                params_before=_params(mods[name]),
                params_after=_params(smods[name]),
                macs_before=None if m_before is None else m_before.get(name),
                macs_after=None if m_after is None else m_after.get(name),
            )
        )
    return SliceReport(
        layers=tuple(layers),
        params_before=_params(model),
        params_after=_params(sliced),
        macs_before=None if m_before is None else int(math.fsum(m_before.values())),
        macs_after=None if m_after is None else int(math.fsum(m_after.values())),
    )
