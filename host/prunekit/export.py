"""Save, load and ship the compiled model: one safetensors artifact that loads without any pruning stage.

The artifact (``FORMAT``) is a single ``.safetensors`` file; nothing in it is pickled, nothing is unpickled.

  tensors
    ``layers/<name>/layout/<key>``  every ``Layout.tensors`` entry of a compiled layer
    ``layers/<name>/bias``          the layer's bias, when it has one
    ``layers/<name>/perm/<d>``      the selection's permutations (the layout has already folded them in)
    ``state/<key>``                 every other ``state_dict`` entry of the model: norms, layers left dense,
                                    stem, head, buffers
  ``__metadata__`` (str -> str)
    ``format``                      ``prunekit-compiled/1``
    ``manifest``                    the JSON manifest
    ``manifest_sha256``             its digest: a flipped bit is an error, never a silently different model

The manifest names the pipeline and every component (distribution, version, install hint), the layout and
kernel params, the model (factory name, class, input shape), and per compiled layer its ``LayerInfo``,
layout format, dense shape and meta, tensor keys, and the kernel that ran (and why, for a fallback);
``tensors_sha256`` covers every tensor's bytes.

``load_compiled(model, path)`` needs only the layout and kernel components the manifest names. It checks
everything first (file, digests, components, every layer and state shape against ``model``, and builds every
kernel module), and only then changes the model, so a failure leaves it as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit import plugins
from prunekit.atomic import atomic_write, file_sha256
from prunekit.errors import CheckpointError, MissingComponentError, PrunekitError, RegistryError
from prunekit.pipeline import _replace_module, call_stage, layer_info, load_component, plugin_manager
from prunekit.records import LayerInfo, Layout
from prunekit.registry import describe_structure_error, strict_converter
from prunekit.verify import check_tolerance, max_rel_err

if TYPE_CHECKING:
    from prunekit.pipeline import LayerState, Pipeline

FORMAT = "prunekit-compiled/1"
FORMAT_FAMILY = "prunekit-compiled/"
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4
_TUPLE = "$tuple"  # JSON tag that keeps a tuple in Layout.meta a tuple after the round trip


@attrs.frozen
class OnnxCheck:
    """An ONNX export of the masked dense model and how closely onnxruntime reproduces eager PyTorch."""

    path: Path
    opset: int
    batch: int  # batch size of the check; differs from the export's, so the dynamic batch axis is exercised
    max_rel_err: float


@attrs.frozen
class Exported:
    """What ``Pipeline.export`` wrote."""

    path: Path
    manifest: dict[str, Any]
    nbytes: int
    onnx: OnnxCheck | None = None

    @property
    def kernels(self) -> dict[str, str]:
        return {e["name"]: e["kernel"] for e in self.manifest["layers"]}


@attrs.frozen
class RunExport:
    """What ``prunekit export RUN_DIR`` did: the artifact, and the checks it passed."""

    exported: Exported
    compiled_rel_err: float  # compiled model against the masked dense model of the run
    reload_rel_err: float  # the artifact loaded into a freshly built model against the compiled model
    onnx: OnnxCheck | None = None


# ---------------------------------------------------------------- JSON and tensor helpers


def _to_json(value: Any, where: str) -> Any:
    """Plain JSON with tuples tagged, so a layout's meta comes back as the kernel saw it."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_to_json(v, where) for v in value]}
    if isinstance(value, list):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise PrunekitError(f"{where}: key {bad[0]!r} is not a string; keep meta keys strings so it can be exported")
        return {k: _to_json(v, f"{where}.{k}") for k, v in value.items()}
    raise PrunekitError(
        f"{where} is a {type(value).__name__}, not JSON; keep Layout.meta to str/int/float/bool/None, lists, "
        "tuples and dicts (tensors go in Layout.tensors)"
    )


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(_from_json(v) for v in value[_TUPLE])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of a large layer
    return h.hexdigest()


class _TensorSink:
    """Collects the artifact's tensors: detached, on the CPU, contiguous, and never two sharing memory
    (safetensors refuses shared storage, e.g. a layout that keeps the bias as one of its tensors)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()

    def add(self, key: str, t: Any, where: str) -> str:
        if not isinstance(t, torch.Tensor):
            raise PrunekitError(f"{where} is a {type(t).__name__}, not a tensor; Layout.tensors holds tensors only")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in self._storages:
            t = t.clone()
        self._storages.add(t.untyped_storage().data_ptr())
        self.tensors[key] = t
        return key


# ---------------------------------------------------------------- export


def _install_hint(pipe: Pipeline, stage: str, distribution: str) -> str:
    """How to install a component on another machine: the registry's catalogue path (relative to the
    checkout, not to this process's cwd), else the distribution by name."""
    if distribution.startswith("<"):  # registered in-process (a notebook or a test)
        return f"register it first: prunekit.plugins.register_component('{stage}', NAME, cls)"
    provider = pipe.registry.provider(stage, pipe.spec.component(stage))
    if provider is not None and provider[1].path:
        return f"pip install -e {provider[1].path} (in the prunekit checkout)"
    return f"pip install {distribution}"


def _components(pipe: Pipeline) -> dict[str, dict[str, Any]]:
    conv = strict_converter()
    out = {}
    for stage, info in pipe.infos.items():
        params = pipe.component_params.get(stage)
        out[stage] = {
            "name": info.name,
            "distribution": info.distribution,
            "version": info.version,
            "install": _install_hint(pipe, stage, info.distribution),
            "params": None if params is None else _to_json(conv.unstructure(params), f"{stage} params"),
        }
    return out


def _exportable(pipe: Pipeline) -> nn.Module:
    """The compiled model, or one error saying what to call first."""
    model = pipe.model
    if model is None:
        raise PrunekitError("the pipeline is not attached to a model; attach, prune and compile before export")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PrunekitError(f"pipeline {pipe.name}: the model still carries masks; call pipe.compile(example=x) before export")
    pending = [n for n, st in pipe.layers.items()
               if pipe.has_kernel and st.selection is not None and not st.selection.dense_reason and st.compiled is None]  # fmt: skip
    if pending:
        raise PrunekitError(f"pipeline {pipe.name}: layers {', '.join(pending[:4])} are not compiled; call pipe.compile(example=x) before export")
    for name, st in pipe.layers.items():
        if st.compiled is not None and model.get_submodule(name) is not st.compiled.module:
            raise PrunekitError(f"layer {name} was replaced after compile(); export the model compile() produced")
    return model


def _layer_entry(name: str, st: LayerState, sink: _TensorSink) -> dict[str, Any]:
    layout, compiled, sel = st.layout, st.compiled, st.selection
    where = f"layer {name}"
    keys = {k: sink.add(f"layers/{name}/layout/{k}", t, f"{where}: Layout.tensors[{k!r}]") for k, t in layout.tensors.items()}
    bias = getattr(st.module, "bias", None)
    perms = {str(d): sink.add(f"layers/{name}/perm/{d}", p, f"{where}: perms[{d}]")
             for d, p in enumerate(sel.perms if sel is not None else ()) if p is not None}  # fmt: skip
    return {
        "name": name,
        "info": strict_converter().unstructure(st.info),
        "format": layout.format,
        "dense_shape": list(layout.dense_shape),
        "meta": _to_json(layout.meta, f"{where}: Layout.meta"),
        "tensors": keys,
        "bias": None if bias is None else sink.add(f"layers/{name}/bias", bias, f"{where}: bias"),
        "perms": perms,
        "kernel": compiled.kernel,
        "reason": compiled.reason,
        "pattern": sel.pattern if sel is not None else "",
        "sparsity": sel.sparsity if sel is not None else 0.0,
    }


def _dense_reasons(pipe: Pipeline) -> dict[str, str]:
    """Prunable layers stored as plain weights in ``state/``, and why (for people reading the manifest)."""
    out = {name: ld.reason for name, ld in pipe.left_dense.items()}
    for name, st in pipe.layers.items():
        if st.compiled is None:
            sel = st.selection
            out[name] = (sel.dense_reason if sel is not None and sel.dense_reason else
                         "never pruned" if sel is None else "no kernel stage: masked dense weights")  # fmt: skip
    return out


def export_pipeline(
    pipe: Pipeline,
    path: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    onnx: str | os.PathLike[str] | None = None,
    example: torch.Tensor | None = None,
) -> Exported:
    """Write the compiled model of ``pipe`` as one artifact (see the module docstring); see Pipeline.export."""
    from prunekit import __version__

    model = _exportable(pipe)
    if onnx is not None and example is None and input_shape is None:
        raise PrunekitError("ONNX export needs an input: pass example=x (one batch) or input_shape=(C, H, W)")
    path = Path(path)
    sink = _TensorSink()
    compiled = {n: st for n, st in pipe.layers.items() if st.compiled is not None}
    layers = [_layer_entry(n, st, sink) for n, st in compiled.items()]
    rest = _rest_state(model, list(compiled))  # everything the kernels do not hold
    for k, t in rest.items():
        sink.add(f"state/{k}", t, f"state {k}")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "prunekit": __version__,
        "torch": torch.__version__,
        "pipeline": {"name": pipe.name, "description": pipe.spec.description,
                     "components": pipe.spec.components(), "params": json.loads(json.dumps(pipe.spec.params, default=str))},  # fmt: skip
        "components": _components(pipe),
        "model": {
            "factory": model_name,
            "num_classes": num_classes,
            "input_shape": None if input_shape is None else list(input_shape),
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
        },
        "layers": layers,
        "dense": _dense_reasons(pipe),
        "state": list(rest),
        "tensors_sha256": _tensors_digest(sink.tensors),
    }
    _write(path, sink.tensors, manifest)
    check = None
    if onnx is not None:
        x = example if example is not None else torch.randn(2, *input_shape)
        with masked_dense(pipe) as dense:
            check = export_onnx(dense, onnx, x)
    return Exported(path, manifest, path.stat().st_size, check)


def _write(path: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    text = json.dumps(manifest, sort_keys=True)
    metadata = {"format": FORMAT, "manifest": text, "manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


@contextlib.contextmanager
def masked_dense(pipe: Pipeline) -> Iterator[nn.Module]:
    """The attached model with every compiled layer swapped back to its baked dense module (``W * mask``),
    for the duration of the block; the kernel modules are put back afterwards."""
    model = _exportable(pipe)
    swapped = {n: st for n, st in pipe.layers.items() if st.compiled is not None}
    try:
        for name, st in swapped.items():
            _replace_module(model, name, st.module)
        yield model
    finally:
        for name, st in swapped.items():
            _replace_module(model, name, st.compiled.module)


# ---------------------------------------------------------------- reading


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable safetensors file ({type(exc).__name__}: {str(exc)[:120]}): truncated, corrupt or "
        "another kind of file; export it again (pipe.export(path) or prunekit export RUN_DIR --out FILE)"
    )


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The artifact's manifest, checked (format, digest); reads only the file's header."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such compiled model; check the path or export it (prunekit export RUN_DIR --out {path})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise _unreadable(path, exc) from None
    fmt = meta.get("format", "")
    if not fmt.startswith(FORMAT_FAMILY) or "manifest" not in meta:
        raise CheckpointError(f"{path}: a safetensors file without a prunekit manifest; export the compiled model with "
                              "pipe.export(path) or prunekit export RUN_DIR --out FILE")  # fmt: skip
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: format {fmt}, this prunekit reads {FORMAT}; export it again with this version "
                              "or install the prunekit that wrote it")  # fmt: skip
    text = meta["manifest"]
    if hashlib.sha256(text.encode()).hexdigest() != meta.get("manifest_sha256"):
        raise CheckpointError(f"{path}: the manifest does not match its digest (the file was damaged or edited); export it again")
    try:
        manifest = json.loads(text)
    except ValueError:
        raise CheckpointError(f"{path}: the manifest is not JSON; export it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: the manifest is not a {FORMAT} manifest; export it again")
    return manifest


def _read_tensors(path: Path, manifest: dict[str, Any], device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as exc:
        raise _unreadable(path, exc) from None
    expected = {f"state/{k}" for k in manifest["state"]}
    for e in manifest["layers"]:
        expected |= set(e["tensors"].values()) | set(e["perms"].values()) | ({e["bias"]} if e["bias"] else set())
    if set(tensors) != expected or _tensors_digest(tensors) != manifest["tensors_sha256"]:
        raise CheckpointError(f"{path}: the tensors do not match the manifest (the file was damaged or edited); export it again")
    return tensors


# ---------------------------------------------------------------- checking the model before changing it


def _layer_infos(path: Path, manifest: dict[str, Any]) -> dict[str, LayerInfo]:
    conv = strict_converter()
    out = {}
    for e in manifest["layers"]:
        try:
            out[e["name"]] = conv.structure(e["info"], LayerInfo)
        except Exception as exc:
            raise CheckpointError(f"{path}: layer {e.get('name')}: {describe_structure_error(exc, 'info')}; export it again") from None
    return out


def _layer_problem(model: nn.Module, info: LayerInfo) -> str:
    """Why ``model`` cannot take this compiled layer ("" when it can)."""
    name = info.name
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return f"the model has no layer {name}"
    want = nn.Conv2d if info.kind == "conv2d" else nn.Linear
    if not isinstance(mod, want):
        return f"layer {name} is a {type(mod).__name__}, not an nn.{want.__name__} (pass a freshly built model)"
    try:
        have = layer_info(name, mod, info.index, info.count)
    except PrunekitError as exc:
        return str(exc)
    fields = ("weight_shape", "has_bias", "stride", "padding", "dilation", "groups")
    for f in fields:
        if getattr(have, f) != getattr(info, f):
            return f"layer {name} has {f} {getattr(have, f)}, the artifact {getattr(info, f)}"
    return ""


def _rest_state(model: nn.Module, compiled: list[str]) -> dict[str, torch.Tensor]:
    prefixes = tuple(f"{n}." for n in compiled)
    return {k: t for k, t in model.state_dict().items() if not k.startswith(prefixes)}


def _check_fit(path: Path, model: nn.Module, manifest: dict[str, Any], infos: dict[str, LayerInfo],
               tensors: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """One CheckpointError listing what does not fit, before anything is changed."""
    problems = [p for p in (_layer_problem(model, i) for i in infos.values()) if p]
    if not problems:
        rest = _rest_state(model, list(infos))
        want = manifest["state"]
        missing = [k for k in want if k not in rest]
        extra = [k for k in rest if k not in set(want)]
        problems += [f"the model lacks {k}" for k in missing[:3]] + [f"the artifact lacks {k}" for k in extra[:3]]
        if tensors is not None and not problems:
            for k, t in rest.items():
                got = tensors[f"state/{k}"]
                if got.shape != t.shape or got.dtype != t.dtype:
                    problems.append(f"{k} is {tuple(t.shape)} {t.dtype} in the model, {tuple(got.shape)} {got.dtype} in the artifact")
    if problems:
        m = manifest["model"]
        made = m.get("factory") or m.get("class")
        made += f", num_classes={m['num_classes']}" if m.get("num_classes") is not None else ""
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path}: does not fit this {type(model).__name__}: {'; '.join(problems[:3])}{more}; "
                              f"build the model it was exported from ({made}) and pass it fresh")  # fmt: skip


# ---------------------------------------------------------------- components


def _find_component(path: Path, manifest: dict[str, Any], stage: str, found: dict) -> Any:
    ref = manifest["components"].get(stage)
    if ref is None:
        raise CheckpointError(f"{path}: compiled layers but no {stage} component in the manifest; export it again")
    info = found.get((stage, ref["name"]))
    if info is None:
        raise MissingComponentError(
            f"{path}: {stage} component '{ref['name']}' is not installed; this model was compiled with it "
            f"({ref['distribution']} {ref['version']}): {ref['install']}"
        )
    info.check_unique()
    if info.version != ref["version"] or info.distribution != ref["distribution"]:
        warnings.warn(f"{path}: exported with {ref['distribution']} {ref['version']}, {info.distribution} {info.version} "
                      f"is installed; its {stage} checks the stored layouts", stacklevel=3)  # fmt: skip
    return info


def _kernel_params(path: Path, ref: dict[str, Any], obj: Any, info: Any) -> Any:
    params_cls = getattr(type(obj), "Params", None)
    raw = _from_json(ref.get("params"))
    if params_cls is None:
        return None
    try:
        return strict_converter().structure(raw or {}, params_cls)
    except Exception as exc:
        why = str(exc) if isinstance(exc, PrunekitError) else describe_structure_error(exc, "params")
        raise CheckpointError(
            f"{path}: kernel params {raw} do not fit {info.distribution} {info.version} ({why}); install "
            f"{ref['distribution']} {ref['version']}, or export the model again with this one"
        ) from None


def _build_modules(path: Path, manifest: dict[str, Any], infos: dict[str, LayerInfo],
                   tensors: dict[str, torch.Tensor]) -> dict[str, nn.Module]:  # fmt: skip
    """Every compiled layer's kernel module, built by the kernel component alone (no model change yet)."""
    found = plugins.installed_components()
    _find_component(path, manifest, "layout", found)  # the kernel reads its format: both must be installed
    kinfo = _find_component(path, manifest, "kernel", found)
    pm = plugin_manager()
    kernel = load_component(pm, "kernel", kinfo)
    params = _kernel_params(path, manifest["components"]["kernel"], kernel, kinfo)
    modules = {}
    for e in manifest["layers"]:
        name = e["name"]
        layout = Layout(format=e["format"], dense_shape=tuple(e["dense_shape"]), meta=_from_json(e["meta"]),
                        tensors={k: tensors[key] for k, key in e["tensors"].items()})  # fmt: skip
        bias = tensors[e["bias"]] if e["bias"] else None
        built = call_stage(pm, "kernel", kinfo, name, layer=infos[name], layout=layout, bias=bias, params=params)
        modules[name] = built.module
    return modules


# ---------------------------------------------------------------- loading


@torch.no_grad()
def load_compiled(model: nn.Module, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the compiled model from an artifact into ``model``, a freshly built model of the exported
    architecture (random weights are fine: every weight comes from the file); returns it, in eval mode.

    Needs only the layout and kernel components the manifest names (``MissingComponentError`` with the
    install command otherwise). Everything is checked before the model changes: a truncated or edited file,
    another format, or a model whose layers or shapes differ is one ``CheckpointError`` and ``model`` is left
    as it was. ``device``: where the stored tensors are loaded (the kernel decides where it runs).
    """
    path = Path(path)
    manifest = read_manifest(path)
    infos = _layer_infos(path, manifest)
    _check_fit(path, model, manifest, infos)
    tensors = _read_tensors(path, manifest, device)
    _check_fit(path, model, manifest, infos, tensors)
    modules = _build_modules(path, manifest, infos, tensors) if infos else {}
    for k, t in _rest_state(model, list(infos)).items():
        t.copy_(tensors[f"state/{k}"])
    for name, module in modules.items():
        _replace_module(model, name, module)
    return model.eval()


# ---------------------------------------------------------------- ONNX (the masked dense model)


def _onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
        import onnxruntime
    except ImportError as exc:
        raise PrunekitError(
            f"ONNX export needs onnxruntime and onnx ({exc.name} is missing): pip install onnxruntime onnx "
            "(both are in prunekit's 'runtimes' extra)"
        ) from None
    return onnxruntime


def export_onnx(model: nn.Module, path: str | os.PathLike[str], example: torch.Tensor, opset: int = ONNX_OPSET,
                tolerance: float = ONNX_TOLERANCE) -> OnnxCheck:  # fmt: skip
    """Export a dense model (eval mode, batch axis dynamic) to ONNX and check it in onnxruntime on the CPU
    against eager PyTorch, at another batch size than ``example``'s; above ``tolerance`` nothing is written.

    Give it the masked dense model (``W * mask`` baked: before ``compile``, or ``masked_dense(pipe)``), not
    the kernel modules: other runtimes cannot run prunekit's kernels. Models over 2 GiB do not fit in one
    ONNX file.
    """
    ort = _onnxruntime()
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        return _export_checked(ort, model, path, example, opset, tolerance)
    finally:
        model.train(was_training)


def _export_checked(ort: Any, model: nn.Module, path: Path, example: torch.Tensor, opset: int, tolerance: float) -> OnnxCheck:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(example.shape[0] + 1, *example.shape[1:], generator=g, dtype=example.dtype)
    with torch.inference_mode():
        ref = model(x)
    errs: list[float] = []

    def write(tmp: str) -> None:
        _torch_onnx_export(model, example, tmp, opset, path)
        sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        (out,) = sess.run(None, {"input": x.numpy()})
        errs.append(max_rel_err(torch.from_numpy(out), ref))
        if not errs[-1] <= tolerance:
            raise PrunekitError(
                f"{path}: onnxruntime's output differs from PyTorch's by {errs[-1]:.2e} (max relative error; "
                f"tolerance {tolerance:g}); nothing written: export the model in float32, or report the operator"
            )

    atomic_write(path, write)
    return OnnxCheck(path, opset, int(x.shape[0]), errs[-1])


def _torch_onnx_export(model: nn.Module, example: torch.Tensor, tmp: str, opset: int, path: Path, export_params: bool = True) -> None:
    # the TorchScript exporter (dynamo=False) on purpose: the dynamo one needs onnxscript, which prunekit does
    # not pin; its deprecation notices are not the user's to act on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            # export_params=False (the weights as graph inputs, unfolded) for prunekit.baselines' external weights
            torch.onnx.export(model, (example,), tmp, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                              export_params=export_params, keep_initializers_as_inputs=not export_params or None,
                              do_constant_folding=export_params)  # fmt: skip
        except Exception as exc:
            raise PrunekitError(
                f"{path}: torch.onnx.export failed ({type(exc).__name__}: {str(exc)[:200]}); the model must be "
                "traceable with one tensor input and one tensor output"
            ) from None


# ---------------------------------------------------------------- prunekit export RUN_DIR


def _run_report(run: Path) -> dict[str, Any]:
    hint = f"point at a directory `prunekit run --out {run}` wrote"
    for name in ("report.json", "state.pt", "pruned.pt"):
        if not (run / name).is_file():
            raise CheckpointError(f"{run}: no {name}; {hint}")
    try:
        report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{run / 'report.json'}: not JSON; {hint}") from None
    if not isinstance(report, dict) or not all(isinstance(report.get(k), str) for k in ("pipeline", "model")):
        raise CheckpointError(f"{run / 'report.json'}: lacks 'pipeline' and 'model'; {hint}")
    types = {"data": str, "num_classes": int, "latency_batch": int, "components": dict}
    wrong = [k for k, t in types.items() if report.get(k) is not None and (not isinstance(report[k], t) or isinstance(report[k], bool))]
    if wrong or not 1 <= report.get("latency_batch", 1) <= 4096 or not 1 <= (report.get("num_classes") or 1) <= 10**6:
        raise CheckpointError(f"{run / 'report.json'}: {', '.join(wrong) or 'num_classes or latency_batch'} damaged; {hint}")
    files = report.get("files")
    if files is not None and not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
        raise CheckpointError(f"{run / 'report.json'}: its 'files' digests are damaged; {hint}")
    for name, digest in (files or {}).items():  # reports written before the digests have none
        if name in ("pruned.pt", "state.pt") and file_sha256(run / name) != digest:
            raise CheckpointError(f"{run / name}: does not match the sha256 report.json records for it (a changed bit, "
                                  "or another run's file); run prunekit run again")  # fmt: skip
    return report


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable weights file ({type(exc).__name__}); run prunekit run again") from None
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: not a state_dict; run prunekit run again")
    return weights


def _num_classes(model_name: str, shape: tuple[int, ...], weights: dict[str, torch.Tensor]) -> int:
    """The classifier's width in the saved weights (the last 2-D weight of the architecture)."""
    from prunekit.models import build_model

    probe = build_model(model_name, 10, shape).state_dict()
    last = [k for k, t in probe.items() if k.endswith("weight") and t.ndim == 2]
    return int(weights[last[-1]].shape[0]) if last and last[-1] in weights else 10


def _fresh_model(model_name: str, num_classes: int, shape: tuple[int, ...], seed: int) -> nn.Module:
    from prunekit.models import build_model

    torch.manual_seed(seed)
    return build_model(model_name, num_classes, shape)


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    onnx: str | os.PathLike[str] | None = None,
    registry: str | os.PathLike[str] | None = None,
) -> RunExport:
    """``prunekit export``: rebuild a run's pruned model (factory, pruned.pt, state.pt), compile it, write the
    artifact and check it reloads into a freshly built model; ``onnx``: also the masked dense model."""
    from prunekit.pipeline import Pipeline
    from prunekit.runjob import input_shape_for
    from prunekit.verify import capture_io, layer_errors

    run = Path(run_dir)
    report = _run_report(run)
    pipe = Pipeline.load(report["pipeline"], registry)
    used = report.get("components")
    if used and used != pipe.spec.components():
        raise RegistryError(f"{pipe.registry.source}: pipeline {pipe.name} now names {pipe.spec.components()}, the run "
                            f"used {used}; pass the --registry the run used")  # fmt: skip
    model_name = report["model"]
    shape = input_shape_for(model_name, report.get("data", "digits"))
    weights = _read_weights(run / "pruned.pt")
    classes = int(report.get("num_classes") or _num_classes(model_name, shape, weights))
    model = _fresh_model(model_name, classes, shape, pipe.host.seed)
    try:
        model.load_state_dict(weights)
    except Exception as exc:
        raise CheckpointError(f"{run / 'pruned.pt'}: does not fit {model_name} ({str(exc)[:160]}); run prunekit run again") from None
    pipe.attach(model)
    try:
        pipe.load_state(run / "state.pt")
    except PrunekitError:
        raise
    except Exception as exc:  # a damaged state dict (keys missing, wrong types): the file's fault, one line
        raise CheckpointError(f"{run / 'state.pt'}: damaged pruning state ({type(exc).__name__}: {str(exc)[:120]}); "
                              "run prunekit run again") from None  # fmt: skip
    pipe.finalize()
    model.eval()
    onnx_check = export_onnx(model, onnx, torch.randn(2, *shape)) if onnx is not None else None
    x = torch.randn(int(report.get("latency_batch", 1)), *shape, generator=torch.Generator().manual_seed(1))
    ref, captured = capture_io(model, list(pipe.layers), x)
    pipe.compile(example=x)
    with torch.inference_mode():
        compiled_out = model(x)
    err = max_rel_err(compiled_out, ref)
    check_tolerance(f"prunekit export {run}", err, layer_errors(model, captured), pipe.kernels(), pipe.tolerance)
    out = Path(out) if out is not None else run / "compiled.safetensors"
    exported = pipe.export(out, model_name=model_name, num_classes=classes, input_shape=shape)
    fresh = load_compiled(_fresh_model(model_name, classes, shape, pipe.host.seed + 1), out)
    with torch.inference_mode():
        reload_err = max_rel_err(fresh(x), compiled_out)
    if not reload_err <= pipe.tolerance:
        raise CheckpointError(f"{out}: reloaded, the model differs from the compiled one by {reload_err:.2e}; "
                              "a kernel's choice changed between builds: report it to its distribution")  # fmt: skip
    exported = attrs.evolve(exported, onnx=onnx_check)
    return RunExport(exported, err, reload_err, onnx_check)
