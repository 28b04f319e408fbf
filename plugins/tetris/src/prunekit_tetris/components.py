"""The components: score ``tetris-l1``, select ``tetris`` (tile matching) and ``blocks`` (no reordering)."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from prunekit import LayerInfo, Selection, SelectionError, hookimpl
from prunekit_tetris.config import load_config
from prunekit_tetris.geometry import POLICIES, BlockPlan, expand_block, plan_blocks
from prunekit_tetris.tiling import tile

SOLVERS = ("greedy", "exact")
# The first conv (1-3 input channels) and the classifier (10 outputs) rarely divide a block; a config or
# a registry entry that prunes them sets these to false.
HOST_DEFAULTS = {"keep_first_dense": True, "keep_last_dense": True}


class TetrisL1:
    """|w| per weight (TETRIS's element importance; block importance = sum over the block)."""

    @hookimpl
    def prunekit_score(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach()
        return (w.float() if w.dtype in (torch.float16, torch.bfloat16) else w).abs()


@attrs.define
class BlockParams:
    """Block geometry and per-layer rates shared by ``blocks`` and ``tetris``.

    ``block``: one size per weight dim, 0 = whole dim; for a conv ``[bo, bi]`` = ``[bo, bi, 0, 0]`` (all
    kh x kw taps); a Linear uses the first two entries. ``config`` / ``arch``: a TETRIS JSON config
    (path, or "published" for the shipped vgg16 / vgg16_bn / alexnet settings) giving each layer's block
    and rate; it replaces ``block`` and the host ``sparsity`` (rates scale by sparsity/target while a
    schedule ramps). ``nondivisible``: "error" | "pad" (zero slices pinned to the tail slots) | "shrink"
    (largest divisor of the dim <= block that leaves >= 2 blocks).
    """

    block: list[int] = attrs.field(factory=lambda: [32, 32])
    config: str = ""
    arch: str = ""
    nondivisible: str = "error"

    def __attrs_post_init__(self) -> None:
        if not self.config and (not self.block or len(self.block) > 4 or any(b < 0 for b in self.block)):
            raise SelectionError(f"block = {self.block}: give 1-4 sizes >= 0, one per weight dim (0 = whole dim), e.g. [8, 8]")
        if self.nondivisible not in POLICIES:
            raise SelectionError(f"nondivisible = '{self.nondivisible}' is unknown; use one of {', '.join(POLICIES)}")
        if self.arch and not self.config:
            raise SelectionError(f"arch = '{self.arch}' is set without config; set config = \"published\" or a JSON path")
        if self.config:
            load_config(self.config, self.arch)  # fail at pipeline load, not at the first prune


@attrs.define
class TetrisParams(BlockParams):
    """Plus the reordering: ``solver`` "greedy" (the paper's best-gain pairwise swaps) or "exact" (linear
    assignment per axis); ``tol`` stop when an EM round lowers the pruned mass by <= tol x the layer's total
    |w|; ``max_iters`` EM rounds at most; ``max_axis_mib`` memory bound of one axis's working matrix
    (greedy n x n/b, exact n x n, fp64): longer axes are not permuted (greedy) or solved greedily (exact).
    """

    solver: str = "greedy"
    tol: float = 1e-7
    max_iters: int = 20
    max_axis_mib: int = 256

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.solver not in SOLVERS:
            raise SelectionError(f"solver = '{self.solver}' is unknown; use 'greedy' or 'exact'")
        if not 0.0 <= self.tol < 1.0:
            raise SelectionError(f"tol = {self.tol} must be in [0, 1): it is relative to the layer's total |w|")
        if self.max_iters < 1 or self.max_axis_mib < 1:
            raise SelectionError("max_iters and max_axis_mib must be >= 1")


def describe(layer: LayerInfo, plan: BlockPlan) -> str:
    """The block in words, on the axes named once: output channels x input channels (x taps)."""
    b = plan.block
    words = f"{b[0]} output x {b[1]} input channels" if len(b) >= 2 else f"{b[0]} outputs"
    if len(b) == 4:
        kh, kw = plan.padded[2], plan.padded[3]
        taps = "all" if (b[2], b[3]) == (kh, kw) else f"{b[2]}x{b[3]} of"
        words += f" x {taps} {kh}x{kw} taps"
    return words


def _select(layer: LayerInfo, weight: torch.Tensor, scores: torch.Tensor, sparsity: float, target: float,
            params: BlockParams, reorder: bool) -> Selection:
    if tuple(scores.shape) != tuple(weight.shape):
        raise SelectionError(
            f"layer {layer.name}: scores of shape {tuple(scores.shape)} but weight {tuple(weight.shape)}; "
            "pair tetris/blocks with a per-weight score such as tetris-l1"
        )
    bad = weight.numel() - int(torch.count_nonzero(torch.isfinite(weight)))
    if bad or not bool(torch.isfinite(scores).all()):
        what = f"{bad} of {weight.numel()} weights are" if bad else "scores are"
        raise SelectionError(
            f"layer {layer.name}: {what} NaN or infinite; block sums over them order nothing: fix the weights first "
            "(NaN/Inf after training usually means it diverged: lower lr); the layer stays dense unless strict = true"
        )
    ndim = len(layer.weight_shape)
    entry = ""
    if params.config:
        cfg = load_config(params.config, params.arch)
        block, rate = cfg.entry(layer)
        entry = f" (config '{params.arch}' entry {layer.index})"
        rate = rate * (sparsity / target) if target > 0 else rate
    else:
        block = expand_block(params.block, ndim, layer.kind, f"layer {layer.name}")
        rate = sparsity
    plan = plan_blocks(tuple(layer.weight_shape), block, params.nondivisible, layer.name, entry)
    if isinstance(params, TetrisParams):
        kw: dict[str, Any] = dict(solver=params.solver, tol=params.tol, max_iters=params.max_iters, max_axis_mib=params.max_axis_mib)
    else:
        kw = {}
    res = tile(scores, plan, rate, reorder=reorder, **kw)
    meta = {
        "criterion": "block-l1",
        "method": "tetris" if reorder else "blocks",
        "pattern": describe(layer, plan),
        "block": list(plan.block),
        "rate": rate,
        "requested_sparsity": rate,  # the host's report column (the layer's own rate under a published config)
        # count_nonzero, not mask.float().mean() or mask.sum(): no fp32 or int64 copy of the layer (392 MiB for VGG16 fc6) for one number
        "achieved_sparsity": 1.0 - int(torch.count_nonzero(res.mask)) / max(res.mask.numel(), 1),
        **res.meta(),
    }
    if reorder:
        meta["solver"] = kw["solver"]
    if any(plan.pad):
        meta["padded"] = {str(d): p for d, p in enumerate(plan.pad) if p}
    if plan.shrunk:
        meta["shrunk"] = {str(d): list(v) for d, v in plan.shrunk.items()}
    if entry:
        meta["config"] = f"{params.config}:{params.arch}#{layer.index}"
    perms = tuple(res.perms) + (None,) * (ndim - len(res.perms))
    return Selection(mask=res.mask, perms=perms, block=plan.block, pattern=meta["pattern"], meta=meta)


class BlockSelect:
    """Plain block pruning: prune the lowest-L1 blocks, no reordering (TETRIS's first E-step)."""

    Params = BlockParams
    host_defaults = HOST_DEFAULTS

    @hookimpl
    def prunekit_select_mask(self, layer: LayerInfo, weight: torch.Tensor, scores: torch.Tensor, sparsity: float,
                             target: float, params: BlockParams | None) -> Selection:
        return _select(layer, weight, scores, sparsity, target, params or BlockParams(), reorder=False)


class TetrisSelect:
    """TETRIS tile matching: reorder each dim so small weights gather, then prune the lowest-L1 blocks."""

    Params = TetrisParams
    host_defaults = HOST_DEFAULTS

    @hookimpl
    def prunekit_select_mask(self, layer: LayerInfo, weight: torch.Tensor, scores: torch.Tensor, sparsity: float,
                             target: float, params: TetrisParams | None) -> Selection:
        return _select(layer, weight, scores, sparsity, target, params or TetrisParams(), reorder=True)

