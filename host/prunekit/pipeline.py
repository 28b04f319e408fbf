"""A pipeline: one component per stage, composed from the registry, driving masks on a model.

Library use inside your own training loop::

    pipe = prunekit.load_pipeline("han-lenet")
    pipe.attach(model, calibration=batches)  # masks (all-keep); batches only if a component needs data
    pipe.check(example=x)                   # dry run of every stage on a copy: fails in seconds
    for epoch in range(pipe.epochs):
        pipe.step(epoch)                    # the schedule decides: update masks, rewind, snapshot
        train_one_epoch(model)
        pipe.save("state.pt")               # masks, permutations, snapshots, schedule position
    pipe.finalize()                         # bake W * mask into the weights
    pipe.compile(example=x)                 # swap layers for kernel modules (same function)
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import pluggy
import torch
from torch import nn

from prunekit import fusion, hookspecs
from prunekit.atomic import atomic_torch_save
from prunekit.calibration import NEEDS, Calibration, as_calibration, collect
from prunekit.errors import (
    CheckpointError,
    ComponentError,
    MissingComponentError,
    PrunekitError,
    RegistryError,
    SelectionError,
)
from prunekit.masking import WeightMask, attach_mask, bake, mask_of, raw_weight
from prunekit.plugins import ComponentInfo, installed_components
from prunekit.records import CompiledLayer, LayerInfo, LayerStats, Layout, ScheduleDecision, Selection
from prunekit.registry import PipelineSpec, Registry, describe_structure_error, load_registry, strict_converter
from prunekit.verify import capture_io, check_tolerance, layer_errors, max_rel_err

STATE_FORMAT = "prunekit-state/2"
READABLE_STATES = ("prunekit-state/1", STATE_FORMAT)


@attrs.define
class HostParams:
    """Pipeline parameters the host itself reads (the rest belong to components).

    Layer selection defaults: every ``nn.Conv2d`` and ``nn.Linear`` whose name matches ``include`` and no
    ``exclude`` glob; grouped/depthwise convs are skipped; ``keep_first_dense`` / ``keep_last_dense``
    leave the first conv and the final classifier dense. ``calibration_batches``: how many seeded
    training batches ``prunekit run`` draws for components that need data. ``tolerance``: overrides the
    kernel component's accepted relative error of the compiled model. ``strict``: a layer the select
    stage cannot take (``SelectionError``: Cout not divisible by N, depthwise, too small) fails the run;
    by default it stays dense and the report says why. ``fuse``: with a kernel component that declares
    ``epilogues``, fold eval-mode BatchNorm into the convs at ``finalize`` and let the kernel fuse what follows
    each conv (BN shift, residual add, ReLU/ReLU6, max pooling) into its output; the model then runs a
    rewritten forward (``prunekit.fusion``). No effect with other kernels or without a kernel stage.
    """

    sparsity: float = 0.5
    include: list[str] = attrs.field(factory=lambda: ["*"])
    exclude: list[str] = attrs.field(factory=list)
    keep_first_dense: bool = False
    keep_last_dense: bool = False
    skip_grouped: bool = True
    seed: int = 0
    epochs: int = 4
    lr: float = 0.01
    optimizer: str = "sgd"
    model: str = "lenet"
    dense_epochs: int = 15
    batch_size: int = 64
    calibration_batches: int = 4
    tolerance: float | None = None
    strict: bool = False
    fuse: bool = True

    def __attrs_post_init__(self) -> None:
        check_sparsity(self.sparsity, "sparsity")
        if self.optimizer not in ("sgd", "adam"):
            raise PrunekitError(f"optimizer = '{self.optimizer}' is unknown; use 'sgd' or 'adam'")
        if self.epochs < 1 or self.dense_epochs < 0 or self.batch_size < 1:
            raise PrunekitError("epochs must be >= 1, dense_epochs >= 0 and batch_size >= 1")
        if self.calibration_batches < 1:
            raise PrunekitError(f"calibration_batches = {self.calibration_batches}; use 1 or more")
        if self.tolerance is not None and not self.tolerance > 0:
            raise PrunekitError(f"tolerance = {self.tolerance}; give a relative error > 0 such as 1e-4")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise PrunekitError(f"lr = {self.lr}; give a finite learning rate > 0")


def check_sparsity(value: float, what: str) -> None:
    if not 0.0 <= value < 1.0:
        raise PrunekitError(f"{what} = {value} is outside [0, 1); use e.g. 0.75 for 75% of weights removed")


@attrs.define
class LayerState:
    info: LayerInfo
    module: nn.Module
    selection: Selection | None = None
    compiled: CompiledLayer | None = None
    layout: Layout | None = None


@attrs.frozen
class LeftDense:
    """A prunable layer the host's selection policy did not select, and why."""

    shape: tuple[int, ...]
    reason: str


@attrs.frozen
class CheckReport:
    """What ``Pipeline.check`` found: every stage ran on every layer of a copy of the model."""

    layers: int
    kernels: dict[str, str]
    max_rel_err: float | None
    layer_errors: dict[str, float]
    seconds: float


def _component_params_fields(cls: type) -> set[str]:
    params_cls = getattr(cls, "Params", None)
    return {f.name for f in attrs.fields(params_cls)} if params_cls is not None else set()


def resolved_padding(name: str, module: nn.Conv2d) -> tuple[int, int]:
    """Numeric padding, also for ``padding='same'|'valid'`` (kernels read LayerInfo.padding)."""
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    if any(t % 2 for t in total):
        raise SelectionError(
            f"layer {name}: padding='same' with an even kernel pads asymmetrically, which no kernel here supports; "
            "exclude the layer or give numeric padding"
        )
    return (total[0] // 2, total[1] // 2)


def layer_info(name: str, module: nn.Module, index: int = 0, count: int = 1) -> LayerInfo:
    w = module.weight
    if isinstance(module, nn.Conv2d):
        return LayerInfo(
            name=name,
            kind="conv2d",
            weight_shape=tuple(w.shape),
            has_bias=module.bias is not None,
            stride=tuple(module.stride),
            padding=resolved_padding(name, module),
            dilation=tuple(module.dilation),
            groups=module.groups,
            index=index,
            count=count,
        )
    return LayerInfo(name=name, kind="linear", weight_shape=tuple(w.shape), has_bias=module.bias is not None, index=index, count=count)


def mask_keys(model: nn.Module) -> set[str]:
    """state_dict keys of prunekit's mask buffers (what a rewind must not touch)."""
    return {f"{name}.mask" for name, mod in model.named_modules() if isinstance(mod, WeightMask)}


def plugin_manager() -> pluggy.PluginManager:
    """An empty plugin manager holding prunekit's stage hookspecs."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def load_component(pm: pluggy.PluginManager, stage: str, info: ComponentInfo) -> Any:
    """Instantiate one installed component and register it in ``pm``; a broken plugin is one RegistryError
    naming it (shared by Pipeline and prunekit.export.load_compiled)."""
    info.check_unique()
    where = f"component {stage}.{info.name} from {info.distribution}"
    try:
        obj = info.load()()
    except Exception as exc:  # a broken plugin must not look like a host bug
        raise RegistryError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
    hook = hookspecs.STAGE_GROUPS[stage][1]
    if not hasattr(obj, hook):
        raise RegistryError(f"{where} does not implement {hook}; add a method {hook} decorated with @prunekit.hookimpl")
    try:
        pm.register(obj, name=f"{stage}:{info.name}")
    except pluggy.PluginValidationError as exc:
        spec_args = ", ".join(getattr(pm.hook, hook).spec.argnames)
        raise RegistryError(f"{where}: {hook} takes an argument the spec does not have ({exc}); "
                            f"the spec's arguments are: {spec_args}") from None  # fmt: skip
    return obj


def call_stage(pm: pluggy.PluginManager, stage: str, info: ComponentInfo, layer_name: str | None = None, /,
               **kwargs: Any) -> Any:  # fmt: skip
    """Call one stage's hook in ``pm``; every failure becomes one line naming stage, component, distribution,
    layer (shared by Pipeline and prunekit.export.load_compiled)."""
    hook_name = hookspecs.STAGE_GROUPS[stage][1]
    base = f"{stage} component '{info.name}' ({info.distribution} {info.version})"
    where = base if layer_name is None else f"{base}, layer {layer_name}"
    try:
        out = getattr(pm.hook, hook_name)(**kwargs)
    except PrunekitError as exc:
        text = str(exc)  # the component's own message; add only what it does not say
        msg = f"{base if layer_name is not None and layer_name in text else where}: {text}"
        try:
            err = type(exc)(msg)
        except Exception:
            err = PrunekitError(msg)
        raise err from None
    except Exception as exc:
        raise ComponentError(
            f"{where} raised {type(exc).__name__}: {exc}; this is a bug in {info.distribution}: report it there"
        ) from exc
    expected = hookspecs.RETURNS[stage]
    if not isinstance(out, expected):
        got = "None" if out is None else type(out).__name__
        raise ComponentError(f"{where} returned {got}; {hook_name} must return a {expected.__name__}")
    return out


class Pipeline:
    """One composed pipeline: its plugin manager, parameters and (once attached) the model's masks."""

    def __init__(self, name: str, spec: PipelineSpec, registry: Registry) -> None:
        self.name = name
        self.spec = spec
        self.registry = registry
        self.pm = plugin_manager()
        self.components: dict[str, Any] = {}
        self.infos: dict[str, ComponentInfo] = {}
        self.component_params: dict[str, Any] = {}
        self._load_components()
        self.host = self._structure_params()
        self._needs = {stage: self._declared_needs(stage, obj) for stage, obj in self.components.items()}
        self.model: nn.Module | None = None
        self.layers: dict[str, LayerState] = {}
        self.left_dense: dict[str, LeftDense] = {}  # prunable layers the host policy did not select
        self.position = 0  # next step to run
        self.decisions: list[ScheduleDecision] = []
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.calibration: Calibration | None = None
        self.fusion: fusion.FusionPlan | None = None  # set by finalize() when the kernel fuses epilogues
        self.fusion_note = ""  # why there is no fusion plan, when fuse is on and there is none

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, name: str | None = None, registry: str | os.PathLike[str] | Registry | None = None) -> Pipeline:
        reg = registry if isinstance(registry, Registry) else load_registry(registry)
        name, spec = reg.pipeline(name)
        return cls(name, spec, reg)

    def _load_components(self) -> None:
        found = installed_components()
        for stage, comp in self.spec.components().items():
            info = found.get((stage, comp))
            if info is None:
                raise self._missing(stage, comp, found)
            self.components[stage] = load_component(self.pm, stage, info)
            self.infos[stage] = info

    def _missing(self, stage: str, comp: str, found: dict) -> RegistryError:
        where = f"{self.registry.source}: pipelines.{self.name}.{stage}"
        provider = self.registry.provider(stage, comp)
        if provider is not None:
            dist, _ = provider
            return MissingComponentError(
                f"{where}: component '{comp}' is not installed; it comes with {dist}: {self.registry.install_hint(dist)}"
            )
        have = sorted(n for (s, n) in found if s == stage)
        return RegistryError(
            f"{where}: unknown component '{comp}'; installed {stage} components: {', '.join(have) or 'none'}"
        )

    def _structure_params(self) -> HostParams:
        raw = dict(self.spec.params)
        where = f"{self.registry.source}: pipelines.{self.name}.params"
        host_fields = {f.name for f in attrs.fields(HostParams)}
        claimed = set(host_fields)
        merged_host: dict[str, Any] = {}
        for obj in self.components.values():
            merged_host.update(getattr(obj, "host_defaults", {}) or {})
            claimed |= _component_params_fields(type(obj))
        unknown = sorted(set(raw) - claimed)
        if unknown:
            raise RegistryError(
                f"{where}: unknown parameter(s) {', '.join(unknown)}; known here: {', '.join(sorted(claimed))}"
            )
        conv = strict_converter()
        for stage, obj in self.components.items():
            params_cls = getattr(type(obj), "Params", None)
            if params_cls is None:
                self.component_params[stage] = None
                continue
            mine = {k: v for k, v in raw.items() if k in _component_params_fields(type(obj))}
            try:
                self.component_params[stage] = conv.structure(mine, params_cls)
            except PrunekitError as exc:
                raise RegistryError(f"{where}: {exc}") from None
            except Exception as exc:
                raise RegistryError(f"{where} ({stage}.{self.spec.component(stage)}): {describe_structure_error(exc, 'params')}") from None
        host_raw = {**merged_host, **{k: v for k, v in raw.items() if k in host_fields}}
        try:
            return conv.structure(host_raw, HostParams)
        except PrunekitError as exc:
            raise RegistryError(f"{where}: {exc}") from None
        except Exception as exc:
            raise RegistryError(f"{where}: {describe_structure_error(exc, 'params')}") from None

    # ---------------------------------------------------------------- properties

    @property
    def has_kernel(self) -> bool:
        return "kernel" in self.components

    @property
    def epochs(self) -> int:
        return self.host.epochs

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def _declared_needs(self, stage: str, obj: Any) -> frozenset[str]:
        """A component's ``needs``: a set, or a method of its params (a criterion chosen by a parameter)."""
        needs = getattr(obj, "needs", ()) or ()
        if callable(needs):
            needs = needs(self.component_params.get(stage)) or ()
        needs = frozenset(needs)
        if needs - set(NEEDS):
            raise RegistryError(
                f"component {stage}.{self.spec.component(stage)} from {self.infos[stage].distribution}: needs = "
                f"{sorted(needs)} names unknown statistics {sorted(needs - set(NEEDS))}; known: {', '.join(NEEDS)}"
            )
        return needs

    @property
    def needs(self) -> frozenset[str]:
        """Calibration statistics any component of this pipeline declared (see prunekit.calibration)."""
        return frozenset().union(*self._needs.values())

    def needers(self, need: str) -> list[str]:
        """``stage.component`` names that declared ``need``."""
        return [f"{s}.{self.spec.component(s)}" for s, n in self._needs.items() if need in n]

    @property
    def tolerance(self) -> float:
        """Largest accepted relative error of the compiled model: the ``tolerance`` param, else the kernel
        component's own, else ``hookspecs.DEFAULT_TOLERANCE``."""
        if self.host.tolerance is not None:
            return self.host.tolerance
        kernel = self.components.get("kernel")
        tol = getattr(kernel, "tolerance", None)
        if callable(tol):
            tol = tol(self.component_params.get("kernel"))
        return float(tol) if tol is not None else hookspecs.DEFAULT_TOLERANCE

    def describe(self) -> dict[str, Any]:
        return {
            "pipeline": self.name,
            "description": self.spec.description,
            "components": self.spec.components(),
            "params": dict(self.spec.params),
        }

    # ---------------------------------------------------------------- calling components

    def _call(self, stage: str, layer_name: str | None = None, /, **kwargs: Any) -> Any:
        """Call one stage's hook; every failure becomes one line naming stage, component, distribution, layer."""
        return call_stage(self.pm, stage, self.infos[stage], layer_name, **kwargs)

    # ---------------------------------------------------------------- attaching

    def select_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        h = self.host
        candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n]
        if not candidates:
            raise SelectionError("the model has no prunable layer (no nn.Conv2d or nn.Linear); prune a model that has one")
        convs = [n for n, m in candidates if isinstance(m, nn.Conv2d)]
        first = convs[0] if convs else None
        last = candidates[-1][0]
        chosen = []
        self.left_dense = {}
        for name, mod in candidates:
            reason = ""
            if not any(fnmatch.fnmatchcase(name, p) for p in h.include):
                reason = f"not in include {h.include}"
            elif any(fnmatch.fnmatchcase(name, p) for p in h.exclude):
                reason = f"matches exclude {h.exclude}"
            elif h.keep_first_dense and name == first:
                reason = "first conv (keep_first_dense)"
            elif h.keep_last_dense and name == last:
                reason = "classifier (keep_last_dense)"
            elif isinstance(mod, nn.Conv2d) and mod.groups != 1 and h.skip_grouped:
                reason = f"grouped conv, groups={mod.groups} (skip_grouped)"
            elif isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
                reason = f"padding_mode={mod.padding_mode}: no kernel computes it"
            if reason:
                self.left_dense[name] = LeftDense(tuple(mod.weight.shape), reason)
            else:
                chosen.append((name, mod))
        if not chosen:
            names = ", ".join(n for n, _ in candidates[:8]) + (" ..." if len(candidates) > 8 else "")
            raise SelectionError(
                f"pipeline {self.name}: include={h.include} exclude={h.exclude} selects no layer of {names}; "
                "widen include or shorten exclude"
            )
        return chosen

    def attach(self, model: nn.Module, calibration: Iterable[Any] | Calibration | None = None) -> list[LayerInfo]:
        """Put all-keep masks on the selected layers of ``model``; returns their LayerInfo.

        ``calibration``: batches (``x`` or ``(x, y)``) for components that declare ``needs``; see
        ``set_calibration``.
        """
        chosen = self.select_layers(model)
        self.model = model
        self.layers = {}
        self.snapshots = {}
        for i, (name, mod) in enumerate(chosen):
            attach_mask(mod)
            self.layers[name] = LayerState(layer_info(name, mod, i, len(chosen)), mod)
        if calibration is not None:
            self.set_calibration(calibration)
        return [s.info for s in self.layers.values()]

    def set_calibration(self, batches: Iterable[Any] | Calibration, loss: Callable | None = None) -> None:
        """Batches the host runs through the model before each mask update when a component declares
        ``needs``: an iterable of ``x`` or ``(x, y)`` (``"grads"`` needs labels); ``loss(logits, y)``
        defaults to cross-entropy. Materialised once, so a DataLoader is read only here."""
        self.calibration = as_calibration(batches, loss)
        if "grads" in self.needs and not self.calibration.has_labels:
            raise PrunekitError(
                f"pipeline {self.name}: {', '.join(self.needers('grads'))} needs gradients, which need labels; "
                "pass (x, y) batches to set_calibration"
            )

    def _require_attached(self) -> None:
        if self.model is None:
            raise PrunekitError("the pipeline is not attached to a model; call pipeline.attach(model) first")

    def _generator(self, step: int, index: int) -> torch.Generator:
        digest = hashlib.sha256(f"{self.host.seed}:{step}:{index}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    # ---------------------------------------------------------------- the schedule

    def decide(self, step: int, total_steps: int | None = None) -> ScheduleDecision:
        total = self.host.epochs if total_steps is None else total_steps
        return self._call(
            "schedule", step=step, total_steps=total, target=self.host.sparsity, params=self.component_params["schedule"]
        )

    def plan(self, total_steps: int | None = None) -> list[ScheduleDecision]:
        """Every step's decision up front (schedules are pure): checks the schedule fits the run and that
        every rewind has a snapshot to go back to."""
        total = self.host.epochs if total_steps is None else total_steps
        decisions = [self.decide(s, total) for s in range(total)]
        have = set(self.snapshots)
        for d in decisions:
            if d.rewind:  # the host rewinds before it snapshots within one step
                want = d.rewind_step
                if not (have if want is None else want in have):
                    raise PrunekitError(
                        f"schedule '{self.spec.schedule}' asks to rewind at step {d.step} to "
                        f"{'the latest snapshot' if want is None else f'step {want}'}, but no snapshot is taken "
                        "before it; set the schedule's rewind step at or before its first rewind"
                    )
            if d.snapshot:
                have.add(d.step)
        return decisions

    def step(self, step: int | None = None, total_steps: int | None = None) -> ScheduleDecision:
        """Advance the schedule to ``step`` (default: the next one) and act on its decision, in order:
        update masks, rewind to a snapshot, take a snapshot (see ``ScheduleDecision``)."""
        self._require_attached()
        step = self.position if step is None else step
        decision = self.decide(step, total_steps)
        if decision.update:
            self.prune(decision.sparsity, step=step)
        if decision.rewind:
            self.rewind(decision.rewind_step)
        if decision.snapshot:
            self.take_snapshot(step)
        self.decisions.append(decision)
        self.position = step + 1
        return decision

    # ---------------------------------------------------------------- snapshots and rewinding

    @torch.no_grad()
    def take_snapshot(self, step: int) -> None:
        """Save every parameter and buffer of the model (masks excepted) as the rewind point of ``step``."""
        self._require_attached()
        skip = mask_keys(self.model)
        self.snapshots[step] = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k not in skip}

    @torch.no_grad()
    def rewind(self, to_step: int | None = None) -> int:
        """Restore the snapshot of ``to_step`` (default: the latest) into the model; masks stay, so the
        effective weights become ``snapshot * mask``. Returns the step rewound to."""
        self._require_attached()
        if not self.snapshots:
            raise PrunekitError(f"pipeline {self.name}: rewind asked but no snapshot was taken; the schedule must snapshot first")
        step = max(self.snapshots) if to_step is None else to_step
        if step not in self.snapshots:
            raise PrunekitError(f"pipeline {self.name}: no snapshot at step {step} (have {sorted(self.snapshots)})")
        snap = self.snapshots[step]
        current = self.model.state_dict()
        skip = mask_keys(self.model)
        missing = sorted(k for k in current if k not in skip and k not in snap)
        if missing:
            raise CheckpointError(
                f"pipeline {self.name}: the snapshot of step {step} lacks {', '.join(missing[:4])}; "
                "the model changed after the snapshot (finalize/compile), so it cannot be rewound"
            )
        for k, t in current.items():
            if k not in skip:
                t.copy_(snap[k].to(t.device))
        return step

    # ---------------------------------------------------------------- masks

    def _stats(self) -> dict[str, LayerStats]:
        needs = self.needs
        if not needs:
            return {}
        if self.calibration is None:
            raise PrunekitError(
                f"pipeline {self.name}: {', '.join(self.needers(next(iter(sorted(needs)))))} needs calibration data "
                f"({', '.join(sorted(needs))}); pass batches: pipeline.attach(model, calibration=batches) or "
                "pipeline.set_calibration(batches)"
            )
        return collect(self.model, {n: st.module for n, st in self.layers.items()}, self.calibration, needs)

    @torch.no_grad()
    def prune(self, sparsity: float, step: int = 0) -> dict[str, Selection]:
        """Score and select every layer at ``sparsity`` now (what ``step`` does when the schedule says so).

        Calibration statistics (when a component needs them) are computed once here, for all layers."""
        self._require_attached()
        check_sparsity(sparsity, "sparsity")
        sp, ss = self.component_params["score"], self.component_params["select"]
        stats = self._stats()
        all_scores: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        unscored: dict[str, str] = {}  # layers the score stage cannot take (kept dense unless strict)
        for name, st in self.layers.items():
            w = raw_weight(st.module).detach()
            weights[name] = w
            mask = mask_of(st.module).mask.bool() if st.selection is not None else None
            bad = w.numel() - int(torch.count_nonzero(torch.isfinite(w)))
            if bad:  # W * mask keeps NaN * 0 = NaN while a kernel drops the weight: no select may take it
                msg = (f"layer {name}: {bad} of {w.numel()} weights are NaN or infinite; fix the weights first "
                       "(after training this usually means it diverged: lower lr); the layer stays dense unless strict = true")  # fmt: skip
                if self.host.strict:
                    raise SelectionError(msg)
                unscored[name] = msg
                continue
            try:
                all_scores[name] = self._call(
                    "score", name, layer=st.info, weight=w, mask=mask, params=sp,
                    generator=self._generator(step, st.info.index), stats=stats.get(name),
                )  # fmt: skip
            except SelectionError as exc:
                if self.host.strict:
                    raise
                unscored[name] = str(exc)
        out = {}
        for name, st in self.layers.items():
            if name in unscored:
                sel = Selection(mask=torch.ones_like(weights[name], dtype=torch.bool), dense_reason=unscored[name])
            else:
                sel = self._select(name, st, weights[name], all_scores, sparsity, step, ss, stats.get(name))
            if sel.mask.shape != weights[name].shape or sel.mask.dtype != torch.bool:
                raise SelectionError(
                    f"select component '{self.spec.select}' returned a {sel.mask.dtype} mask of shape "
                    f"{tuple(sel.mask.shape)} for layer {name} {tuple(weights[name].shape)}; it must be bool, same shape"
                )
            mask_of(st.module).set(sel.mask, sel.soft, sel.pruned_decay)
            st.selection = sel
            out[name] = sel
        return out

    def _select(self, name: str, st: LayerState, weight: torch.Tensor, all_scores: dict[str, torch.Tensor],
                sparsity: float, step: int, params: Any, stats: LayerStats | None) -> Selection:  # fmt: skip
        """One layer's select call; a layer it cannot take stays dense with the reason (unless strict)."""
        try:
            return self._call(
                "select", name, layer=st.info, weight=weight, scores=all_scores[name], sparsity=sparsity,
                target=max(self.host.sparsity, sparsity), previous=st.selection, params=params,
                generator=self._generator(step + 1_000_003, st.info.index), all_scores=all_scores, stats=stats,
            )  # fmt: skip
        except SelectionError as exc:
            if self.host.strict:
                raise
            return Selection(mask=torch.ones_like(weight, dtype=torch.bool), dense_reason=str(exc))

    def sparsity(self) -> float:
        """Fraction of all selected layers' weights currently pruned (0 before the first selection)."""
        kept = total = 0
        for st in self.layers.values():
            n = math.prod(st.info.weight_shape)
            kept += int(st.selection.mask.sum()) if st.selection is not None else n
            total += n
        return 1.0 - kept / max(total, 1)

    # ---------------------------------------------------------------- checking before training

    def clone(self) -> Pipeline:
        """A fresh pipeline of the same spec and (possibly edited) host parameters, not attached."""
        other = Pipeline(self.name, self.spec, self.registry)
        other.host = attrs.evolve(self.host)
        other.calibration = self.calibration
        return other

    def check(self, model: nn.Module | None = None, example: torch.Tensor | None = None) -> CheckReport:
        """Dry run of every stage on a copy of ``model`` (default: the attached one) with its current
        weights: the schedule's plan, score and select at the target sparsity, layout and kernel for
        every layer, and (with ``example``) the compiled copy against the masked dense copy.

        Fails in seconds, with the error a full run would hit after training: a layout that cannot take
        the selection's block shape, a kernel/layout pair that does not match, a kernel above tolerance.
        """
        import time

        t0 = time.perf_counter()
        model = self.model if model is None else model
        if model is None:
            raise PrunekitError("check() needs a model: pass one or attach the pipeline first")
        probe = self.clone()
        twin = copy.deepcopy(model)
        probe.attach(twin)
        probe.plan(self.host.epochs)
        probe.prune(self.host.sparsity, step=0)
        # no finalize(): removing a parametrization from the copy would delete the weight property
        # of the class it shares with the original module; the parametrized weight is already W * mask
        kernels: dict[str, str] = {}
        err, errs = None, {}
        if self.has_kernel:
            captured: dict = {}
            ref_out = None
            if example is not None:
                twin.eval()
                ref_out, captured = capture_io(twin, list(probe.layers), example)
            states = probe._compile_layers(example)
            kernels = {st.info.name: st.compiled.kernel for st in states if st.compiled is not None}
            if example is not None:
                with torch.inference_mode():
                    err = max_rel_err(twin(example), ref_out)
                errs = layer_errors(twin, {n: io for n, io in captured.items() if n in kernels})
                check_tolerance(f"pipeline {self.name} (check before training)", err, errs, kernels, self.tolerance)
        return CheckReport(len(probe.layers), kernels, err, errs, time.perf_counter() - t0)

    # ---------------------------------------------------------------- finishing

    def finalize(self) -> None:
        """Bake ``W * mask`` into every selected layer's weight and drop the parametrizations.

        With ``fuse`` and a kernel that declares ``epilogues``, also fold every eval-mode BatchNorm into the
        conv before it (``prunekit.fusion.fold_batchnorm``: same function, same state_dict keys; the model is
        then for inference) and find each conv's epilogue, which ``compile`` fuses."""
        self._require_attached()
        for st in self.layers.values():
            bake(st.module)
        if self.fusion is None and self.host.fuse and self.has_kernel and self._declared_epilogues():
            self.fusion, self.fusion_note = fusion.plan(self.model)

    def _declared_epilogues(self) -> frozenset[str]:
        return fusion.declared_epilogues(self.components["kernel"], self.component_params.get("kernel"))

    @torch.no_grad()
    def record_input_shapes(self, example: torch.Tensor) -> None:
        """Run ``example`` through the model once and note each selected layer's input shape in LayerInfo
        (kernels use it to choose tiles or decide a dense fallback on the real size)."""
        self._require_attached()
        seen: dict[str, tuple[int, ...]] = {}

        def note(name: str):  # noqa: ANN202
            def hook(_module: nn.Module, args: tuple) -> None:  # returns None: the input is left unchanged
                seen.setdefault(name, tuple(args[0].shape))

            return hook

        hooks = [st.module.register_forward_pre_hook(note(name)) for name, st in self.layers.items()]
        was_training = self.model.training
        try:
            self.model.eval()
            self.model(example)
        finally:
            self.model.train(was_training)
            for hk in hooks:
                hk.remove()
        for name, shape in seen.items():
            st = self.layers[name]
            st.info = attrs.evolve(st.info, input_shape=shape)

    @torch.no_grad()
    def compile(self, example: torch.Tensor | None = None) -> list[LayerState]:
        """Replace each selected layer by its kernel module (finalizes first). No kernel stage: no change.

        Layers never pruned, or left dense by the select stage (``Selection.dense_reason``), stay as they
        are. ``example`` (one input batch) lets kernels see each layer's real input size.
        """
        self._require_attached()
        self.finalize()
        states = self._compile_layers(example)
        if self.fusion is not None:
            self._install_fusion(example)
        return states

    @torch.no_grad()
    def _compile_layers(self, example: torch.Tensor | None) -> list[LayerState]:
        if not self.has_kernel:
            return list(self.layers.values())
        if example is not None:
            self.record_input_shapes(example)
        lp, kp = self.component_params["layout"], self.component_params["kernel"]
        declared = self._declared_epilogues() if self.fusion is not None else frozenset()
        for name, st in self.layers.items():
            if st.selection is None or st.selection.dense_reason:
                continue
            if declared and st.info.kind == "conv2d":
                st.info = attrs.evolve(st.info, epilogue=self.fusion.epilogue(name, declared).chain)
            w = st.module.weight.detach()
            layout = self._call("layout", name, layer=st.info, weight=w, selection=st.selection, params=lp)
            bias = st.module.bias.detach() if getattr(st.module, "bias", None) is not None else None
            compiled = self._call("kernel", name, layer=st.info, layout=layout, bias=bias, params=kp)
            st.layout, st.compiled = layout, compiled
            _replace_module(self.model, name, compiled.module)
        return list(self.layers.values())

    @torch.no_grad()
    def _install_fusion(self, example: torch.Tensor | None) -> None:
        """Collect the fused modules (the kernel's, for compiled layers; for layers the host or the select stage
        kept dense, offer them to the kernel with a dense layout) and give the model the fused forward."""
        plan, declared = self.fusion, self._declared_epilogues()
        lp, kp = self.component_params["layout"], self.component_params["kernel"]
        fused: dict[str, tuple[nn.Module, nn.Module, fusion.Epilogue]] = {}
        offered: list[tuple[str, fusion.Epilogue, str]] = []
        plan.notes = {}
        for conv, site in plan.sites.items():
            if not site.epilogue.ops:
                continue
            st = self.layers.get(conv)
            if st is not None and st.compiled is not None:
                ep = fusion.parse_epilogue(st.info.epilogue)
                if ep.ops and st.compiled.fused is not None:
                    fused[conv] = (st.compiled.module, st.compiled.fused, ep)
                else:
                    plan.notes[conv] = (f"kernel '{self.spec.kernel}' declared no prefix of {site.epilogue.chain}" if not ep.ops
                                        else f"kernel '{self.spec.kernel}' returned no fused module for {ep.chain}")  # fmt: skip
                continue
            ep = fusion.best_supported(site.epilogue, declared)
            if not ep.ops:
                plan.notes[conv] = f"kernel '{self.spec.kernel}' declared no prefix of {site.epilogue.chain}"
                continue
            why = (self.left_dense[conv].reason if conv in self.left_dense else
                   st.selection.dense_reason if st is not None and st.selection is not None else "not pruned")  # fmt: skip
            offered.append((conv, ep, why))
        shapes = fusion.shapes_of(self.model, [c for c, _, _ in offered], example) if offered and example is not None else {}
        for conv, ep, why in offered:
            mod = self.model.get_submodule(conv)
            try:
                info = attrs.evolve(layer_info(conv, mod), epilogue=ep.chain, input_shape=shapes.get(conv))
                sel = Selection(mask=torch.ones_like(mod.weight, dtype=torch.bool), dense_reason=why)
                layout = self._call("layout", conv, layer=info, weight=mod.weight.detach(), selection=sel, params=lp)
                bias = mod.bias.detach() if mod.bias is not None else None
                built = self._call("kernel", conv, layer=info, layout=layout, bias=bias, params=kp)
            except PrunekitError as exc:  # a dense layer the layout or kernel cannot take stays as it is
                plan.notes[conv] = str(exc)
                continue
            if built.fused is not None:
                fused[conv] = (mod, built.fused, ep)
            else:
                plan.notes[conv] = f"kernel '{self.spec.kernel}' returned no fused module for dense {ep.chain}"
        fusion.install(self.model, plan, fused)

    def kernels(self) -> dict[str, str]:
        """``{layer: kernel}`` of the compiled layers."""
        return {n: st.compiled.kernel for n, st in self.layers.items() if st.compiled is not None}

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        masks, perms, meta = {}, {}, {}
        for name, st in self.layers.items():
            if st.selection is None:
                continue
            masks[name] = st.selection.mask.clone()
            for d, p in enumerate(st.selection.perms):
                if p is not None:
                    perms[f"{name}#{d}"] = p.clone()
            meta[name] = {
                "block": list(st.selection.block),
                "soft": st.selection.soft,
                "pruned_decay": st.selection.pruned_decay,
                "pattern": st.selection.pattern,
                "dense_reason": st.selection.dense_reason,
                "ndim": len(st.selection.perms),
                "meta": st.selection.meta,
            }
        return {
            "format": STATE_FORMAT,
            "pipeline": self.name,
            "position": torch.tensor(self.position),
            "masks": masks,
            "perms": perms,
            "meta": json.dumps(meta, default=str),
            "snapshots": {str(step): dict(snap) for step, snap in self.snapshots.items()},
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write masks, permutations, snapshots and schedule position atomically (temp file, then rename)."""
        atomic_torch_save(self.state_dict(), Path(path))

    def load_state(self, path: str | os.PathLike[str]) -> None:
        """Restore a saved state onto the attached model (safe: ``torch.load(weights_only=True)``).

        Everything is checked before anything is applied, so a state that does not fit leaves the
        pipeline as it was."""
        self._require_attached()
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such pruning state; check the path") from None
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable prunekit state ({type(exc).__name__}); re-create it with save()") from None
        self.load_state_dict(state, source=str(path))

    def load_state_dict(self, state: Any, source: str = "the state") -> None:
        """Restore a state from ``state_dict()`` (in memory) onto the attached model; checked first, so a
        state that does not fit leaves the pipeline as it was (``CheckpointError`` naming ``source``)."""
        self._require_attached()
        path = source
        if not isinstance(state, dict) or state.get("format") not in READABLE_STATES:
            raise CheckpointError(f"{path}: not a {STATE_FORMAT} file; re-create it with pipeline.save()")
        if state.get("pipeline") != self.name:
            raise CheckpointError(f"{path}: saved by pipeline {str(state.get('pipeline'))[:80]!r}, not '{self.name}'; load it with that pipeline")
        try:  # parse everything first: a damaged state raises here, before any mask is changed
            selections, snapshots, position = self._parse_state(state, path)
        except CheckpointError:
            raise
        except Exception as exc:  # missing keys, wrong types: the file's fault, one line naming it
            raise CheckpointError(f"{path}: damaged pruning state ({type(exc).__name__}: {str(exc)[:120]}); "
                                  "re-create it with pipeline.save()") from None  # fmt: skip
        for name, sel in selections.items():
            st = self.layers[name]
            mask_of(st.module).set(sel.mask, sel.soft, sel.pruned_decay)
            st.selection = sel
        self.snapshots = snapshots
        self.position = position

    def _parse_state(self, state: dict[str, Any], path: str) -> tuple[dict[str, Selection], dict[int, dict[str, torch.Tensor]], int]:
        """The Selections, snapshots and position a state holds, every one checked against the attached model."""
        meta = json.loads(state["meta"])
        masks, perms_of = state["masks"], state["perms"]
        if not isinstance(meta, dict) or not isinstance(masks, dict) or not isinstance(perms_of, dict):
            raise TypeError("meta, masks and perms must be mappings")
        for name, mask in masks.items():
            st = self.layers.get(name)
            if st is None or not isinstance(mask, torch.Tensor) or tuple(mask.shape) != st.info.weight_shape:
                what = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise CheckpointError(f"{path}: layer {name} {what} does not fit this model; attach the model it was saved from")
        snapshots = {int(k): v for k, v in state.get("snapshots", {}).items()}
        current = self.model.state_dict()
        for step, snap in snapshots.items():
            for k, t in snap.items():
                if k not in current or not isinstance(t, torch.Tensor) or current[k].shape != t.shape:
                    raise CheckpointError(f"{path}: snapshot of step {step} holds {k}, which this model lacks or shapes "
                                          "otherwise; attach the model it was saved from")  # fmt: skip
        selections = {}
        for name, mask in masks.items():
            m = meta[name]
            perms = tuple(perms_of.get(f"{name}#{d}") for d in range(int(m["ndim"])))
            for d, p in enumerate(perms):
                if p is not None and (not isinstance(p, torch.Tensor) or p.numel() != self.layers[name].info.weight_shape[d]):
                    raise CheckpointError(f"{path}: layer {name}: permutation of dim {d} does not fit; re-create it with pipeline.save()")
            sel = Selection(
                mask=mask.bool(), perms=perms, block=tuple(m["block"]), soft=bool(m["soft"]),
                pruned_decay=float(m["pruned_decay"]), pattern=str(m.get("pattern", "")),
                dense_reason=str(m.get("dense_reason", "")), meta=dict(m["meta"]),
            )  # fmt: skip
            selections[name] = sel
        return selections, snapshots, int(state["position"])

    # ---------------------------------------------------------------- shipping the compiled model

    def export(
        self,
        path: str | os.PathLike[str],
        *,
        model_name: str | None = None,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        onnx: str | os.PathLike[str] | None = None,
        example: torch.Tensor | None = None,
    ) -> Any:
        """Write the compiled model (after ``compile``) as one safetensors artifact that
        ``prunekit.load_compiled`` rebuilds with only the layout and kernel components installed; see
        ``prunekit.export``. ``model_name`` / ``num_classes`` / ``input_shape`` record how to build the
        model (a ``prunekit.models`` factory name); ``onnx``: also the masked dense model as ONNX, checked
        in onnxruntime against eager on ``example`` (or a random batch of ``input_shape``). Returns an
        ``Exported`` (path, manifest, size, ONNX check)."""
        from prunekit.export import export_pipeline

        return export_pipeline(self, path, model_name=model_name, num_classes=num_classes, input_shape=input_shape,
                               onnx=onnx, example=example)  # fmt: skip


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
