"""Save, load and ship the compiled model: the safetensors artifact, load_compiled, ONNX, `prunekit export`."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import prunekit
import prunekit.plugins
from prunekit import CheckpointError, MissingComponentError, PrunekitError, load_compiled, read_manifest
from prunekit.cli import main
from prunekit.export import _from_json, _to_json, masked_dense
from prunekit.models import ResNetDigits, build_model
from prunekit.pipeline import Pipeline

REAL = """
[pipelines.onexn]
schedule = "constant"
score = "onexn-l1"
select = "onexn"
layout = "pack-1xn"
kernel = "cpu-1xn"
[pipelines.onexn.params]
model = "resnet-digits"
n = 4
sparsity = 0.75
epochs = 1
dense_epochs = 0

[pipelines.csr]
schedule = "constant"
score = "magnitude"
select = "threshold"
layout = "csr"
kernel = "csr"
[pipelines.csr.params]
sparsity = 0.8
fallback = "never"      # always the CSR path: the reloaded model takes the exported model's path exactly

[distributions.prunekit-cpu1xn]
path = "plugins/cpu-1xn"
provides = ["layout.pack-1xn", "kernel.cpu-1xn"]
[distributions.prunekit-magnitude]
path = "plugins/magnitude"
provides = ["score.magnitude", "select.threshold", "layout.csr", "kernel.csr"]
"""

FAKE = """
[pipelines.nokernel]
schedule = "once"
score = "abs"
select = "topk"
[pipelines.nokernel.params]
sparsity = 0.5

[pipelines.fake]
schedule = "once"
score = "abs"
select = "topk"
layout = "dense"
kernel = "dense"
[pipelines.fake.params]
sparsity = 0.5

[distributions.prunekit-test]
path = "plugins/test"
provides = ["layout.dense", "kernel.dense"]
"""

X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def compiled_resnet(registry: Path, name: str, path: Path) -> dict:
    """Prune a random-weight resnet-digits one shot, compile, export; returns what the test compares."""
    pipe = Pipeline.load(name, registry)
    torch.manual_seed(0)
    model = build_model("resnet-digits").eval()
    pipe.attach(model)
    pipe.prune(pipe.host.sparsity)
    pipe.finalize()
    with torch.inference_mode():
        dense_out = model(X)
    pipe.compile(example=X)
    with torch.inference_mode():
        out = model(X)
    ex = pipe.export(path, model_name="resnet-digits", num_classes=10, input_shape=(1, 16, 16))
    return {"pipe": pipe, "model": model, "out": out, "dense_out": dense_out, "exported": ex, "path": path}


@pytest.fixture(scope="module")
def real_registry(tmp_path_factory):
    p = tmp_path_factory.mktemp("reg") / "registry.toml"
    p.write_text(textwrap.dedent(REAL))
    return p


@pytest.fixture(scope="module")
def onexn(real_registry, tmp_path_factory):
    pytest.importorskip("prunekit_cpu1xn")
    pytest.importorskip("prunekit_onexn")
    pytest.importorskip("prunekit_schedules")
    return compiled_resnet(real_registry, "onexn", tmp_path_factory.mktemp("onexn") / "model.safetensors")


@pytest.fixture(scope="module")
def csr(real_registry, tmp_path_factory):
    pytest.importorskip("prunekit_magnitude")
    pytest.importorskip("prunekit_schedules")
    return compiled_resnet(real_registry, "csr", tmp_path_factory.mktemp("csr") / "model.safetensors")


@pytest.fixture
def fakes(fake_components, monkeypatch):
    monkeypatch.setattr(prunekit.plugins, "installed_components", lambda: fake_components)
    return fake_components


@pytest.fixture
def fake_export(fakes, write_registry, small_net, tmp_path):
    pipe = Pipeline.load("fake", write_registry(FAKE))
    pipe.attach(small_net.eval())
    pipe.prune(0.5)
    x = torch.randn(2, 3, 8, 8)
    pipe.compile(example=x)
    with torch.inference_mode():
        out = small_net(x)
    path = tmp_path / "fake.safetensors"
    pipe.export(path)
    return {"pipe": pipe, "x": x, "out": out, "path": path, "net": type(small_net)}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_untouched(model, before):
    state, types = before
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m) for m in model.modules()] == types


# ---------------------------------------------------------------- round trips

SUBPROCESS = """
import json, sys, torch
import prunekit, prunekit.plugins as plugins
from prunekit.models import build_model

jobs = json.loads(sys.argv[1])
everything = plugins.installed_components()
results = []
for job in jobs:
    only = {k: v for k, v in everything.items() if list(k) in job["components"]}
    plugins.installed_components = lambda only=only: only   # a process with just the layout and the kernel
    model = prunekit.load_compiled(build_model("resnet-digits"), job["artifact"])
    with torch.inference_mode():
        out = model(torch.load(job["x"], weights_only=True))
    ref = torch.load(job["out"], weights_only=True)
    results.append({"err": float((out - ref).abs().max() / ref.abs().max()),
                    "types": sorted({type(m).__name__ for m in model.modules()})})
print(json.dumps({"results": results, "modules": sorted(m for m in sys.modules if m.startswith("prunekit_"))}))
"""


def test_fresh_process_with_only_layout_and_kernel_gives_the_same_output(onexn, csr, tmp_path):
    jobs = []
    for case, comps in ((onexn, [["layout", "pack-1xn"], ["kernel", "cpu-1xn"]]), (csr, [["layout", "csr"], ["kernel", "csr"]])):
        torch.save(X, tmp_path / "x.pt")
        torch.save(case["out"], tmp_path / f"{case['pipe'].name}.pt")
        jobs.append({"artifact": str(case["path"]), "x": str(tmp_path / "x.pt"), "out": str(tmp_path / f"{case['pipe'].name}.pt"),
                     "components": comps})  # fmt: skip
    res = subprocess.run([sys.executable, "-c", SUBPROCESS, json.dumps(jobs)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    (pk, cs) = got["results"]
    assert pk["err"] <= 1e-6 and cs["err"] <= 1e-6
    assert "Packed1xN" in pk["types"] and "CsrConv2d" in cs["types"]  # the kernels' own modules, rebuilt
    # no score, select or schedule plugin was imported to rebuild the model
    assert not {"prunekit_onexn", "prunekit_schedules", "prunekit_subp"} & set(got["modules"])


def test_exported_output_is_bit_equal_in_process(onexn):
    model = load_compiled(build_model("resnet-digits"), onexn["path"])
    with torch.inference_mode():
        assert torch.equal(model(X), onexn["out"])
    assert not model.training
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    want = {n: type(m).__name__ for n, m in onexn["model"].named_modules()}
    assert kinds == want  # dense fallbacks, BN, stem and head in the same places


def test_manifest_names_components_layers_and_factory(onexn):
    m = read_manifest(onexn["path"])
    assert m["format"] == "prunekit-compiled/1" and m["pipeline"]["name"] == "onexn"
    assert m["model"] == {"factory": "resnet-digits", "num_classes": 10, "input_shape": [1, 16, 16],
                          "class": "prunekit.models.ResNetDigits"}  # fmt: skip
    k = m["components"]["kernel"]
    assert (k["name"], k["distribution"]) == ("cpu-1xn", "prunekit-cpu1xn") and k["params"]["n"] == 4
    assert k["install"].startswith("pip install -e plugins/cpu-1xn")
    pipe = onexn["pipe"]
    assert [e["name"] for e in m["layers"]] == list(pipe.kernels())
    for e in m["layers"]:
        st = pipe.layers[e["name"]]
        assert e["format"] == st.layout.format and tuple(e["dense_shape"]) == st.layout.dense_shape
        assert tuple(e["info"]["input_shape"]) == st.info.input_shape  # kernels may choose by input size
        assert set(e["tensors"]) == set(st.layout.tensors)
    assert m["dense"] == {"conv1": "first conv (keep_first_dense)", "fc": "classifier (keep_last_dense)"}
    assert "bn1.running_mean" in m["state"] and "conv1.weight" in m["state"]


def test_artifact_is_plain_safetensors_without_pickle(onexn):
    raw = onexn["path"].read_bytes()
    assert not zipfile.is_zipfile(onexn["path"])  # torch.save's container
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert set(meta) == {"format", "manifest", "manifest_sha256"} and all(isinstance(v, str) for v in meta.values())
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n  # the tensors tile the data: nothing else inside
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert {v["dtype"] for v in header.values()} <= {"F32", "I32", "I64", "BOOL"}


def test_in_test_components_round_trip_with_dense_layers(fake_export):
    fresh = fake_export["net"]()
    model = load_compiled(fresh, fake_export["path"])
    with torch.inference_mode():
        assert torch.equal(model(fake_export["x"]), fake_export["out"])
    assert type(model.conv1).__name__ == "Functional" and type(model.dw) is torch.nn.Conv2d  # grouped: left dense
    m = read_manifest(fake_export["path"])
    assert m["dense"]["dw"].startswith("grouped conv") and "dw.weight" in m["state"]
    assert m["model"]["factory"] is None and m["components"]["kernel"]["install"] == "pip install -e plugins/test (in the prunekit checkout)"


def test_pipeline_without_kernel_exports_masked_dense_weights(fakes, write_registry, small_net, tmp_path, monkeypatch):
    pipe = Pipeline.load("nokernel", write_registry(FAKE))
    pipe.attach(small_net.eval())
    pipe.prune(0.5)
    pipe.compile()  # no kernel stage: bakes W * mask
    x = torch.randn(2, 3, 8, 8)
    ex = pipe.export(tmp_path / "m.safetensors")
    assert ex.kernels == {} and not read_manifest(ex.path)["layers"]
    monkeypatch.setattr(prunekit.plugins, "installed_components", lambda: {})  # nothing needed to load it
    model = load_compiled(type(small_net)(), ex.path)
    with torch.inference_mode():
        assert torch.equal(model(x), small_net(x))


def test_json_meta_round_trip_keeps_tuples():
    meta = {"shape": (4, 1), "nested": {"t": (1, (2, 3)), "l": [1, 2]}, "none": None, "f": 0.5}
    assert _from_json(json.loads(json.dumps(_to_json(meta, "meta")))) == meta
    with pytest.raises(PrunekitError, match="not JSON"):
        _to_json({"t": torch.zeros(1)}, "layer x: Layout.meta")


# ---------------------------------------------------------------- errors, model untouched


def test_missing_kernel_component_names_the_install(onexn, fake_export, monkeypatch):
    monkeypatch.setattr(prunekit.plugins, "installed_components", lambda: {})
    model = build_model("resnet-digits")
    before = snapshot(model)
    with pytest.raises(MissingComponentError, match=r"component '(pack-1xn|cpu-1xn)' is not installed.*pip install -e plugins/cpu-1xn"):
        load_compiled(model, onexn["path"])
    assert_untouched(model, before)
    with pytest.raises(MissingComponentError, match="pip install -e plugins/test"):
        load_compiled(fake_export["net"](), fake_export["path"])


def flip(path: Path, needle: bytes, out: Path) -> Path:
    raw = bytearray(path.read_bytes())
    at = raw.index(needle) + len(needle)
    while not chr(raw[at]).isdigit():
        at += 1
    raw[at] ^= 1  # one digit becomes another: the JSON still parses, only the digest can tell
    out.write_bytes(bytes(raw))
    return out


@pytest.mark.parametrize("damage", ["truncated", "manifest-bit", "data-bit", "no-manifest", "other-format", "not-a-file"])
def test_damaged_file_is_one_checkpoint_error_and_model_untouched(onexn, tmp_path, damage):
    src = onexn["path"]
    bad = tmp_path / f"{damage}.safetensors"
    if damage == "truncated":
        bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif damage == "manifest-bit":
        flip(src, b"density", bad)
    elif damage == "data-bit":
        raw = bytearray(src.read_bytes())
        raw[-3] ^= 0x10
        bad.write_bytes(bytes(raw))
    elif damage in ("no-manifest", "other-format"):
        from safetensors.torch import save_file

        meta = {"format": "prunekit-compiled/9", "manifest": "{}", "manifest_sha256": ""} if damage == "other-format" else None
        save_file({"w": torch.zeros(2)}, str(bad), metadata=meta)
    else:
        bad.write_bytes(b"\x80\x04not a safetensors file")
    model = build_model("resnet-digits")
    before = snapshot(model)
    with pytest.raises(CheckpointError) as err:
        load_compiled(model, bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert "export it again" in str(err.value) or "pipe.export" in str(err.value)
    assert_untouched(model, before)


@pytest.mark.parametrize("other", ["narrower", "compiled-already", "more-classes"])
def test_artifact_for_another_model_is_refused_untouched(onexn, other):
    model = {"narrower": lambda: ResNetDigits(width=16), "more-classes": lambda: build_model("resnet-digits", 12),
             "compiled-already": lambda: onexn["model"]}[other]()  # fmt: skip
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"does not fit this ResNetDigits: .*build the model it was exported from \(resnet-digits, num_classes=10\)"):
        load_compiled(model, onexn["path"])
    assert_untouched(model, before)


def test_export_before_compile_says_so(fakes, write_registry, small_net, tmp_path):
    pipe = Pipeline.load("fake", write_registry(FAKE))
    pipe.attach(small_net)
    pipe.prune(0.5)
    with pytest.raises(PrunekitError, match=r"call pipe.compile\(example=x\) before export"):
        pipe.export(tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------- ONNX


def test_onnx_export_of_the_masked_dense_model_matches_eager(onexn, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pipe = onexn["pipe"]
    ex = pipe.export(tmp_path / "m.safetensors", onnx=tmp_path / "m.onnx", example=X)
    assert ex.onnx.max_rel_err <= 1e-4 and ex.onnx.batch == 3 and ex.onnx.opset >= 17
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": X.numpy()})
    ref = onexn["dense_out"]
    assert float((torch.from_numpy(out) - ref).abs().max() / ref.abs().max()) <= 1e-4
    # the kernel modules are back in place after the dense export
    assert all(onexn["model"].get_submodule(n) is st.compiled.module for n, st in pipe.layers.items() if st.compiled)


def test_onnx_mismatch_is_one_error_and_writes_nothing(onexn, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(prunekit.export, "max_rel_err", lambda out, ref: 0.5)  # as if an operator were wrong
    with masked_dense(onexn["pipe"]) as dense, pytest.raises(PrunekitError, match=r"differs from PyTorch's by 5.00e-01.*nothing written"):
        prunekit.export.export_onnx(dense, tmp_path / "m.onnx", X)
    assert not list(tmp_path.iterdir())  # neither the file nor its temp file


def test_onnx_without_onnxruntime_names_the_install(onexn, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with masked_dense(onexn["pipe"]) as dense, pytest.raises(PrunekitError, match="pip install onnxruntime"):
        prunekit.export.export_onnx(dense, tmp_path / "m.onnx", X)
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def run_dir(real_registry, tmp_path_factory):
    pytest.importorskip("prunekit_cpu1xn")
    pytest.importorskip("prunekit_onexn")
    tmp = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("PRUNEKIT_CACHE", str(tmp / "cache"))
    try:
        code = main(["run", "onexn", "--registry", str(real_registry), "--out", str(tmp / "out"), "--no-progress", "--threads", "1"])
    finally:
        mp.undo()
    assert code == 0
    return tmp / "out"


def test_cli_export_writes_a_loadable_artifact_and_onnx(run_dir, real_registry, tmp_path, capsys):
    capsys.readouterr()
    art, onnx = tmp_path / "m.safetensors", tmp_path / "m.onnx"
    args = ["export", str(run_dir), "--out", str(art), "--onnx", str(onnx), "--registry", str(real_registry)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "reloaded into a fresh resnet-digits" in printed and "onnxruntime vs PyTorch" in printed
    assert art.is_file() and onnx.is_file()
    m = read_manifest(art)
    assert m["model"]["factory"] == "resnet-digits" and m["pipeline"]["name"] == "onexn"
    # the artifact carries the run's trained weights, not the fresh model's
    pruned = torch.load(run_dir / "pruned.pt", weights_only=True)
    model = load_compiled(build_model("resnet-digits"), art)
    assert torch.equal(model.state_dict()["bn1.running_var"], pruned["bn1.running_var"])


@pytest.mark.parametrize("case", ["missing-dir", "corrupt-state", "bad-report"])
def test_cli_export_bad_input_exits_2_with_one_line(run_dir, real_registry, tmp_path, capsys, case):
    target = tmp_path / "run"
    if case != "missing-dir":
        target.mkdir()
        for f in ("report.json", "state.pt", "pruned.pt"):
            (target / f).write_bytes((run_dir / f).read_bytes())
        if case == "corrupt-state":
            (target / "state.pt").write_bytes(b"garbage")
        else:
            (target / "report.json").write_text("{not json")
    capsys.readouterr()
    assert main(["export", str(target), "--registry", str(real_registry)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("prunekit: error: ") and str(target) in err[0]
