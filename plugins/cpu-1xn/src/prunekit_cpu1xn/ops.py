"""The kernel's operators as ``torch.library`` custom ops: ``torch.ops.prunekit_cpu1xn.conv2d`` and
``torch.ops.prunekit_cpu1xn.epilogue``, with fake (meta) implementations, so ``torch.compile`` (also with
freezing) compiles the graph around them and ``torch.export`` traces through them.

The C++ library defines the schemas (``TORCH_LIBRARY(prunekit_cpu1xn, ...)`` in csrc/pk_binding.cpp); the
fake implementations here only compute output shapes. Both operators are functional: they read their
inputs and return a new tensor.
"""

from __future__ import annotations

import torch

from prunekit_cpu1xn import ext


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _pool_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1 if k > 0 else size


_registered = False


def load() -> object:
    """``torch.ops.prunekit_cpu1xn`` (``ext.load``: built once, cached) with the fake implementations
    registered (once per process). Raises ``ext.ExtensionUnavailable`` as ``ext.load`` does."""
    global _registered
    ops = ext.load()
    if _registered:
        return ops
    lib = f"{ext.OP_NAMESPACE}::"

    @torch.library.register_fake(lib + "conv2d")
    def _conv2d_fake(x, vals, idx, rowptr, out_row, bias, M, kh, kw, sh, sw, ph, pw, dh, dw, runs, isa, poison,  # noqa: ANN001, ANN202
                     shift, residual, act, pool_k, pool_s, pool_p):  # fmt: skip
        h = _pool_out(_conv_out(x.shape[2], kh, sh, ph, dh), pool_k, pool_s, pool_p)
        w = _pool_out(_conv_out(x.shape[3], kw, sw, pw, dw), pool_k, pool_s, pool_p)
        return x.new_empty((x.shape[0], M, h, w))

    @torch.library.register_fake(lib + "epilogue")
    def _epilogue_fake(y, shift, residual, act, pool_k, pool_s, pool_p):  # noqa: ANN001, ANN202
        h, w = _pool_out(y.shape[2], pool_k, pool_s, pool_p), _pool_out(y.shape[3], pool_k, pool_s, pool_p)
        return y.new_empty((y.shape[0], y.shape[1], h, w))

    _registered = True
    return ops


def conv2d() -> object:
    return load().conv2d.default


def epilogue() -> object:
    return load().epilogue.default
