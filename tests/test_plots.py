"""PNG plots next to report.json: written, valid, atomic, and never fatal (matplotlib missing, bad data)."""

from __future__ import annotations

import sys

import pytest

from prunekit.report import PlotWarning, _is_dense, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_report() -> dict:
    """The keys `prunekit run` writes (report.json), with per-layer timings as bench rows carry them."""
    history = [{"epoch": e, "sparsity": min(0.75, 0.25 * e), "updated": e < 4, "loss": 1.0 / (e + 1),
                "accuracy": 95.0 + e, "note": ""} for e in range(5)]  # fmt: skip
    layers = [
        {"name": "conv1", "shape": [32, 1, 3, 3], "pattern": "dense", "sparsity": 0.0, "kernel": "dense",
         "reason": "keep_first_dense"},
        {"name": "layer1.conv1", "shape": [32, 32, 3, 3], "pattern": "1x16", "sparsity": 0.75, "kernel": "cpu-1xn",
         "reason": "", "dense_ms": 0.30, "sparse_ms": 0.10},
        {"name": "layer2.conv1", "shape": [64, 32, 3, 3], "pattern": "1x16", "sparsity": 0.75, "kernel": "dense-fallback",
         "reason": "batch too small for the kernel", "dense_ms": 0.30, "sparse_ms": 0.31},
        {"name": "layer3.conv1", "shape": [64, 64, 3, 3], "pattern": "unstructured", "sparsity": 0.9, "kernel": "csr",
         "reason": "sparsity 0.9, CSR break-even 0.5", "dense_ms": 0.30, "sparse_ms": 0.2},
        {"name": "fc", "shape": [10, 128], "pattern": "dense", "sparsity": 0.0, "kernel": "dense", "reason": "keep_last_dense"},
    ]  # fmt: skip
    return {"pipeline": "quick", "model": "resnet-digits", "data": "digits", "threads": 1, "latency_batch": 1,
            "dense_accuracy": 98.0, "pruned_accuracy": 99.0, "compiled_accuracy": 99.0, "sparsity": 0.7,
            "dense_latency_ms": 1.0, "sparse_latency_ms": 0.5, "history": history, "layers": layers}  # fmt: skip


def bench_report() -> dict:
    """The shape of `prunekit bench --json`: no history, per-layer dense_ms/sparse_ms, model_*_ms."""
    rep = run_report()
    return {"pipeline": "quick", "model": "resnet18", "batch": 1, "threads": 2, "sparsity": 0.75,
            "achieved_sparsity": 0.7, "model_dense_ms": 9.0, "model_sparse_ms": 4.0, "speedup": 2.25,
            "layers": [{k: v for k, v in r.items() if k != "pattern"} for r in rep["layers"]]}  # fmt: skip


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_run_report_plots(tmp_path):
    paths = write_plots(run_report(), tmp_path)
    assert [p.name for p in paths] == ["history.png", "layers.png", "speed.png"]
    for p in paths:
        assert p.parent == tmp_path
        assert_png(p)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.png", "layers.png", "speed.png"]  # no temp files


def test_bench_report_plots(tmp_path):
    paths = write_plots(bench_report(), tmp_path / "new-dir")
    assert [p.name for p in paths] == ["layers.png", "speed.png"]  # no history in a bench
    for p in paths:
        assert_png(p)


def test_no_timings_no_speed_plot(tmp_path):
    rep = run_report()
    for key in ("dense_latency_ms", "sparse_latency_ms"):
        del rep[key]
    for row in rep["layers"]:
        row.pop("dense_ms", None)
        row.pop("sparse_ms", None)
    assert [p.name for p in write_plots(rep, tmp_path)] == ["history.png", "layers.png"]
    assert write_plots({"pipeline": "x"}, tmp_path / "empty") == []


def test_missing_matplotlib_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.warns(PlotWarning, match="pip install matplotlib"):
        assert write_plots(run_report(), tmp_path) == []
    assert not list(tmp_path.iterdir())
    said = []
    assert write_plots(run_report(), tmp_path, warn=said.append) == []
    assert len(said) == 1 and "matplotlib is not installed" in said[0]


def test_one_bad_plot_does_not_stop_the_others(tmp_path):
    rep = run_report()
    del rep["history"][2]["accuracy"]
    with pytest.warns(PlotWarning, match=r"plot history.png skipped: KeyError"):
        paths = write_plots(rep, tmp_path)
    assert [p.name for p in paths] == ["layers.png", "speed.png"]
    assert not (tmp_path / "history.png").exists()


def test_which_layers_count_as_dense():
    rows = {r["name"]: _is_dense(r) for r in run_report()["layers"]}
    assert rows == {"conv1": True, "layer1.conv1": False, "layer2.conv1": True, "layer3.conv1": False, "fc": True}
    assert _is_dense({"kernel": "masked-dense"}) is False  # pruned, run masked (a pipeline without a kernel)
