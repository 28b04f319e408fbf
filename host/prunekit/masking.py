"""Masks as parametrizations (``torch.nn.utils.parametrize``), hard or soft.

Hard: the effective weight is ``W * mask``, so pruned positions are exactly 0 under any optimizer and
receive no gradient. Soft (SUBP): the same forward, but the backward passes the gradient straight through
to every position and adds ``decay * (1 - mask) * W`` on the pruned ones (SR-STE), so pruned weights keep
evolving and may regrow.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        weight, mask = ctx.saved_tensors
        if ctx.decay:
            grad = grad + ctx.decay * (1.0 - mask) * weight
        return grad, None, None


class WeightMask(nn.Module):
    """The parametrization: holds the keep-mask as a float buffer of the weight's shape."""

    def __init__(self, mask: torch.Tensor, soft: bool = False, decay: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))
        self.soft = soft
        self.decay = float(decay)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(weight.dtype)
        if self.soft and torch.is_grad_enabled():
            return _StraightThrough.apply(weight, mask, self.decay)
        return weight * mask

    def set(self, mask: torch.Tensor, soft: bool, decay: float) -> None:
        self.mask.copy_(mask.to(self.mask.dtype))
        self.soft = soft
        self.decay = float(decay)


def attach_mask(module: nn.Module, mask: torch.Tensor | None = None) -> WeightMask:
    """Put an all-keep (or the given) mask on ``module.weight``; returns the parametrization."""
    if parametrize.is_parametrized(module, "weight"):
        return mask_of(module)
    weight = module.weight
    m = torch.ones_like(weight, dtype=torch.float32) if mask is None else mask
    param = WeightMask(m.to(weight.device))
    parametrize.register_parametrization(module, "weight", param, unsafe=True)
    return param


def mask_of(module: nn.Module) -> WeightMask:
    for p in module.parametrizations["weight"]:
        if isinstance(p, WeightMask):
            return p
    raise KeyError("module has no prunekit mask")


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The trainable weight under the mask (pruned positions not zeroed)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def bake(module: nn.Module) -> None:
    """Remove the parametrization, leaving ``weight = W * mask`` as a plain parameter."""
    if parametrize.is_parametrized(module, "weight"):
        with torch.no_grad():
            baked = module.weight.detach().clone()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        with torch.no_grad():
            module.weight.copy_(baked)
