"""The GPU path, compiled (not run) for sm_90 (H100/H200) with the ptxas bundled in the triton wheel.

No GPU is needed: this proves the kernels lower to a cubin for every dtype and precision, that TF32/fp16/bf16
use Hopper's tensor-core wgmma (positions are the dot's M dimension, so even 16/32-row blocks qualify) while
IEEE fp32 does not, and that the largest autotune tile fits in shared memory.
It runs in a child process without TRITON_INTERPRET (triton imported in interpreter mode cannot generate GPU code).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="triton wheel without the NVIDIA backend")

H100_SMEM = 227 * 1024  # bytes of shared memory one block may use on sm_90

CHILD = r"""
import json
from prunekit_triton.kernels import compile_only, gpu_configs
out = {}
for kind in ("linear", "conv2d"):
    for dtype, prec in (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "ieee"), ("fp16", "ieee")):
        for kmajor in ((False, True) if kind == "linear" else (False,)):
            ck = compile_only(kind, dtype, prec, bm=32, bk=32, bn=64, kmajor=kmajor)
            out[f"{kind}{'-kmajor' if kmajor else ''}/{dtype}/{prec}"] = {"cubin": "cubin" in ck.asm, "wgmma": "wgmma" in ck.asm["ptx"]}
big = max(gpu_configs(), key=lambda c: (c.kwargs["BN"], c.num_stages))
ck = compile_only("linear", "fp32", "tf32", bm=64, bk=64, bn=big.kwargs["BN"], num_warps=big.num_warps,
                  num_stages=big.num_stages)
out["big_shared"] = ck.metadata.shared
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.parametrize("kind", ["linear", "linear-kmajor", "conv2d"])
@pytest.mark.parametrize(
    ("variant", "tensor_cores"), [("fp32/ieee", False), ("fp32/tf32", True), ("bf16/ieee", True), ("fp16/ieee", True)]
)
def test_kernel_compiles_for_sm90(compiled, kind, variant, tensor_cores):
    got = compiled[f"{kind}/{variant}"]
    assert got["cubin"]
    assert got["wgmma"] == tensor_cores


def test_largest_autotune_tile_fits_shared_memory(compiled):
    assert 0 < compiled["big_shared"] <= H100_SMEM
