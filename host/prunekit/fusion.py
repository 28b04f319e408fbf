"""Graph-level fusion every kernel can use: fold eval-mode BatchNorm into the conv before it, find each conv's
*epilogue* (what follows it: the BN's shift, a residual add, ReLU/ReLU6, max pooling) with ``torch.fx``, and
run the model through a rewritten forward in which a kernel that declares ``epilogues`` computes the conv and
its epilogue in one call. Method- and backend-neutral: nothing here knows which kernel runs.

Epilogue vocabulary (``LayerInfo.epilogue``, a chain of ops joined by ``+``, always in this order):

* ``bias``: add a per-output-channel shift (the folded BN's), passed as a tensor ``[Cout]`` at call time;
* ``add``: add a residual tensor of the output's shape, passed at call time (the other operand of ``x + y``);
* ``relu`` or ``relu6`` (``clamp(x, 0, 6)``);
* ``maxpool{k}s{s}p{p}``: 2-D max pooling, kernel k, stride s, padding p (dilation 1, floor mode).

For example ``bias+add+relu`` is ResNet's last conv of a block (BN, ``+ identity``, ReLU) and
``bias+relu+maxpool3s2p1`` its stem. A kernel's ``fused`` module is called as ``fused(x, *tensors)`` with the
tensors of ``bias`` and ``add`` in that order; ``apply_epilogue`` is the reference it must match.

Folding (``fold_batchnorm``): for ``conv -> bn`` where the conv's output feeds only that BN, the BN is in
eval mode with running statistics and affine, the conv's weight becomes ``w * scale`` (``scale = gamma /
sqrt(var + eps)``) in place; the shift ``beta - mean * scale`` goes into the conv's bias when it has one,
else stays in the BN, which is left as ``x + shift`` (weight 1, mean 0, var 1 - eps). No state_dict key
appears or disappears, the model computes the same function, and a conv module still computes a conv:
what per-layer checks compare stays valid.

The rewritten forward (``install``) is the traced graph with folded BNs dropped and each fused chain
replaced by a ``FusedSite``: it calls the kernel's fused module while the model still holds, at the conv's
name, the module the kernel built it for, and otherwise (or under TorchScript tracing / ONNX export) the
module found there followed by the epilogue in plain torch (so swapping a layer back, e.g. to export the
masked dense model to ONNX, keeps the function).
``uninstall`` restores the class's forward. The modules stay where they are; ``state_dict`` is unchanged.
"""

from __future__ import annotations

import operator
import re
import types
from collections.abc import Iterable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import fx, nn

ACTS = ("relu", "relu6")
_POOL = re.compile(r"^maxpool(\d+)s(\d+)p(\d+)$")
CONTAINER = "prunekit_fusion"  # attribute holding the FusedSite modules (not a registered submodule)


@attrs.frozen
class Epilogue:
    """A parsed epilogue chain (see the module docstring)."""

    bias: bool = False
    add: bool = False
    act: str = ""
    pool: tuple[int, int, int] | None = None  # (kernel, stride, padding)

    @property
    def chain(self) -> str:
        ops = (["bias"] if self.bias else []) + (["add"] if self.add else []) + ([self.act] if self.act else [])
        if self.pool is not None:
            ops.append("maxpool{}s{}p{}".format(*self.pool))
        return "+".join(ops)

    @property
    def ops(self) -> list[str]:
        return self.chain.split("+") if self.chain else []

    @property
    def tensors(self) -> tuple[str, ...]:
        """The tensors a fused module takes after ``x``, in order."""
        return (("bias",) if self.bias else ()) + (("residual",) if self.add else ())

    def prefixes(self) -> list[Epilogue]:
        """This chain and every shorter one that keeps its first ops (longest first), non-empty."""
        ops = self.ops
        return [parse_epilogue("+".join(ops[:k])) for k in range(len(ops), 0, -1)]


def parse_epilogue(chain: str) -> Epilogue:
    """``"bias+add+relu"`` -> Epilogue; raises ValueError for a chain outside the vocabulary or order."""
    if not chain:
        return Epilogue()
    fields: dict[str, Any] = {}
    stage = 0  # ops must come in the order bias, add, act, pool
    for op in chain.split("+"):
        m = _POOL.match(op)
        if op == "bias" and stage < 1:
            fields["bias"], stage = True, 1
        elif op == "add" and stage < 2:
            fields["add"], stage = True, 2
        elif op in ACTS and stage < 3:
            fields["act"], stage = op, 3
        elif m and stage < 4:
            k, s, p = (int(g) for g in m.groups())
            if k < 1 or s < 1 or 2 * p > k:
                raise ValueError(f"epilogue {chain!r}: bad max-pool geometry {op}")
            fields["pool"], stage = (k, s, p), 4
        else:
            raise ValueError(f"epilogue {chain!r}: {op!r} is unknown or out of order (bias, add, relu|relu6, maxpool<k>s<s>p<p>)")
    return Epilogue(**fields)


def generic(chain: str) -> str:
    """The chain with its pooling geometry replaced by ``maxpool*`` (what kernels declare)."""
    return "+".join("maxpool*" if _POOL.match(op) else op for op in chain.split("+")) if chain else ""


def every_chain() -> frozenset[str]:
    """Every chain of the vocabulary in generic form: what a kernel that fuses all of it declares."""
    out = set()
    for bias in (False, True):
        for add in (False, True):
            for act in ("", *ACTS):
                for pool in (False, True):
                    ops = (["bias"] if bias else []) + (["add"] if add else []) + ([act] if act else [])
                    ops += ["maxpool*"] if pool else []
                    if ops:
                        out.add("+".join(ops))
    return frozenset(out)


def declared_epilogues(component: Any, params: Any = None) -> frozenset[str]:
    """A kernel component's ``epilogues`` attribute (a collection of generic chains, or a method of its params)."""
    eps = getattr(component, "epilogues", None)
    if callable(eps):
        eps = eps(params)
    return frozenset(generic(c) for c in (eps or ()))


def best_supported(ep: Epilogue, declared: frozenset[str]) -> Epilogue:
    """The longest prefix of ``ep`` the kernel declares (empty Epilogue: none)."""
    for pre in ep.prefixes():
        if generic(pre.chain) in declared:
            return pre
    return Epilogue()


def apply_epilogue(y: torch.Tensor, ep: Epilogue | str, *tensors: torch.Tensor) -> torch.Tensor:
    """The reference: ``y`` followed by the epilogue in plain torch (what a fused module must compute)."""
    ep = parse_epilogue(ep) if isinstance(ep, str) else ep
    it = iter(tensors)
    if ep.bias:
        shift = next(it)
        y = y + shift.reshape(1, -1, *([1] * (y.dim() - 2)))
    if ep.add:
        y = y + next(it)
    if ep.act == "relu":
        y = torch.relu(y)
    elif ep.act == "relu6":
        y = torch.clamp(y, 0.0, 6.0)
    if ep.pool is not None:
        k, s, p = ep.pool
        y = F.max_pool2d(y, k, s, p)
    return y


# ---------------------------------------------------------------- tracing and folding


def trace(model: nn.Module) -> tuple[fx.GraphModule | None, str]:
    """``(graph module, "")`` or ``(None, why)`` when the model cannot be traced symbolically."""
    try:
        return fx.symbolic_trace(model), ""
    except Exception as exc:  # data-dependent control flow, unsupported Python: no fusion, model unchanged
        return None, f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {str(exc)[:160]}"


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def neutral_var(eps: float) -> float:
    """A float32 variance v with ``v + eps == 1`` in float32, so the left BN divides by exactly 1."""
    v = torch.tensor(1.0 - eps, dtype=torch.float32)
    one = torch.tensor(1.0, dtype=torch.float32)
    e = torch.tensor(eps, dtype=torch.float32)
    for _ in range(8):
        s = v + e
        if bool(s == one):
            break
        v = torch.nextafter(v, torch.tensor(2.0 if bool(s < one) else 0.0))
    return float(v)


def is_folded(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` already is what folding leaves (weight 1, mean 0, var + eps = 1): folding it again is a no-op."""
    if bn.running_mean is None or bn.weight is None:
        return False
    v = torch.tensor(neutral_var(bn.eps))
    return bool((bn.weight == 1).all() and (bn.running_mean == 0).all() and (bn.running_var == v).all())


@torch.no_grad()
def fold_batchnorm(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """Fold every eval-mode, affine BatchNorm2d fed only by a conv into that conv (see the module docstring).

    Returns ``{bn name: conv name}`` of the folded pairs (also those folded by an earlier call)."""
    counts = _call_counts(gm.graph)
    folded: dict[str, str] = {}
    for node in gm.graph.nodes:
        conv = _module(gm, node)
        if not isinstance(conv, nn.Conv2d) or counts[node.target] != 1 or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        bn = _module(gm, user)
        if (
            not isinstance(bn, nn.BatchNorm2d) or counts[user.target] != 1 or user.args[:1] != (node,)
            or bn.training or not bn.affine or bn.running_mean is None or bn.num_features != conv.out_channels
        ):  # fmt: skip
            continue
        folded[user.target] = node.target
        if is_folded(bn) and conv.bias is None:
            continue
        w = conv.weight
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.double() - bn.running_mean.double() * scale
        w.copy_((w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        if conv.bias is not None:
            conv.bias.copy_((conv.bias.double() * scale + shift).to(conv.bias.dtype))
            shift = torch.zeros_like(shift)
        bn.weight.fill_(1.0)
        bn.bias.copy_(shift.to(bn.bias.dtype))
        bn.running_mean.zero_()
        bn.running_var.fill_(neutral_var(bn.eps))
    return folded


# ---------------------------------------------------------------- finding epilogues


_RELU_FNS = {F.relu, torch.relu, torch.relu_}
_ADD_FNS = {operator.add, operator.iadd, torch.add}


def _act_of(gm: fx.GraphModule, node: fx.Node) -> str:
    mod = _module(gm, node)
    if isinstance(mod, nn.ReLU):
        return "relu"
    if isinstance(mod, nn.ReLU6) or (isinstance(mod, nn.Hardtanh) and (mod.min_val, mod.max_val) == (0.0, 6.0)):
        return "relu6"
    if node.op == "call_function":
        if node.target in _RELU_FNS:
            return "relu"
        if node.target is F.relu6:
            return "relu6"
        if node.target is F.hardtanh:
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            return "relu6" if (lo, hi) == (0.0, 6.0) else ""
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return ""


def _pool_of(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int, int] | None:
    mod = _module(gm, node)
    if isinstance(mod, nn.MaxPool2d):
        k, s, p, d = mod.kernel_size, mod.stride, mod.padding, mod.dilation
        if mod.ceil_mode or mod.return_indices:
            return None
    elif node.op == "call_function" and node.target is F.max_pool2d:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        args = dict(zip(names, node.args)) | dict(node.kwargs)
        k = args.get("kernel_size")
        s = args.get("stride") or k
        p, d = args.get("padding", 0), args.get("dilation", 1)
        if args.get("ceil_mode") or args.get("return_indices"):
            return None
    else:
        return None
    vals = []
    for v in (k, s, p, d):
        v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        if len(v) != 2 or v[0] != v[1] or not isinstance(v[0], int):
            return None
        vals.append(v[0])
    k, s, p, d = vals
    return (k, s, p) if d == 1 and 2 * p <= k else None


@attrs.frozen
class Site:
    """A conv node and the chain after it: ``nodes[i]`` is the node that ends op ``i`` of ``epilogue``."""

    conv: str  # the conv module's qualified name
    node: str  # its fx node
    epilogue: Epilogue
    nodes: tuple[str, ...]  # per op, the graph node computing it (BN for bias, the add, the act, the pool)
    shift: str | None = None  # "bias": qualified name of the tensor holding the shift (the folded BN's bias)
    residual: str | None = None  # "add": the fx node of the other operand
    dropped: tuple[str, ...] = ()  # folded BN nodes with no op of their own (the shift went into the conv bias)


def find_sites(gm: fx.GraphModule, folded: dict[str, str]) -> dict[str, Site]:
    """For every conv called once in the graph: the longest epilogue chain it feeds alone."""
    counts = _call_counts(gm.graph)
    sites: dict[str, Site] = {}
    for node in gm.graph.nodes:
        if not isinstance(_module(gm, node), nn.Conv2d) or counts[node.target] != 1:
            continue
        fields: dict[str, Any] = {}
        nodes: list[str] = []
        shift = residual = None
        dropped: list[str] = []
        cur = node
        nxt = next(iter(cur.users)) if len(cur.users) == 1 else None
        if nxt is not None and nxt.op == "call_module" and folded.get(nxt.target) == node.target:
            bn = gm.get_submodule(nxt.target)
            if bool((bn.bias != 0).any()):
                fields["bias"], shift = True, f"{nxt.target}.bias"
                nodes.append(nxt.name)
            else:
                dropped.append(nxt.name)
            cur = nxt
            nxt = next(iter(cur.users)) if len(cur.users) == 1 else None
        if (
            nxt is not None and nxt.op == "call_function" and nxt.target in _ADD_FNS and len(nxt.args) == 2
            and not nxt.kwargs and cur in nxt.args and all(isinstance(a, fx.Node) for a in nxt.args)
            and nxt.args[0] is not nxt.args[1]
        ):  # fmt: skip
            other = nxt.args[1] if nxt.args[0] is cur else nxt.args[0]
            fields["add"], residual = True, other.name
            nodes.append(nxt.name)
            cur = nxt
            nxt = next(iter(cur.users)) if len(cur.users) == 1 else None
        act = _act_of(gm, nxt) if nxt is not None else ""
        if act:
            fields["act"] = act
            nodes.append(nxt.name)
            cur = nxt
            nxt = next(iter(cur.users)) if len(cur.users) == 1 else None
        pool = _pool_of(gm, nxt) if nxt is not None else None
        if pool is not None:
            fields["pool"] = pool
            nodes.append(nxt.name)
        sites[node.target] = Site(node.target, node.name, Epilogue(**fields), tuple(nodes), shift, residual, tuple(dropped))
    # an add fed by two conv chains (ResNet's `out += identity` after a downsample conv) belongs to the
    # chain that is its first operand (the accumulator); the other chain stops before it
    by_name = {n.name: n for n in gm.graph.nodes}
    claims: dict[str, list[Site]] = {}
    for site in sites.values():
        if site.epilogue.add:
            claims.setdefault(site.nodes[int(site.epilogue.bias)], []).append(site)
    for add, claimants in claims.items():
        if len(claimants) < 2:
            continue
        first = by_name[add].args[0]
        for site in claimants:
            k = int(site.epilogue.bias)
            before = by_name[site.nodes[k - 1]] if k else by_name[site.dropped[-1]] if site.dropped else by_name[site.node]
            if before is not first:
                sites[site.conv] = attrs.evolve(site, epilogue=Epilogue(bias=site.epilogue.bias), nodes=site.nodes[:k],
                                                residual=None)  # fmt: skip
    return sites


# ---------------------------------------------------------------- the rewritten forward


class FusedSite(nn.Module):
    """One conv and the first ops of its epilogue in the rewritten forward (see the module docstring).

    Holds no parameters or buffers of its own: the kernel's fused module and the model are plain attributes,
    so the model's state_dict does not change."""

    def __init__(self, root: nn.Module, name: str, expected: nn.Module, fused: nn.Module, epilogue: Epilogue) -> None:
        super().__init__()
        self.name = name
        self.chain = epilogue.chain
        self.__dict__["_root"] = root
        self.__dict__["_path"] = tuple(name.split("."))
        self.__dict__["_expected"] = expected
        self.__dict__["_fused"] = fused
        self.__dict__["_epilogue"] = epilogue

    def extra_repr(self) -> str:
        return f"{self.name} + {self.chain}"

    def _current(self) -> nn.Module:
        """The module now at the conv's name: a walk over ``_modules`` (``get_submodule`` costs ~5 us a call,
        which a small fused layer pays on every forward)."""
        mod = self._root
        try:
            for part in self._path:
                mod = mod._modules[part]
        except KeyError:
            return self._root.get_submodule(self.name)  # gone or renamed: get_submodule's own error
        return mod

    def forward(self, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        mod = self._current()
        if mod is self._expected and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            return self._fused.forward(x, *tensors)  # internal module, no hooks: skip nn.Module.__call__
        # another module at the conv's name (e.g. the masked dense one for export), or TorchScript/ONNX
        # tracing (standard ops only): the module there, then the epilogue in plain torch
        return apply_epilogue(mod(x), self._epilogue, *tensors)


@attrs.define
class FusionPlan:
    """What finalize found: the traced graph, the folded BNs and every conv's epilogue chain."""

    gm: fx.GraphModule
    folded: dict[str, str]
    sites: dict[str, Site]
    fused: dict[str, str] = attrs.field(factory=dict)  # conv name -> chain now fused (after install)
    notes: dict[str, str] = attrs.field(factory=dict)  # conv name -> why a chain was not fused

    def epilogue(self, name: str, declared: frozenset[str]) -> Epilogue:
        """The chain a kernel declaring ``declared`` should fuse into conv ``name`` (empty: none)."""
        site = self.sites.get(name)
        return best_supported(site.epilogue, declared) if site is not None else Epilogue()


def plan(model: nn.Module) -> tuple[FusionPlan | None, str]:
    """Trace ``model``, fold its eval-mode BNs and find every conv's epilogue: ``(plan, "")`` or ``(None, why)``."""
    gm, why = trace(model)
    if gm is None:
        return None, why
    folded = fold_batchnorm(model, gm)
    return FusionPlan(gm, folded, find_sites(gm, folded)), ""


def install(model: nn.Module, fplan: FusionPlan, fused: dict[str, tuple[nn.Module, nn.Module, Epilogue]]) -> None:
    """Give ``model`` the rewritten forward: ``fused[conv] = (module expected at conv, fused module, chain)``.

    Folded BNs whose shift went into the conv are dropped from the graph; each fused chain becomes one call.
    Chains are fused as given (a prefix of the site's chain); the rest of the site's ops stay in the graph."""
    uninstall(model)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    old = fplan.gm.graph
    by_name = {n.name: n for n in old.nodes}
    skip: set[str] = set()  # old nodes computed by a fused call (or dropped BNs)
    ends: dict[str, tuple[str, int]] = {}  # old node that ends a fused chain -> (conv, chain length)
    for conv, (_expected, _mod, ep) in fused.items():
        site = fplan.sites[conv]
        n = len(ep.ops)
        skip.update([site.node, *site.nodes[:n]])
        ends[site.nodes[n - 1]] = (conv, n)
    dropped = {d for site in fplan.sites.values() for d in site.dropped}
    skip |= dropped
    container = nn.Module()
    for node in old.nodes:
        if node.name in ends:
            conv, n = ends[node.name]
            site = fplan.sites[conv]
            expected, mod, ep = fused[conv]
            target = f"site{len(container._modules)}"
            container.add_module(target, FusedSite(model, conv, expected, mod, ep))
            args = [env[by_name[site.node].args[0]]]
            if ep.bias:
                args.append(graph.get_attr(site.shift))
            if ep.add:
                args.append(env[by_name[site.residual]])
            env[node] = graph.call_module(f"{CONTAINER}.{target}", tuple(args))
            continue
        if node.name in skip:
            if node.name in dropped and node.args[0] in env:
                env[node] = env[node.args[0]]  # a dropped BN passes its input through
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    model.__dict__[CONTAINER] = container  # reachable as an attribute, not a submodule: named_modules unchanged
    graph.lint()
    gm = fx.GraphModule(model, graph)
    model.__dict__["forward"] = types.MethodType(type(gm).forward, model)
    fplan.fused = {conv: ep.chain for conv, (_e, _m, ep) in fused.items()}


def uninstall(model: nn.Module) -> None:
    """Back to the class's own forward (the folded weights stay: the function is the same)."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop(CONTAINER, None)


def installed(model: nn.Module) -> bool:
    return "forward" in model.__dict__ and CONTAINER in model.__dict__


def shapes_of(model: nn.Module, names: Iterable[str], example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Input shape of each named module on one pass of ``example``."""
    seen: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name in names:
        def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
            seen.setdefault(name, tuple(args[0].shape))

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen
