"""A pipeline: one component per stage, composed from the registry, driving masks on a model.

Library use inside your own training loop::

    pipe = prunekit.load_pipeline("han-lenet")
    pipe.attach(model)                  # masks (all-keep) as parametrizations on the selected layers
    for epoch in range(pipe.epochs):
        pipe.step(epoch)                # the schedule decides whether masks change now
        train_one_epoch(model)
    pipe.finalize()                     # bake W * mask into the weights
    report = pipe.compile()             # swap layers for kernel modules (same function)
    pipe.save("state.pt")               # masks, permutations, schedule position
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import attrs
import pluggy
import torch
from torch import nn

from prunekit import hookspecs
from prunekit.atomic import atomic_torch_save
from prunekit.errors import CheckpointError, MissingComponentError, PrunekitError, RegistryError, SelectionError
from prunekit.masking import attach_mask, bake, mask_of, raw_weight
from prunekit.plugins import installed_components
from prunekit.records import CompiledLayer, LayerInfo, Layout, ScheduleDecision, Selection
from prunekit.registry import PipelineSpec, Registry, describe_structure_error, load_registry, strict_converter

STATE_FORMAT = "prunekit-state/1"


@attrs.define
class HostParams:
    """Pipeline parameters the host itself reads (the rest belong to components).

    Layer selection defaults: every ``nn.Conv2d`` and ``nn.Linear`` whose name matches ``include`` and no
    ``exclude`` glob; grouped/depthwise convs are skipped; ``keep_first_dense`` / ``keep_last_dense``
    leave the first conv and the final classifier dense.
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

    def __attrs_post_init__(self) -> None:
        check_sparsity(self.sparsity, "sparsity")
        if self.optimizer not in ("sgd", "adam"):
            raise PrunekitError(f"optimizer = '{self.optimizer}' is unknown; use 'sgd' or 'adam'")
        if self.epochs < 1 or self.dense_epochs < 0 or self.batch_size < 1:
            raise PrunekitError("epochs must be >= 1, dense_epochs >= 0 and batch_size >= 1")


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


class Pipeline:
    """One composed pipeline: its plugin manager, parameters and (once attached) the model's masks."""

    def __init__(self, name: str, spec: PipelineSpec, registry: Registry) -> None:
        self.name = name
        self.spec = spec
        self.registry = registry
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.components: dict[str, Any] = {}
        self.component_params: dict[str, Any] = {}
        self._load_components()
        self.host = self._structure_params()
        self.model: nn.Module | None = None
        self.layers: dict[str, LayerState] = {}
        self.position = 0  # next step to run
        self.decisions: list[ScheduleDecision] = []

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, name: str | None = None, registry: str | os.PathLike[str] | Registry | None = None) -> Pipeline:
        reg = registry if isinstance(registry, Registry) else load_registry(registry)
        name, spec = reg.pipeline(name)
        return cls(name, spec, reg)

    def _load_components(self) -> None:
        found = installed_components()
        for stage in hookspecs.STAGES:
            comp = self.spec.component(stage)
            if comp is None:
                continue
            info = found.get((stage, comp))
            if info is None:
                raise self._missing(stage, comp, found)
            try:
                cls = info.load()
                obj = cls()
            except Exception as exc:  # a broken plugin must not look like a host bug
                raise RegistryError(f"component {stage}.{comp} from {info.distribution} failed to load: {exc}") from exc
            hook = hookspecs.STAGE_GROUPS[stage][1]
            if not hasattr(obj, hook):
                raise RegistryError(f"component {stage}.{comp} from {info.distribution} does not implement {hook}")
            self.pm.register(obj, name=f"{stage}:{comp}")
            self.components[stage] = obj

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

    def describe(self) -> dict[str, Any]:
        return {
            "pipeline": self.name,
            "description": self.spec.description,
            "components": {s: self.spec.component(s) for s in hookspecs.STAGES if self.spec.component(s)},
            "params": dict(self.spec.params),
        }

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
        for name, mod in candidates:
            if not any(fnmatch.fnmatchcase(name, p) for p in h.include):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in h.exclude):
                continue
            if h.keep_first_dense and name == first:
                continue
            if h.keep_last_dense and name == last:
                continue
            if isinstance(mod, nn.Conv2d) and mod.groups != 1 and h.skip_grouped:
                continue
            if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
                continue  # reflect/replicate/circular padding: no kernel computes it, the layer stays dense
            chosen.append((name, mod))
        if not chosen:
            names = ", ".join(n for n, _ in candidates[:8]) + (" ..." if len(candidates) > 8 else "")
            raise SelectionError(
                f"pipeline {self.name}: include={h.include} exclude={h.exclude} selects no layer of {names}; "
                "widen include or shorten exclude"
            )
        return chosen

    def attach(self, model: nn.Module) -> list[LayerInfo]:
        """Put all-keep masks on the selected layers of ``model``; returns their LayerInfo."""
        chosen = self.select_layers(model)
        self.model = model
        self.layers = {}
        for i, (name, mod) in enumerate(chosen):
            attach_mask(mod)
            self.layers[name] = LayerState(layer_info(name, mod, i, len(chosen)), mod)
        return [s.info for s in self.layers.values()]

    def _require_attached(self) -> None:
        if self.model is None:
            raise PrunekitError("the pipeline is not attached to a model; call pipeline.attach(model) first")

    def _generator(self, step: int, index: int) -> torch.Generator:
        digest = hashlib.sha256(f"{self.host.seed}:{step}:{index}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    # ---------------------------------------------------------------- stepping

    def decide(self, step: int, total_steps: int | None = None) -> ScheduleDecision:
        total = self.host.epochs if total_steps is None else total_steps
        decision = self.hook.prunekit_schedule(
            step=step, total_steps=total, target=self.host.sparsity, params=self.component_params["schedule"]
        )
        if decision is None:
            raise RegistryError(f"schedule component '{self.spec.schedule}' returned nothing for step {step}")
        return decision

    def step(self, step: int | None = None, total_steps: int | None = None) -> ScheduleDecision:
        """Advance the schedule to ``step`` (default: the next one) and update masks if it says so."""
        self._require_attached()
        step = self.position if step is None else step
        decision = self.decide(step, total_steps)
        if decision.update:
            self.prune(decision.sparsity, step=step)
        self.decisions.append(decision)
        self.position = step + 1
        return decision

    @torch.no_grad()
    def prune(self, sparsity: float, step: int = 0) -> dict[str, Selection]:
        """Score and select every layer at ``sparsity`` now (what ``step`` does when the schedule says so)."""
        self._require_attached()
        check_sparsity(sparsity, "sparsity")
        sp, ss = self.component_params["score"], self.component_params["select"]
        all_scores: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        for name, st in self.layers.items():
            w = raw_weight(st.module).detach()
            weights[name] = w
            mask = mask_of(st.module).mask.bool() if st.selection is not None else None
            scores = self.hook.prunekit_score(
                layer=st.info, weight=w, mask=mask, params=sp, generator=self._generator(step, st.info.index)
            )
            all_scores[name] = scores
        out = {}
        for name, st in self.layers.items():
            sel = self.hook.prunekit_select_mask(
                layer=st.info,
                weight=weights[name],
                scores=all_scores[name],
                sparsity=sparsity,
                target=max(self.host.sparsity, sparsity),
                previous=st.selection,
                params=ss,
                generator=self._generator(step + 1_000_003, st.info.index),
                all_scores=all_scores,
            )
            if sel.mask.shape != weights[name].shape or sel.mask.dtype != torch.bool:
                raise SelectionError(
                    f"select component '{self.spec.select}' returned a {sel.mask.dtype} mask of shape "
                    f"{tuple(sel.mask.shape)} for layer {name} {tuple(weights[name].shape)}; it must be bool, same shape"
                )
            mask_of(st.module).set(sel.mask, sel.soft, sel.pruned_decay)
            st.selection = sel
            out[name] = sel
        return out

    def sparsity(self) -> float:
        """Fraction of all selected layers' weights currently pruned (0 before the first selection)."""
        kept = total = 0
        for st in self.layers.values():
            n = math.prod(st.info.weight_shape)
            kept += int(st.selection.mask.sum()) if st.selection is not None else n
            total += n
        return 1.0 - kept / max(total, 1)

    # ---------------------------------------------------------------- finishing

    def finalize(self) -> None:
        """Bake ``W * mask`` into every selected layer's weight and drop the parametrizations."""
        self._require_attached()
        for st in self.layers.values():
            bake(st.module)

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

        ``example`` (one input batch) lets kernels see each layer's real input size.
        """
        self._require_attached()
        self.finalize()
        if not self.has_kernel:
            return list(self.layers.values())
        if example is not None:
            self.record_input_shapes(example)
        lp, kp = self.component_params["layout"], self.component_params["kernel"]
        for name, st in self.layers.items():
            if st.selection is None:
                continue  # never pruned: stays dense
            w = st.module.weight.detach()
            layout = self.hook.prunekit_transform_layout(layer=st.info, weight=w, selection=st.selection, params=lp)
            bias = st.module.bias.detach() if getattr(st.module, "bias", None) is not None else None
            compiled = self.hook.prunekit_build_kernel(layer=st.info, layout=layout, bias=bias, params=kp)
            st.layout, st.compiled = layout, compiled
            _replace_module(self.model, name, compiled.module)
        return list(self.layers.values())

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
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write masks, permutations and schedule position atomically (temp file, then rename)."""
        atomic_torch_save(self.state_dict(), Path(path))

    def load_state(self, path: str | os.PathLike[str]) -> None:
        """Restore a saved state onto the attached model (safe: ``torch.load(weights_only=True)``)."""
        self._require_attached()
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such pruning state; check the path") from None
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable prunekit state ({type(exc).__name__}); re-create it with save()") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: not a {STATE_FORMAT} file; re-create it with pipeline.save()")
        if state["pipeline"] != self.name:
            raise CheckpointError(f"{path}: saved by pipeline '{state['pipeline']}', not '{self.name}'; load it with that pipeline")
        meta = json.loads(state["meta"])
        for name, mask in state["masks"].items():
            st = self.layers.get(name)
            if st is None or tuple(mask.shape) != st.info.weight_shape:
                raise CheckpointError(f"{path}: layer {name} {tuple(mask.shape)} does not fit this model; attach the model it was saved from")
        for name, mask in state["masks"].items():
            st = self.layers[name]
            m = meta[name]
            perms = tuple(state["perms"].get(f"{name}#{d}") for d in range(m["ndim"]))
            sel = Selection(mask=mask.bool(), perms=perms, block=tuple(m["block"]), soft=m["soft"], pruned_decay=m["pruned_decay"], meta=m["meta"])
            mask_of(st.module).set(sel.mask, sel.soft, sel.pruned_decay)
            st.selection = sel
        self.position = int(state["position"])


def _parametrized(module: nn.Module) -> bool:
    return hasattr(module, "parametrizations") and "weight" in module.parametrizations


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
