"""The five stage hooks: the whole contract between the host and its plugins.

A *component* is a small class implementing exactly one of these hooks (decorated with
``prunekit.hookimpl``), published under the entry-point group of its stage (see ``STAGE_GROUPS``). A pipeline
gets its own plugin manager holding one component per stage, so hooks are ``firstresult`` and never compete.

Every hook receives ``params``: an instance of the component's own ``Params`` attrs class, structured from
the pipeline's ``[pipelines.NAME.params]`` table (``None`` when the component declares no ``Params``).
Implementations may accept any subset of the keyword arguments below (pluggy passes them by name).
"""

from __future__ import annotations

from typing import Any

import pluggy
import torch

from prunekit.records import CompiledLayer, LayerInfo, Layout, ScheduleDecision, Selection

PROJECT = "prunekit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# stage -> (entry-point group, hook name); the only place stages are named.
STAGE_GROUPS: dict[str, tuple[str, str]] = {
    "schedule": ("prunekit.schedule", "prunekit_schedule"),
    "score": ("prunekit.score", "prunekit_score"),
    "select": ("prunekit.select", "prunekit_select_mask"),
    "layout": ("prunekit.layout", "prunekit_transform_layout"),
    "kernel": ("prunekit.kernel", "prunekit_build_kernel"),
}
STAGES: tuple[str, ...] = tuple(STAGE_GROUPS)
OPTIONAL_STAGES: frozenset[str] = frozenset({"layout", "kernel"})


@hookspec(firstresult=True)
def prunekit_schedule(step: int, total_steps: int, target: float, params: Any) -> ScheduleDecision:
    """Say how sparse the layers should be at ``step`` and whether masks change now.

    ``step`` counts from 0 in the unit the training loop ticks (the CLI ticks once per epoch);
    ``total_steps`` is the length of the fine-tuning run, so a schedule can refuse a ramp that does not
    fit; ``target`` is the pipeline's final sparsity in [0, 1).

    Invariants: ``0 <= sparsity <= target``; a schedule is a pure function of its arguments (resuming at
    step k gives the same decisions as running to k); ``final`` stays True once set.
    """


@hookspec(firstresult=True)
def prunekit_score(
    layer: LayerInfo,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    params: Any,
    generator: torch.Generator,
) -> torch.Tensor:
    """Return the importance of the layer's weights; higher means keep.

    ``weight`` is the raw (unmasked) weight; ``mask`` the current keep-mask or ``None`` before the first
    selection. The result either has ``weight.shape`` (one score per weight) or is the block grid that the
    paired select component documents (e.g. ``[Cout/N, Cin]`` for 1×N blocks). Must not modify ``weight``;
    random criteria draw only from ``generator`` so that the same seed gives the same scores.
    """


@hookspec(firstresult=True)
def prunekit_select_mask(
    layer: LayerInfo,
    weight: torch.Tensor,
    scores: torch.Tensor,
    sparsity: float,
    target: float,
    previous: Selection | None,
    params: Any,
    generator: torch.Generator,
    all_scores: dict[str, torch.Tensor],
) -> Selection:
    """Turn scores into a keep-mask (and any permutation) for one layer at ``sparsity``.

    ``sparsity`` is what the schedule asks for now; ``target`` the pipeline's final sparsity (progressive
    methods with regrowth prune to ``target`` and regrow the difference).
    ``previous`` is this layer's last Selection (``None`` at first); ``all_scores`` maps every selected
    layer's name to its scores at this step, for criteria that rank across layers (global thresholds).

    Invariants: ``mask`` is bool with ``weight.shape`` in the original index space; in permuted
    coordinates it is constant on every block of ``Selection.block``; the achieved sparsity is within one
    block of ``sparsity`` (report the achieved figure in ``meta``); a selection that cannot be made (layer
    too small, shape not divisible) raises ``prunekit.errors.SelectionError`` naming the layer and the fix.
    """


@hookspec(firstresult=True)
def prunekit_transform_layout(
    layer: LayerInfo, weight: torch.Tensor, selection: Selection, params: Any
) -> Layout:
    """Pack the masked weight (``weight * mask``) into the form the paired kernel reads.

    Invariants: the layout holds the same function (densifying it gives ``weight * mask`` exactly, in the
    original index space, permutations folded into its index arrays); ``Layout.nbytes`` is the real
    storage cost.
    """


@hookspec(firstresult=True)
def prunekit_build_kernel(
    layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, params: Any
) -> CompiledLayer:
    """Build the module that replaces the layer at inference.

    The module takes the layer's input (``[B, Cin, H, W]`` or ``[..., in]``) and returns exactly what the
    masked dense layer returns, bias included. Where the sparse path would be slower or cannot run, return
    a dense module and say so in ``kernel``/``reason`` rather than failing.
    """
