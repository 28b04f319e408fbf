"""`prunekit run` end to end on the digits data with in-test components (fast settings)."""

import json

import pytest

from prunekit.cli import main


@pytest.fixture
def quick_registry(write_registry):
    return write_registry(
        """
        default = "quick"
        [pipelines.quick]
        schedule = "once"
        score = "abs"
        select = "topk"
        layout = "dense"
        kernel = "dense"
        [pipelines.quick.params]
        model = "resnet-digits"
        sparsity = 0.5
        epochs = 1
        dense_epochs = 1
        """
    )


def test_run_writes_report_and_table(fake_components, quick_registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["run", "--registry", str(quick_registry), "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "layer1.conv1" in printed and "sparsity" in printed
    report = json.loads((out / "report.json").read_text())
    for key in ("pipeline", "model", "dense_accuracy", "pruned_accuracy", "sparsity", "layers",
                "dense_latency_ms", "sparse_latency_ms", "speedup"):
        assert key in report
    assert report["pipeline"] == "quick" and report["model"] == "resnet-digits"
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["dense_accuracy"] > 50  # one epoch on digits already learns
    assert report["compiled_accuracy"] == pytest.approx(report["pruned_accuracy"], abs=0.3)
    assert report["max_rel_err"] < 1e-5
    layer = report["layers"][0]
    assert {"name", "shape", "sparsity", "dense_bytes", "packed_bytes"} <= set(layer)
    assert (out / "state.pt").is_file() and (out / "pruned.pt").is_file()
    assert (out / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "layers.png").is_file() and report["num_classes"] == 10
    # the dense model was cached: a second run loads it instead of training
    assert list((tmp_path / "cache" / "dense").glob("resnet-digits-digits-*.pt"))


def test_bad_dense_weights_file(fake_components, quick_registry, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "dense.pt"
    bad.write_bytes(b"garbage")
    code = main(["run", "--registry", str(quick_registry), "--out", str(tmp_path / "o"), "--dense", str(bad), "--no-progress"])
    assert code == 2
    assert "cannot load as weights" in capsys.readouterr().err
