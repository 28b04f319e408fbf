"""The five stage hooks: the whole contract between the host and its plugins.

A *component* is a small class with a no-argument constructor implementing exactly one of these hooks
(decorated with ``prunekit.hookimpl``), published under the entry-point group of its stage (see
``STAGE_GROUPS``); the entry-point name is its name in registry.toml. A pipeline gets its own plugin
manager holding one component per stage, so hooks are ``firstresult`` and never compete.

Arguments. Implementations accept any subset of a spec's keyword arguments, by name (pluggy checks the
names when the pipeline loads: a misspelled argument is an error listing the spec's names). Every hook
receives ``params``: an instance of the component's own nested ``Params`` attrs class, structured from
the pipeline's ``[pipelines.NAME.params]`` table (``None`` when the component declares no ``Params``).

Optional class attributes a component may declare (the host reads them; nothing else is required):

* ``Params``: an attrs class; its fields are the registry keys this component accepts (a key several
  components declare goes to each). Validate in ``__attrs_post_init__`` and raise ``PrunekitError``
  naming the key and the fix; ``prunekit plugins`` lists the fields with types and defaults.
* ``host_defaults``: a dict of host parameters this component changes the default of (e.g. 1xN selects
  set ``{"keep_first_dense": True, "keep_last_dense": True}``); the registry still overrides them.
* ``needs``: a set drawn from ``prunekit.calibration.NEEDS`` -- ``"activations"`` (layer inputs and
  outputs on calibration inputs) and/or ``"grads"`` (loss gradients; needs labelled batches) -- or a
  method ``needs(params) -> set`` when a parameter chooses the criterion. The host
  then computes a ``LayerStats`` per layer once per mask update and passes it as ``stats`` to the score
  and select hooks (``None`` when no component of the pipeline needs data).
* ``tolerance`` (kernel components): the largest relative error of the compiled model against the masked
  dense model that counts as correct, a float or a method ``tolerance(params) -> float`` (default
  ``DEFAULT_TOLERANCE``, 1e-4 for fp32); ``prunekit bench`` and ``run`` fail above it.
* ``epilogues`` (kernel components): the epilogue chains the kernel can fuse into a layer's output store,
  in ``prunekit.fusion``'s vocabulary with pooling written ``maxpool*`` (e.g. ``{"bias+relu",
  "bias+add+relu"}``; ``prunekit.fusion.every_chain()`` is all of them), or a method ``epilogues(params)``.
  With the host parameter ``fuse`` (default true) the host then folds eval-mode BatchNorm into the convs
  at ``finalize``, sets ``LayerInfo.epilogue`` to the longest declared prefix of what follows each conv,
  expects ``CompiledLayer.fused`` back (``None`` = not fused), and also offers the layers it keeps dense
  (first conv, grouped convs ...) to ``prunekit_build_kernel`` with a dense ``Layout`` (the layout stage run
  on an all-True Selection with ``dense_reason``) when they have an epilogue; for those only ``fused`` is
  used, the dense layer stays in the model. The model then runs a rewritten forward (``prunekit.fusion``).
  Kernels without ``epilogues`` see none of this.

Errors. Raise ``prunekit.SelectionError`` (select/score: the layer cannot be pruned as asked),
``prunekit.LayoutError`` (layout/kernel: data not built for this layer), or ``prunekit.PrunekitError``
(anything else the user can fix), with a message naming the layer and the fix. The host adds the
stage, component, distribution and layer to every error a hook raises, and to a hook that returns
``None`` or the wrong type, and reports it as one line (``prunekit: error: ...``, exit status 2).
"""

from __future__ import annotations

from typing import Any

import pluggy
import torch

from prunekit.records import CompiledLayer, LayerInfo, LayerStats, Layout, ScheduleDecision, Selection

PROJECT = "prunekit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# stage -> (entry-point group, hook name): the only place stages are named; the registry's per-pipeline
# keys, `prunekit plugins` and the plugin loader are all derived from it.
STAGE_GROUPS: dict[str, tuple[str, str]] = {
    "schedule": ("prunekit.schedule", "prunekit_schedule"),
    "score": ("prunekit.score", "prunekit_score"),
    "select": ("prunekit.select", "prunekit_select_mask"),
    "layout": ("prunekit.layout", "prunekit_transform_layout"),
    "kernel": ("prunekit.kernel", "prunekit_build_kernel"),
}
STAGES: tuple[str, ...] = tuple(STAGE_GROUPS)
OPTIONAL_STAGES: frozenset[str] = frozenset({"layout", "kernel"})
RETURNS: dict[str, type] = {
    "schedule": ScheduleDecision,
    "score": torch.Tensor,
    "select": Selection,
    "layout": Layout,
    "kernel": CompiledLayer,
}
DEFAULT_TOLERANCE = 1e-4  # max relative error of a compiled fp32 model against masked dense


@hookspec(firstresult=True)
def prunekit_schedule(step: int, total_steps: int, target: float, params: Any) -> ScheduleDecision:
    """Say how sparse the layers should be at ``step``, whether masks change now, and whether to
    snapshot or rewind the weights (see ``ScheduleDecision`` for the order the host acts in).

    ``step`` counts from 0 in the unit the training loop ticks (the CLI ticks once per epoch);
    ``total_steps`` is the length of the fine-tuning run, so a schedule can refuse a ramp that does not
    fit; ``target`` is the pipeline's final sparsity in [0, 1).

    Invariants: ``0 <= sparsity <= target``; a schedule is a pure function of its arguments (resuming at
    step k gives the same decisions as running to k; the host asks for every step up front to check the
    plan and to find the rewind points); ``final`` stays True once set; ``rewind`` only after a
    ``snapshot`` at an earlier or the same step.
    """


@hookspec(firstresult=True)
def prunekit_score(
    layer: LayerInfo,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    params: Any,
    generator: torch.Generator,
    stats: LayerStats | None,
) -> torch.Tensor:
    """Return the importance of the layer's weights; higher means keep.

    ``weight`` is a detached view of the live trainable parameter (raw: pruned positions not zeroed);
    do not modify it. ``mask`` is the current bool keep-mask, or ``None`` before the first selection.
    ``stats`` holds the calibration statistics when the component declares ``needs``.
    The result either has ``weight.shape`` (one score per weight) or is the block grid that the paired
    select component documents (e.g. ``[Cout/N, Cin]`` for 1×N blocks). Random criteria draw only from
    ``generator`` (seeded per seed, step and layer) so the same seed gives the same scores.
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
    stats: LayerStats | None,
) -> Selection:
    """Turn scores into a keep-mask (and any permutation) for one layer at ``sparsity``.

    ``weight`` is as for the score hook; ``sparsity`` is what the schedule asks for now; ``target`` the
    pipeline's final sparsity (progressive methods with regrowth prune to ``target`` and regrow the
    difference); ``previous`` is this layer's last Selection (``None`` at first); ``all_scores`` maps
    every selected layer's name to its scores at this step, for criteria that rank across layers.

    Invariants: ``mask`` is bool with ``weight.shape`` in the original index space; in permuted
    coordinates it is constant on every block of ``Selection.block`` (``0`` = the whole dim); the achieved
    sparsity is within one block of ``sparsity`` (report it in ``meta``); a layer the component leaves
    whole on purpose returns an all-True mask with ``dense_reason``; a selection that cannot be made
    (layer too small, shape not divisible) raises ``SelectionError`` naming the layer and the fix.
    """


@hookspec(firstresult=True)
def prunekit_transform_layout(layer: LayerInfo, weight: torch.Tensor, selection: Selection, params: Any) -> Layout:
    """Pack the masked weight (``weight * mask``, already baked) into the form the paired kernel reads.

    Invariants: the layout holds the same function (densifying it gives ``weight * mask`` exactly, in the
    original index space, permutations folded into its index arrays); ``Layout.nbytes`` is the real
    storage cost; a selection whose block shape the layout cannot take raises ``LayoutError`` (the host
    runs this stage in ``Pipeline.check`` before any training, so that happens in seconds).
    """


@hookspec(firstresult=True)
def prunekit_build_kernel(layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, params: Any) -> CompiledLayer:
    """Build the module that replaces the layer at inference.

    The module takes the layer's input (``[B, Cin, H, W]`` or ``[..., in]``) and returns exactly what the
    masked dense layer returns, bias included (within the component's ``tolerance``). Where the sparse
    path would be slower or cannot run, return a dense module and say so in ``kernel``/``reason`` rather
    than failing; a layout of another format raises ``LayoutError``.

    ``layer.epilogue`` non-empty (only for a component declaring ``epilogues``): also return
    ``CompiledLayer.fused``, the layer followed by that chain (see ``CompiledLayer``), or ``None`` to
    decline; ``module`` still computes the layer alone. ``layer.input_shape`` (when the host had an
    example) lets the kernel decide per layer on the real batch and spatial size.
    """
