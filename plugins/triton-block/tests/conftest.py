"""Run the Triton kernels on Triton's CPU interpreter when no GPU is present (CI has none).

TRITON_INTERPRET must be in the environment before triton is imported; the kernels here build their
interpreted functions explicitly, but other code (and Triton's own knobs) read the variable at import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # On a GPU, references must be IEEE fp32: cuDNN convs default to TF32 (fp32_precision API only; mixing it
    # with the legacy allow_tf32 flags is an error in this torch).
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
