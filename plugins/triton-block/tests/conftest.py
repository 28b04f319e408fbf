"""Run the Triton kernels on Triton's CPU interpreter when no GPU is present (CI has none).

TRITON_INTERPRET must be in the environment before triton is imported; the kernels here build their
interpreted functions explicitly, but other code (and Triton's own knobs) read the variable at import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
