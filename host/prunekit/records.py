"""Records that cross the hook boundary.

Every value a hook receives or returns is one of these attrs classes (or a plain tensor), so that plugins
written by different people agree on one vocabulary. Tensors live in the weight's own index space unless a
field says otherwise.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch

LayerKind = Literal["conv2d", "linear"]


@attrs.frozen
class LayerInfo:
    """What a component may know about one prunable layer (no reference to the module itself).

    ``weight_shape`` is PyTorch's: conv ``[Cout, Cin/groups, kh, kw]``, linear ``[out, in]``. The GEMM view
    every block pattern is stated on is ``[Cout, Cin·kh·kw]`` with column order ``(cin, kh, kw)``.
    """

    name: str
    kind: LayerKind
    weight_shape: tuple[int, ...]
    has_bias: bool = False
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    index: int = 0  # position among the selected layers, in module order
    count: int = 1  # number of selected layers
    input_shape: tuple[int, ...] | None = None  # one input's shape, known when compile() got an example
    # what follows the layer in the model and the kernel is asked to fuse (prunekit.fusion): a chain such as
    # "bias+add+relu"; empty = nothing. Only set for a kernel that declares `epilogues` covering the chain.
    epilogue: str = ""

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def gemm_shape(self) -> tuple[int, int]:
        """``(M, K)`` of the weight viewed as ``[Cout, Cin·kh·kw]``."""
        k = 1
        for d in self.weight_shape[1:]:
            k *= d
        return (self.weight_shape[0], k)

    @property
    def numel(self) -> int:
        m, k = self.gemm_shape
        return m * k


@attrs.frozen
class ScheduleDecision:
    """What the schedule says at one step; the host acts on it in one place (``Pipeline.step``), in order:

    1. ``update``: masks are recomputed at ``sparsity`` (the fraction of weights to remove now, already
       ramped by the schedule);
    2. ``rewind``: every parameter and buffer of the model (masks excepted) is restored from the snapshot
       taken at ``rewind_step`` (``None``: the latest snapshot), so the effective weights become
       ``snapshot * mask`` (lottery tickets); the CLI's training loop then restarts its optimizer and
       learning-rate schedule, since training starts over from the rewound weights;
    3. ``snapshot``: all parameters and buffers (masks excepted) are saved as the rewind point of this
       step, before this step trains. Snapshots are part of the saved state, so a resumed run rewinds to
       the same weights.

    ``final`` means no later step changes the masks; ``note`` is shown in progress bars and reports.
    """

    step: int
    sparsity: float
    update: bool
    final: bool = False
    rewind: bool = False
    rewind_step: int | None = None
    snapshot: bool = False
    note: str = ""


@attrs.frozen
class Selection:
    """The output of the select stage for one layer.

    ``mask``: bool tensor, the weight's shape and index space (True = kept).
    ``perms``: one entry per weight dim, ``None`` for identity, else a LongTensor ``p`` with ``p[slot] =
    original index``: in permuted coordinates (``weight[p0][:, p1]...``) the mask is block-shaped.
    ``block``: block extent per weight dim in permuted coordinates (``(1, 1, 1, 1)`` for unstructured).
    ``block``: block extent per weight dim in permuted coordinates: ``(1, 1, 1, 1)`` for unstructured,
    ``0`` = the whole dimension (``(16, 1, 0, 0)`` is 16 output channels x one input channel x all taps);
    empty ``()`` = the selection states no block shape (layouts that need one raise ``LayoutError``).
    ``soft``: pruned weights keep receiving gradients (straight-through), plus ``pruned_decay``·w on them.
    ``pattern``: the pattern in words for reports (``"2:4"``, ``"1x16 ..."``); empty = derived from ``block``.
    ``dense_reason``: non-empty when the select stage left this layer whole on purpose (a policy such as
    ``cout_policy = "skip"``); the mask is then all True and reports show the layer as dense with this reason.
    ``meta``: small JSON-able facts for the report (criterion, policy, achieved counts, ...).
    """

    mask: torch.Tensor
    perms: tuple[torch.Tensor | None, ...] = ()
    block: tuple[int, ...] = ()
    soft: bool = False
    pruned_decay: float = 0.0
    pattern: str = ""
    dense_reason: str = ""
    meta: dict[str, Any] = attrs.field(factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.float().mean())

    def perm(self, dim: int) -> torch.Tensor | None:
        return self.perms[dim] if dim < len(self.perms) else None


@attrs.frozen
class LayerStats:
    """Data-derived statistics of one layer, computed by the host once per mask update from calibration
    batches, for components that declare ``needs`` (see ``prunekit.hookspecs``). Fields a component did
    not ask for are ``None``. Sums run over every calibration batch; divide by ``samples`` or
    ``positions`` for means.

    With ``"activations"`` (inputs only, no labels):
      ``input_sq``  ``[K]`` sum of squares of the layer's input per GEMM column, over all positions
                    (conv: the im2col columns ``(cin, kh, kw)``, padding included as zeros; linear: the
                    ``in`` features). Wanda's ``||X_j||_2`` is ``input_sq.sqrt()``.
      ``output_abs`` / ``output_sq``  ``[Cout]`` sum of ``|y|`` / ``y**2`` of the layer's own output
                    (before any norm or activation) per output channel, over all positions.
      ``positions`` input positions summed per sample and column (conv: ``Hout*Wout``; linear: rows).
    With ``"grads"`` (needs labels and the loss):
      ``grad``      ``[weight shape]`` sum over batches of ``dL_b/dW`` of the *effective* (masked) weight,
                    ``L_b`` the mean loss of batch ``b``.
      ``grad_sq``   ``[weight shape]`` sum over batches of ``(dL_b/dW)**2`` (empirical Fisher diagonal).
    With both: ``output_taylor`` ``[Cout]`` sum over samples of ``|sum over positions of y * dL/dy|`` per
    output channel (the channel saliency / Taylor criterion).
    """

    name: str
    batches: int
    samples: int
    positions: int = 0
    input_sq: torch.Tensor | None = None
    output_abs: torch.Tensor | None = None
    output_sq: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None
    output_taylor: torch.Tensor | None = None


@attrs.frozen
class Layout:
    """A packed, kernel-ready form of one masked weight.

    ``format`` names the packing (``csr``, ``bsr``, ``pack-1xn`` ...); ``tensors`` hold everything the kernel
    reads (values, indices, pointers, permutations); ``meta`` holds small scalars (block size, uniform or
    not, ...). ``dense_shape`` is the weight's shape.
    """

    format: str
    dense_shape: tuple[int, ...]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = attrs.field(factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of packed storage: every tensor the kernel needs."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def dense_nbytes(self) -> int:
        n = 1
        for d in self.dense_shape:
            n *= d
        return 4 * n


@attrs.frozen
class CompiledLayer:
    """What build_kernel returns: the replacement module and the name of what runs in it.

    ``module`` computes exactly the masked dense layer's function (bias included). ``kernel`` names the
    code path that runs (``"cpu-1xn/avx512"``, ``"dense-fallback"`` ...) and ``reason`` says why, when a
    fallback was chosen.

    ``fused`` (optional, only when ``LayerInfo.epilogue`` is set): a module computing the layer followed by
    that epilogue, called as ``fused(x, *tensors)`` with the per-call tensors of the chain's ``bias`` (shift,
    ``[Cout]``) and ``add`` (residual, the output's shape) in that order; it must match
    ``prunekit.fusion.apply_epilogue(module(x), epilogue, *tensors)``. It may share ``module``'s tensors.
    ``None``: the host runs the epilogue's ops itself, after ``module``.
    """

    module: torch.nn.Module
    kernel: str
    reason: str = ""
    fused: torch.nn.Module | None = None
