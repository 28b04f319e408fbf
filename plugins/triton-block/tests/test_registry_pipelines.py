"""The registry pipelines this plugin serves, with the real select plugins when they are installed."""

import copy
from pathlib import Path

import pytest
import torch

from prunekit.models import build_model
from prunekit.pipeline import Pipeline
from prunekit.plugins import installed_components

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REGISTRY = Path(__file__).resolve().parents[3] / "registry.toml"
NEEDS = {
    "subp-1x32-triton": ("select", "subp-uniform"),
    "blocks-32x32-triton": ("select", "blocks"),
    "tetris-32x32-triton": ("select", "tetris"),  # permuted blocks: both perms folded into the index arrays
}


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_registry_pipeline_compiles_to_the_masked_dense_function(name):
    if NEEDS[name] not in installed_components():
        pytest.skip(f"{NEEDS[name][0]} component '{NEEDS[name][1]}' is not installed (another plugin provides it)")
    pipe = Pipeline.load(name, REGISTRY)
    torch.manual_seed(0)
    model = build_model(pipe.host.model, 10, (1, 8, 8)).eval()
    pipe.attach(model)
    for step in range(pipe.epochs):
        pipe.step(step)
    pipe.finalize()
    dense = copy.deepcopy(model).to(DEVICE)
    x = torch.randn(3, 1, 8, 8, device=DEVICE)
    states = pipe.compile()
    model.to(DEVICE)
    compiled = [s for s in states if s.compiled is not None]
    assert compiled and all(s.compiled.kernel.startswith("triton-block/") for s in compiled)
    with torch.no_grad():
        y, ref = model(x), dense(x)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5
