"""Models the CLI can build: small built-ins, every torchvision classification model, or a user's own.

Names ``model_spec`` accepts:

- the built-ins ``lenet`` (28x28) and ``resnet-digits`` (16x16);
- every name in ``torchvision.models.list_models(module=torchvision.models)`` (the classification models,
  not detection, segmentation, video, optical flow or quantization), built with ``weights=None`` and
  random init: weights are never downloaded, trained ones come only from a local file (``--dense PATH``).
  The default input is the size torchvision documents for the architecture (224x224, 299 for
  inception_v3, 600 for efficientnet_b7, ...), and ``ModelSpec.min_size`` is its documented ``min_size``.
  inception_v3 and googlenet are built without auxiliary heads, so they return plain logits in training
  mode too; a torchvision ``.pth`` of theirs still loads (the heads' keys are dropped, as torchvision does);
- ``package.module:callable`` (a dotted attribute after the colon works too), see ``import_model_spec``.

``python -m prunekit.models`` prints every name.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import nn

from prunekit.errors import PrunekitError

Size = tuple[int, int]
Shape = tuple[int, int, int]


@attrs.frozen
class ModelSpec:
    """How to build one model and the input it expects (channels, height, width).

    ``min_size``: the smallest (height, width) the model takes; ``fixed_size``: it takes only
    ``input_shape`` (ViT's position embedding, MaxViT's partition grid, LeNet's flattened features).
    """

    name: str
    input_shape: Shape
    build: Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> model
    description: str = ""
    min_size: Size = (1, 1)
    fixed_size: bool = False

    def valid_input(self, shape: Shape) -> Shape:
        """``shape`` made acceptable to this model: its own size when fixed, else at least ``min_size``."""
        if self.fixed_size:
            return (shape[0], *self.input_shape[1:])
        return (shape[0], max(shape[1], self.min_size[0]), max(shape[2], self.min_size[1]))


class LeNet(nn.Module):
    """LeNet-style CNN of the Han/iterative-pruning seed (TF MNIST tutorial net), 28x28 inputs.

    conv5x5(32)+ReLU, maxpool2, conv5x5(64)+ReLU, maxpool2, fc 3136->1024 + ReLU, dropout, fc 1024->classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 7 * 7, 1024)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(self.drop(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + idt)


class ResNetDigits(nn.Module):
    """A small residual CNN for 16x16 inputs: stem 32, stages 32/64/128 (one BasicBlock each), fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


BUILTIN: dict[str, ModelSpec] = {
    "lenet": ModelSpec("lenet", (1, 28, 28), lambda c, i: LeNet(c, i), "LeNet-style CNN (Han seed), 3.3M weights",
                       min_size=(28, 28), fixed_size=True),  # fmt: skip
    "resnet-digits": ModelSpec(
        "resnet-digits", (1, 16, 16), lambda c, i: ResNetDigits(c, i), "small residual CNN, 32/64/128 channels"
    ),
}

# Auxiliary classifier heads: built without (they only run in training mode and return a tuple, which a
# plain cross-entropy loop cannot take); their keys in a torchvision checkpoint are dropped on load.
_AUX_HEADS: dict[str, tuple[str, ...]] = {"inception_v3": ("AuxLogits.",), "googlenet": ("aux1.", "aux2.")}
_FIXED_PREFIXES = ("vit_", "maxvit_")  # a position embedding / partition grid sized for one input


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """torchvision's classification models (``list_models(module=torchvision.models)`` is exactly those:
    detection, segmentation, video, optical flow and quantization builders live in submodules)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def list_model_names() -> list[str]:
    """Every model name ``model_spec`` accepts (besides ``package.module:callable`` import paths)."""
    return [*BUILTIN, *torchvision_names()]


def _torchvision_sizes(name: str) -> tuple[int, Size]:
    """(default side, min_size) from the weights' documentation: the crop of the weights with the smallest
    ``min_size`` (the random-init architecture's own: vit_h_14's default weights need 518, it needs 224)."""
    import torchvision

    members = list(torchvision.models.get_model_weights(name))
    if not members:
        return 224, (1, 1)
    smallest = min(tuple(m.meta.get("min_size", (1, 1))) for m in members)
    default = members[0].__class__.DEFAULT if hasattr(members[0].__class__, "DEFAULT") else members[0]
    pick = default if tuple(default.meta.get("min_size", (1, 1))) == smallest else next(
        m for m in members if tuple(m.meta.get("min_size", (1, 1))) == smallest
    )
    crop = getattr(pick.transforms, "keywords", {}).get("crop_size", 224)
    return int(crop), (int(smallest[0]), int(smallest[1]))


@attrs.frozen
class DropKeys:
    """A load_state_dict pre-hook removing keys under ``prefixes`` (a class, so the model still pickles)."""

    prefixes: tuple[str, ...]

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        for key in [k for k in state_dict if k.startswith(tuple(prefix + p for p in self.prefixes))]:
            del state_dict[key]


def _torchvision_builder(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        import torchvision

        if in_channels != 3:
            raise PrunekitError(f"{name} takes 3-channel images; the data loader replicates gray images to 3 channels")
        kwargs: dict[str, Any] = {}
        if name in _AUX_HEADS:
            kwargs = {"aux_logits": False, "init_weights": True}  # init_weights stated: no FutureWarning
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        if name in _AUX_HEADS:
            model.register_load_state_dict_pre_hook(DropKeys(_AUX_HEADS[name]))
        return model

    return build


@functools.cache
def torchvision_spec(name: str) -> ModelSpec:
    side, min_size = _torchvision_sizes(name)
    fixed = name.startswith(_FIXED_PREFIXES)
    return ModelSpec(name, (3, side, side), _torchvision_builder(name), f"torchvision {name} (random init, no download)",
                     min_size=(side, side) if fixed else min_size, fixed_size=fixed)  # fmt: skip


# --- package.module:callable ------------------------------------------------------------------------------


def import_model_spec(path: str) -> ModelSpec:
    """A user's model: ``path`` is ``package.module:callable`` (``module:Class.factory`` works too).

    The contract: the callable is called as ``fn(num_classes=N, in_channels=C)`` when it has a parameter
    named ``in_channels``, else as ``fn(num_classes=N)`` (a parameter ``num_classes`` or ``**kwargs`` is
    required), and must return an ``nn.Module`` mapping ``(B, C, H, W)`` float images to ``(B, N)`` logits.
    Optional attributes on the callable: ``input_shape`` (C, H, W; default (3, 224, 224)), ``min_size``
    (H, W; default (1, 1)) and ``fixed_size`` (True: it takes only ``input_shape``). The module is imported
    from the installed packages, then from the current directory.
    """
    fn = _resolve(path)
    kwargs = _call_contract(path, fn)
    shape = _shape_attr(path, fn, "input_shape", 3, (3, 224, 224))
    min_size = _shape_attr(path, fn, "min_size", 2, (1, 1))
    fixed = bool(getattr(fn, "fixed_size", False))

    def build(num_classes: int, in_channels: int) -> nn.Module:
        args = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if k in kwargs}
        call = f"{path}({', '.join(f'{k}={v}' for k, v in args.items())})"
        try:
            model = fn(**args)
        except PrunekitError:
            raise
        except Exception as exc:
            raise PrunekitError(f"--model {path}: {call} raised {type(exc).__name__}: {exc}; fix the model builder") from exc
        if not isinstance(model, nn.Module):
            raise PrunekitError(f"--model {path}: {call} returned a {type(model).__name__}, not a torch.nn.Module; "
                                "return the model instance")  # fmt: skip
        return model

    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return ModelSpec(path, shape, build, doc[0] if doc else f"user model {path}", min_size=min_size, fixed_size=fixed)  # type: ignore[arg-type]


def _import(path: str, module_name: str) -> Any:
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # after installed packages: a local file never shadows one
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PrunekitError(f"--model {path}: no module named '{exc.name}'; install it, run from the directory "
                                "that holds it, or add that directory to PYTHONPATH") from None  # fmt: skip
        raise PrunekitError(f"--model {path}: importing {module_name} failed: it imports '{exc.name}', which is "
                            "not installed; install it") from exc  # fmt: skip
    except Exception as exc:
        raise PrunekitError(f"--model {path}: importing {module_name} raised {type(exc).__name__}: {exc}; "
                            "fix the module") from exc  # fmt: skip


def _resolve(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or ":" in attr:
        raise PrunekitError(f"--model {path}: an import path is package.module:callable, e.g. my_pkg.models:build")
    obj = _import(path, module_name)
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {', '.join(names[:8]) or 'no public callables'}"
            raise PrunekitError(f"--model {path}: {owner} has no attribute '{part}'{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PrunekitError(f"--model {path}: {attr} is a {type(obj).__name__}, not callable; name a function or class "
                            "that returns an nn.Module")  # fmt: skip
    return obj


def _call_contract(path: str, fn: Callable[..., Any]) -> set[str]:
    """Which of num_classes / in_channels ``fn`` takes by name."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins): pass num_classes only
        return {"num_classes"}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "num_classes" not in params and not var_kw:
        raise PrunekitError(f"--model {path}: the callable takes ({', '.join(params)}); it must take num_classes "
                            "(and optionally in_channels) as keyword arguments")  # fmt: skip
    return {"num_classes", *(["in_channels"] if "in_channels" in params else [])}


def _shape_attr(path: str, fn: Any, attr: str, length: int, default: tuple[int, ...]) -> tuple[int, ...]:
    value = getattr(fn, attr, None)
    if value is None:
        return default
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != length or min(shape) < 1:
        raise PrunekitError(f"--model {path}: {attr} = {value!r}; set it to {length} positive ints, e.g. {default}")
    return shape


# --- lookup -------------------------------------------------------------------------------------------------


def model_spec(name: str) -> ModelSpec:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        return import_model_spec(name)
    if name in torchvision_names():
        return torchvision_spec(name)
    names = list_model_names()
    close = difflib.get_close_matches(name.lower(), names, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else f"built in: {', '.join(BUILTIN)}; "
    raise PrunekitError(f"unknown model '{name}'; {hint}`python -m prunekit.models` lists all {len(names)}; "
                        "your own model: --model package.module:callable")  # fmt: skip


def build_model(name: str, num_classes: int = 10, input_shape: tuple[int, int, int] | None = None) -> nn.Module:
    spec = model_spec(name)
    channels = (input_shape or spec.input_shape)[0]
    return spec.build(num_classes, channels)


def _main() -> None:
    for name in list_model_names():
        spec = model_spec(name)
        size = "x".join(map(str, spec.input_shape[1:]))
        limit = " (only this size)" if spec.fixed_size else (f" (min {spec.min_size[0]})" if spec.min_size != (1, 1) else "")
        print(f"{name:24s} {size}{limit}")


if __name__ == "__main__":
    _main()
