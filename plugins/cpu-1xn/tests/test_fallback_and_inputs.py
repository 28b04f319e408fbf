"""Per-layer dense fallback, forced paths, and inputs the kernel cannot take: never a wrong answer."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from prunekit_cpu1xn import ext, kernel
from prunekit_cpu1xn.kernel import Cpu1xN, build
from prunekit_cpu1xn.layout import pack_1xn
from prunekit_cpu1xn.modules import Packed1xN
from prunekit_cpu1xn.synthetic import random_selection
from prunekit_cpu1xn.testing import rel_err

from prunekit.errors import LayoutError, PrunekitError
from prunekit.records import LayerInfo

LAYER = LayerInfo(name="c", kind="conv2d", weight_shape=(64, 32, 3, 3), has_bias=True, padding=(1, 1))


def _packed(sparsity: float, n: int = 16, **params):
    g = torch.Generator().manual_seed(0)
    sel = random_selection(LAYER, n, sparsity, generator=g)
    w = torch.randn(LAYER.weight_shape, generator=g)
    b = torch.randn(64, generator=g)
    return build(LAYER, pack_1xn(LAYER, w, sel), b, Cpu1xN.Params(**params)), w * sel.mask, b


@pytest.mark.parametrize(
    ("sparsity", "n", "mode", "dense"),
    [(0.1, 16, "auto", True), (0.3, 4, "auto", True), (0.9, 16, "auto", False), (0.75, 4, "auto", False),
     (0.1, 16, "never", False), (0.9, 16, "always", True)],
)  # fmt: skip
@pytest.mark.usefixtures("needs_kernel")
def test_fallback_decision_and_same_answer(sparsity: float, n: int, mode: str, dense: bool) -> None:
    compiled, wm, b = _packed(sparsity, n, fallback=mode)
    assert (compiled.kernel == "dense-fallback") == dense
    if dense:
        assert compiled.reason  # says why
        assert isinstance(compiled.module, torch.nn.Conv2d)
    else:
        assert compiled.kernel.startswith("cpu-1xn/") and isinstance(compiled.module, Packed1xN)
    x = torch.randn(2, 32, 11, 13)
    assert rel_err(compiled.module(x), F.conv2d(x, wm, b, 1, 1)) <= 1e-5


@pytest.mark.usefixtures("needs_kernel")
def test_fallback_rule_is_monotone_in_sparsity() -> None:
    """Once the packed path is chosen at some sparsity it stays chosen at every higher one."""
    for n in (2, 4, 8, 16, 32):
        packed = [_packed(s, n)[0].kernel != "dense-fallback" for s in (0.2, 0.4, 0.6, 0.8, 0.95)]
        assert packed == sorted(packed), (n, packed)
        assert packed[-1] or n == 2


def test_bad_params_are_rejected() -> None:
    with pytest.raises(PrunekitError, match="fallback"):
        Cpu1xN.Params(fallback="sometimes")
    with pytest.raises(PrunekitError, match="isa"):
        Cpu1xN.Params(isa="neon")


@pytest.mark.usefixtures("needs_kernel")
def test_inputs_the_kernel_cannot_take_run_dense_with_a_warning() -> None:
    compiled, wm, b = _packed(0.75, fallback="never")
    m = compiled.module
    x = torch.randn(2, 32, 9, 9)
    with pytest.warns(UserWarning, match="float64"):
        y = m(x.double())
    assert y.dtype == torch.float64 and rel_err(y, F.conv2d(x.double(), wm.double(), b.double(), 1, 1)) <= 1e-5
    xg = x.clone().requires_grad_(True)
    with pytest.warns(UserWarning, match="autograd"):
        y = m(xg)
    y.sum().backward()  # the dense path is differentiable
    assert xg.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel's own paths never warn
        nc = torch.randn(2, 9, 9, 32).permute(0, 3, 1, 2)  # channels-last view: not contiguous
        assert rel_err(m(nc), F.conv2d(nc, wm, b, 1, 1)) <= 1e-5
        assert rel_err(m(x[0]), F.conv2d(x[0], wm, b, 1, 1)) <= 1e-5  # unbatched
        assert m(x[:0]).shape == (0, 64, 9, 9)
    with pytest.raises(LayoutError, match="expected input"):
        m(torch.randn(1, 31, 9, 9))
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        Packed1xN.forward(m, torch.randn(1, 32, 1, 0))


def test_missing_compiler_gives_a_dense_layer_and_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable():
        raise ext.ExtensionUnavailable("no C++ compiler found (install g++ or set CXX)")

    monkeypatch.setattr(kernel.ext, "load", unavailable)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        compiled, wm, b = _packed(0.9, fallback="never")
    assert compiled.kernel == "dense-fallback" and "compiler" in compiled.reason
    x = torch.randn(1, 32, 6, 6)
    assert rel_err(compiled.module(x), F.conv2d(x, wm, b, 1, 1)) <= 1e-5


@pytest.mark.usefixtures("needs_kernel")
def test_compiler_check_reports_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ext, "_compiler", lambda: None)
    ext.load.cache_clear()
    try:
        with pytest.raises(ext.ExtensionUnavailable, match="compiler"):
            ext.load()
    finally:
        monkeypatch.undo()
        ext.load.cache_clear()
    assert int(ext.load().isa()) in (2, 512)


@pytest.mark.usefixtures("needs_kernel")
def test_copies_and_state_dicts_keep_computing_the_same_layer() -> None:
    import copy
    import io

    compiled, wm, b = _packed(0.75, fallback="never")
    x = torch.randn(2, 32, 7, 9)
    ref = F.conv2d(x, wm, b, 1, 1)
    clone = copy.deepcopy(compiled.module)
    buf = io.BytesIO()
    torch.save(compiled.module, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (compiled.module, clone, loaded):
        assert rel_err(m(x), ref) <= 1e-5
    # buffers replaced through _apply (e.g. .float() / .to()) are picked up by the prebuilt arguments
    moved = copy.deepcopy(compiled.module).apply(lambda m: None).to(torch.device("cpu"))
    moved.values.mul_(0)
    assert float(moved(x).abs().sub(b.abs()[None, :, None, None]).abs().max()) < 1e-5  # bias only now
    assert rel_err(compiled.module(x), ref) <= 1e-5  # the original is untouched
