"""Triton kernels: gathered-K block-sparse GEMM for Linear and implicit-GEMM Conv2d.

Program = (row-block, P-tile of ``BN`` output positions); the row-block index runs fastest, so every
row-block of one P-tile is scheduled together and the activations it gathers stay in L2. Each program
walks its row-block's chunks ``crow[rb]..crow[rb+1]``: load ``BK`` original column indices, gather the
activation tile at those columns (Linear: ``x[p, col]``; Conv: ``x[n, cin, oh*s-pad+kh*d, ow*s-pad+kw*d]``
decoded from ``col = cin*KH*KW + kh*KW + kw``, zero outside the image), load the ``[BK, BM]`` weight tile and
``acc[BN, BM] += x[BN, BK] @ w[BK, BM]`` in fp32. Positions are the dot's M dimension so Hopper's wgmma
(64 rows per warpgroup) serves 16- and 32-row blocks too (checked in the sm_90 compile test). Gathers are
issued along the contiguous axis: conv and K-major Linear load ``[BK, BN]`` tiles with positions fastest
(consecutive ow in NCHW / a row of ``x^T``) and transpose them in registers; row-major Linear loads
``[BN, BK]`` with columns fastest (runs of b columns for b x b blocks). Epilogue: bias, cast, store to the
original output rows ``rows[rb, m]``. Rows with no kept column still get their bias (never left unwritten).

The same Python functions are compiled two ways: ``JITFunction`` (+ ``triton.autotune`` keyed on the GEMM
shape, choice cached per key by Triton) for CUDA tensors, and ``InterpretedFunction`` with one fixed small
config for CPU tensors under ``TRITON_INTERPRET=1``. The interpreter's ``tl.dot`` returns garbage for bf16
operands (numpy has no bfloat16; checked on triton 3.8.0), so there the bf16 tiles are upcast to fp32
before the dot (``UPCAST``): bf16 x bf16 products are exact in fp32, as in the tensor-core MMA with fp32
accumulation, so only the summation order differs. The native bf16 dot runs only on a GPU.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


def _linear_kernel(
    x_ptr, vals_ptr, cols_ptr, crow_ptr, rows_ptr, bias_ptr, y_ptr,
    M, K, P, NRB, CHUNKS,
    stride_xp, stride_xk, stride_yp, stride_ym,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BM_TILE: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, KMAJOR: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rb = pid % NRB
    pt = pid // NRB
    offs_p = pt * BN + tl.arange(0, BN)
    p_ok = offs_p < P
    offs_m = tl.arange(0, BM_TILE)
    m_ok = offs_m < BM
    offs_k = tl.arange(0, BK)
    start = tl.load(crow_ptr + rb)
    end = tl.load(crow_ptr + rb + 1)
    p64 = offs_p.to(tl.int64)
    # acc is [positions, rows]: positions are the dot's M dimension (>= 64 per warpgroup, so Hopper's wgmma
    # applies even to 16- or 32-row blocks).
    acc = tl.zeros((BN, BM_TILE), dtype=tl.float32)
    for c in range(start, end):
        kidx = tl.load(cols_ptr + c * BK + offs_k)
        k_ok = kidx >= 0
        if KMAJOR:  # X stored [K, P]: load [BK, BN] with positions fastest (coalesced for any columns)
            xk = tl.load(x_ptr + kidx.to(tl.int64)[:, None] * stride_xk + p64[None, :] * stride_xp,
                         mask=k_ok[:, None] & p_ok[None, :], other=0.0)
            x = tl.trans(xk)
        else:  # X stored [P, K]: columns fastest (coalesced when kept columns come in runs: b x b blocks)
            x = tl.load(x_ptr + p64[:, None] * stride_xp + kidx[None, :] * stride_xk,
                        mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(vals_ptr + c * (BK * BM) + offs_k[:, None] * BM + offs_m[None, :], mask=m_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PREC)  # [BN, BK] x [BK, BM]
    rows = tl.load(rows_ptr + rb * BM + offs_m, mask=m_ok, other=-1)
    r_ok = rows >= 0
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + p64[:, None] * stride_yp + rows[None, :] * stride_ym
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & r_ok[None, :])


def _conv_kernel(
    x_ptr, vals_ptr, cols_ptr, crow_ptr, rows_ptr, bias_ptr, y_ptr,
    M, K, P, NRB, CHUNKS,
    H, W, OH, OW, SH, SW, PH, PW, DH, DW,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BM_TILE: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # The input tile is loaded [K, P] with output positions fastest (consecutive positions are consecutive ow
    # in NCHW, so the gather is coalesced along an image row) and transposed into the dot, whose M dimension
    # is positions (>= 64 per warpgroup: Hopper wgmma even for 16/32-row blocks).
    pid = tl.program_id(0)
    rb = pid % NRB
    pt = pid // NRB
    offs_p = pt * BN + tl.arange(0, BN)
    p_ok = offs_p < P
    n = offs_p // (OH * OW)
    rem = offs_p % (OH * OW)
    oh = rem // OW
    ow = rem % OW
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_img = x_ptr + n.to(tl.int64) * sxn
    offs_m = tl.arange(0, BM_TILE)
    m_ok = offs_m < BM
    offs_k = tl.arange(0, BK)
    start = tl.load(crow_ptr + rb)
    end = tl.load(crow_ptr + rb + 1)
    acc = tl.zeros((BN, BM_TILE), dtype=tl.float32)
    for c in range(start, end):
        kidx = tl.load(cols_ptr + c * BK + offs_k)
        cin = kidx // (KH * KW)
        tap = kidx % (KH * KW)
        ih = (tap // KW)[:, None] * DH + ih0[None, :]
        iw = (tap % KW)[:, None] * DW + iw0[None, :]
        ok = (kidx >= 0)[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xk = tl.load(x_img[None, :] + cin[:, None] * sxc + ih * sxh + iw * sxw, mask=ok, other=0.0)  # [BK, BN]
        w = tl.load(vals_ptr + c * (BK * BM) + offs_k[:, None] * BM + offs_m[None, :], mask=m_ok[None, :], other=0.0)
        x = tl.trans(xk)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PREC)  # [BN, BK] x [BK, BM]
    rows = tl.load(rows_ptr + rb * BM + offs_m, mask=m_ok, other=-1)
    r_ok = rows >= 0
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    out = tl.trans(acc)  # [BM, BN]: stores run along positions = along ow in NCHW
    y = y_ptr + rows[:, None] * syc + (n.to(tl.int64) * syn + oh * syh + ow * syw)[None, :]
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & p_ok[None, :])


INTERPRETER_BN = 32  # the one fixed config on the CPU interpreter (speed there is meaningless)


def gpu_configs() -> list[triton.Config]:
    """Autotune space: P-tile x warps x pipeline depth (>= 3 stages pays on Hopper, kernels.md 2.2)."""
    out = [
        triton.Config({"BN": bn}, num_warps=w, num_stages=s)
        for bn in (64, 128)
        for w in (4, 8)
        for s in (3, 4)
    ]
    out += [triton.Config({"BN": 32}, num_warps=4, num_stages=3), triton.Config({"BN": 256}, num_warps=8, num_stages=3)]
    return out


@functools.cache
def compiled(kind: str, mode: str, tuned: bool = True):  # noqa: ANN201
    """The kernel for ``kind`` ("linear"|"conv2d") on ``mode`` ("gpu"|"interpreter")."""
    fn = _linear_kernel if kind == "linear" else _conv_kernel
    if mode == "interpreter":
        return InterpretedFunction(fn)
    jit = JITFunction(fn)
    if not tuned:
        return jit
    # keyed on the GEMM shape, the tile shape and the stored chunk count (density); Triton keeps the winner per key in-process and, with
    # cache_results, on disk under a key that includes the GPU target, so a device re-tunes once.
    return triton.autotune(configs=gpu_configs(), key=["M", "K", "P", "CHUNKS", "BM", "BK"], cache_results=True)(jit)


def compile_only(
    kind: str, dtype: str, precision: str, bm: int, bk: int, bn: int,
    num_warps: int = 4, num_stages: int = 3, arch: int = 90, kmajor: bool = False,
):  # noqa: ANN201  # fmt: skip
    """Compile one kernel variant for an NVIDIA target without a GPU (Triton's bundled ptxas); returns the
    CompiledKernel (``.asm["ptx"]``, ``.metadata.shared``). Used to check the GPU path where none is lent.
    Call it in a process where ``TRITON_INTERPRET`` is unset: once triton is imported in interpreter mode its
    own library functions are interpreted and GPU code generation fails."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = JITFunction(_linear_kernel if kind == "linear" else _conv_kernel)
    idx_ptrs = ("cols_ptr", "crow_ptr", "rows_ptr")
    sig = {n: ("*i32" if n in idx_ptrs else f"*{dtype}") if n.endswith("_ptr") else "i32" for n in jit.arg_names}
    consts = dict(
        HAS_BIAS=True, BM=bm, BM_TILE=max(16, 1 << (bm - 1).bit_length()), BK=bk, BN=bn, PREC=precision, UPCAST=False
    )
    if kind == "linear":
        consts.update(KMAJOR=kmajor)
    else:
        consts.update(KH=3, KW=3)
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index(k),): v for k, v in consts.items()})
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
