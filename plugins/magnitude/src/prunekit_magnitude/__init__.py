"""Han et al. magnitude pruning for prunekit: |w| scores, thresholds, CSR layout and CSR kernels."""

from prunekit_magnitude.csr import CsrLayout, break_even_sparsity, densify, to_csr
from prunekit_magnitude.kernel import CsrConv2d, CsrKernel, CsrLinear, DenseMasked
from prunekit_magnitude.scores import Magnitude
from prunekit_magnitude.threshold import Threshold

__all__ = [
    "CsrConv2d",
    "CsrKernel",
    "CsrLayout",
    "CsrLinear",
    "DenseMasked",
    "Magnitude",
    "Threshold",
    "break_even_sparsity",
    "densify",
    "to_csr",
]
