"""The replacement modules: run the triton-block kernels on a packed Layout (or refuse clearly)."""

from __future__ import annotations

import os

import torch
from torch import nn

from prunekit.errors import LayoutError
from prunekit.records import LayerInfo, Layout

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = ("ieee", "tf32", "tf32x3")


def interpreter_enabled() -> bool:
    """Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``, read the way Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def alloc_output(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Uninitialised output (tests replace this with a NaN-filled buffer to prove every element is written)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def row_tile(bm: int) -> int:
    """tl.dot tile height: the next power of two >= max(16, bm); rows past bm are masked to zero."""
    return max(16, 1 << (bm - 1).bit_length())


class TritonBlock(nn.Module):
    """Common state: the layout's tensors as buffers (``.to(dtype/device)`` moves them like any module)."""

    def __init__(self, layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, precision: str, tile_p: int) -> None:
        super().__init__()
        t = layout.tensors
        self.register_buffer("values", t["values"].detach().clone())
        self.register_buffer("cols", t["cols"].clone())
        self.register_buffer("crow", t["crow"].clone())
        self.register_buffer("rows", t["rows"].clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.layer = layer
        self.bm, self.bk = int(layout.meta["bm"]), int(layout.meta["bk"])
        self.m, self.k = (int(v) for v in layout.meta["gemm_shape"])
        self.nrb = int(layout.meta["row_blocks"])
        self.chunks = int(layout.meta["chunks"])  # part of the autotune key: the best tile depends on density
        self.precision = precision
        self.tile_p = tile_p
        self.pattern = layout.meta.get("pattern", "")

    def extra_repr(self) -> str:
        return (
            f"{self.layer.kind} {tuple(self.layer.weight_shape)}, {self.pattern}, chunks={int(self.crow[-1])} "
            f"x {self.bk}, precision={self.precision}" + (", K-major input" if getattr(self, "kmajor", False) else "")
        )

    def _mode(self, x: torch.Tensor) -> str:
        if x.dtype not in DTYPES:
            raise LayoutError(f"{self.layer.name}: input dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
        if x.dtype != self.values.dtype:
            raise LayoutError(
                f"{self.layer.name}: input is {x.dtype} but the packed weights are {self.values.dtype}; "
                f"convert the module (module.to({x.dtype})) or the input"
            )
        if x.device != self.values.device:
            raise LayoutError(
                f"{self.layer.name}: input on {x.device} but the packed weights on {self.values.device}; "
                f"move the module (module.to({str(x.device)!r})) or the input"
            )
        if x.is_cuda:
            return "gpu"
        if interpreter_enabled():
            return "interpreter"
        raise LayoutError(
            f"{self.layer.name}: the Triton kernel got a {x.device} tensor; run it on a CUDA device or set "
            "TRITON_INTERPRET=1 (CPU interpreter, slow)"
        )

    def _common(self, x: torch.Tensor, mode: str) -> tuple[dict, dict]:
        upcast = mode == "interpreter" and x.dtype == torch.bfloat16
        prec = self.precision if x.dtype == torch.float32 else "ieee"
        meta = dict(HAS_BIAS=self.bias is not None, BM=self.bm, BM_TILE=row_tile(self.bm), BK=self.bk, PREC=prec, UPCAST=upcast)
        ptrs = dict(
            vals_ptr=self.values, cols_ptr=self.cols, crow_ptr=self.crow, rows_ptr=self.rows,
            bias_ptr=self.bias if self.bias is not None else self.values,
        )  # fmt: skip
        return ptrs, meta

    def _launch(self, kind: str, mode: str, p: int, args: dict, meta: dict, device: torch.device) -> None:
        from prunekit_triton.kernels import INTERPRETER_BN, compiled

        nrb = self.nrb
        if mode == "interpreter":
            grid = (nrb * -(-p // INTERPRETER_BN),)
            compiled(kind, mode)[grid](**args, **meta, BN=INTERPRETER_BN)
            return
        grid = lambda cfg: (nrb * -(-p // cfg["BN"]),)  # noqa: E731
        with torch.cuda.device(device):
            if self.tile_p:
                compiled(kind, mode, tuned=False)[grid](**args, **meta, BN=self.tile_p, num_warps=4, num_stages=3)
            else:
                compiled(kind, mode)[grid](**args, **meta)


class TritonBlockLinear(TritonBlock):
    """``F.linear(x, W*mask, bias)`` through the triton-block kernel.

    ``kmajor``: gather from a ``[K, P]`` copy of the input (one transpose per call) instead of the ``[P, K]``
    input itself. Chosen when the layout's kept columns are scattered (1xN rows): row-major gathers of single
    columns would fetch a 32-byte sector per 4-byte value, K-major gathers read whole rows of positions.
    b x b blocks keep their columns in runs and gather from the input as it is.
    """

    def __init__(self, layer: LayerInfo, layout: Layout, bias: torch.Tensor | None, precision: str, tile_p: int) -> None:
        super().__init__(layer, layout, bias, precision, tile_p)
        self.kmajor = float(layout.meta.get("contiguous", 1.0)) < 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode(x)
        if x.shape[-1] != self.k:
            raise LayoutError(f"{self.layer.name}: input has {x.shape[-1]} features, the layer takes {self.k}")
        x2 = x.reshape(-1, self.k)
        p = x2.shape[0]
        y = alloc_output((p, self.m), x)
        if p and self.nrb:
            ptrs, meta = self._common(x, mode)
            xs = x2.t().contiguous() if self.kmajor else x2  # [K, P] or [P, K]; strides tell the kernel which
            sxp, sxk = (xs.stride(1), xs.stride(0)) if self.kmajor else (xs.stride(0), xs.stride(1))
            args = dict(
                x_ptr=xs, y_ptr=y, M=self.m, K=self.k, P=p, NRB=self.nrb, CHUNKS=self.chunks,
                stride_xp=sxp, stride_xk=sxk, stride_yp=y.stride(0), stride_ym=y.stride(1), **ptrs,
            )  # fmt: skip
            self._launch("linear", mode, p, args, {**meta, "KMAJOR": self.kmajor}, x.device)
        return y.reshape(*x.shape[:-1], self.m)


class TritonBlockConv2d(TritonBlock):
    """``F.conv2d(x, W*mask, bias, stride, padding, dilation)`` as an implicit GEMM (no im2col buffer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode(x)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        cout, cin, kh, kw = self.layer.weight_shape
        if x.dim() != 4 or x.shape[1] != cin:
            raise LayoutError(f"{self.layer.name}: input {tuple(x.shape)} is not [B, {cin}, H, W]")
        (sh, sw), (ph, pw), (dh, dw) = self.layer.stride, self.layer.padding, self.layer.dilation
        b, _, h, w = x.shape
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh <= 0 or ow <= 0:
            raise LayoutError(f"{self.layer.name}: input {h}x{w} is smaller than the (dilated) kernel")
        y = alloc_output((b, cout, oh, ow), x)
        p = b * oh * ow
        if p and self.nrb:
            ptrs, meta = self._common(x, mode)
            args = dict(
                x_ptr=x, y_ptr=y, M=self.m, K=self.k, P=p, NRB=self.nrb, CHUNKS=self.chunks,
                H=h, W=w, OH=oh, OW=ow, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
                sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
                syn=y.stride(0), syc=y.stride(1), syh=y.stride(2), syw=y.stride(3), **ptrs,
            )  # fmt: skip
            self._launch("conv2d", mode, p, args, {**meta, "KH": kh, "KW": kw}, x.device)
        return y.squeeze(0) if unbatched else y
