"""CSR storage of the masked weight on its GEMM view ``[Cout, Cin*kh*kw]``.

Tensors: ``values`` fp32 ``[nnz]``, ``col_indices`` ``[nnz]`` and ``crow_indices`` ``[M + 1]``, both int32
while ``nnz`` and ``K`` fit (int64 otherwise; torch needs both index arrays in one dtype). The non-zeros are
exactly the mask's kept positions (a kept weight that happens to be 0.0 is stored), so ``nnz`` always
matches the mask and ``densify(to_csr(W, mask)) == W * mask``.

Storage: ``4·nnz + b·nnz + b·(M + 1)`` bytes for index width ``b``, against ``4·M·K`` dense; the
break-even sparsity is ``1 - (4·M·K - b·(M + 1)) / ((4 + b)·M·K)`` (just above 0.5 for int32 indices).
"""

from __future__ import annotations

import warnings

import torch

from prunekit import Layout, LayoutError, Selection, hookimpl
from prunekit.records import LayerInfo

INT32_MAX = 2**31 - 1
# torch warns once per process that sparse CSR is "beta"; the ops used here (construction, SpMM) are stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


def break_even_sparsity(m: int, k: int, index_bytes: int = 4, value_bytes: int = 4) -> float:
    """Sparsity above which CSR takes fewer bytes than the dense fp32 matrix ``[m, k]``."""
    dense = value_bytes * m * k
    max_nnz = (dense - index_bytes * (m + 1)) / (value_bytes + index_bytes)
    return min(1.0, max(0.0, 1.0 - max_nnz / (m * k)))


def to_csr(weight: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """CSR tensors of ``weight * mask`` viewed as ``[shape[0], prod(shape[1:])]``."""
    if tuple(mask.shape) != tuple(weight.shape):
        raise LayoutError(f"mask {tuple(mask.shape)} does not match weight {tuple(weight.shape)}; pass the layer's own mask")
    m = weight.shape[0]
    w2 = weight.detach().reshape(m, -1)
    keep = mask.detach().to(torch.bool).reshape(m, -1)
    k = w2.shape[1]
    nnz = int(keep.sum())
    index_dtype = torch.int32 if max(nnz, k) <= INT32_MAX else torch.int64
    rows, cols = keep.nonzero(as_tuple=True)  # row-major order
    counts = torch.bincount(rows, minlength=m)
    crow = torch.zeros(m + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = torch.cumsum(counts, 0)
    return {
        "values": w2[rows, cols].to(torch.float32).contiguous(),
        "col_indices": cols.to(index_dtype).contiguous(),
        "crow_indices": crow.to(index_dtype).contiguous(),
    }


def csr_matrix(layout: Layout) -> torch.Tensor:
    """The layout as a ``torch.sparse_csr_tensor`` of its GEMM view."""
    t = layout.tensors
    m = layout.dense_shape[0]
    k = layout.meta["gemm_shape"][1]
    return torch.sparse_csr_tensor(t["crow_indices"], t["col_indices"], t["values"], size=(m, k), check_invariants=False)


def densify(layout: Layout) -> torch.Tensor:
    """The dense weight (original shape) the layout holds: exactly ``W * mask``."""
    if layout.format != "csr":
        raise LayoutError(f"densify expects a csr layout, got {layout.format!r}")
    t = layout.tensors
    m = layout.dense_shape[0]
    k = layout.meta["gemm_shape"][1]
    crow = t["crow_indices"].to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(m, device=crow.device), crow[1:] - crow[:-1])
    out = torch.zeros(m, k, dtype=t["values"].dtype, device=t["values"].device)
    out[rows, t["col_indices"].to(torch.int64)] = t["values"]
    return out.reshape(layout.dense_shape)


class CsrLayout:
    """CSR (fp32 values, int32 column indices and row pointers) of the GEMM view [Cout, Cin*kh*kw]."""

    @hookimpl
    def prunekit_transform_layout(self, layer: LayerInfo, weight: torch.Tensor, selection: Selection) -> Layout:
        tensors = to_csr(weight, selection.mask)
        m, k = layer.gemm_shape
        nnz = tensors["values"].numel()
        ib = tensors["col_indices"].element_size()
        return Layout(
            format="csr",
            dense_shape=tuple(weight.shape),
            tensors=tensors,
            meta={
                "gemm_shape": [m, k],
                "nnz": nnz,
                "sparsity": 1.0 - nnz / max(m * k, 1),
                "index_dtype": str(tensors["col_indices"].dtype).removeprefix("torch."),
                "break_even_sparsity": break_even_sparsity(m, k, ib),
            },
        )
