"""Models by name (built-ins, every torchvision classification model, import paths) and CIFAR-10 binary data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from prunekit.data import CIFAR_MEAN, CIFAR_STD, load_data
from prunekit.errors import PrunekitError
from prunekit.models import build_model, list_model_names, model_spec
from prunekit.runjob import load_weights

TV_NAMES = torchvision.models.list_models(module=torchvision.models)

# --- torchvision and built-in names --------------------------------------------------------------------------


def test_every_torchvision_classification_model_is_accepted():
    assert len(TV_NAMES) > 50
    for name in TV_NAMES:
        spec = model_spec(name)
        c, h, w = spec.input_shape
        assert c == 3 and h == w >= 224, name
        assert spec.min_size[0] <= h and spec.min_size[1] <= w, name
        valid = spec.valid_input((3, 32, 32))
        assert valid[1] >= spec.min_size[0] and valid[2] >= spec.min_size[1], name
    assert list_model_names() == ["lenet", "resnet-digits", *TV_NAMES]


def test_documented_sizes():
    assert model_spec("inception_v3").input_shape == (3, 299, 299)
    assert model_spec("inception_v3").valid_input((3, 32, 32)) == (3, 75, 75)
    assert model_spec("alexnet").valid_input((3, 32, 32)) == (3, 63, 63)
    assert model_spec("resnet18").valid_input((3, 32, 32)) == (3, 32, 32)
    assert model_spec("efficientnet_b7").input_shape == (3, 600, 600)
    vit = model_spec("vit_h_14")  # its default weights want 518; the random-init architecture takes 224 only
    assert vit.fixed_size and vit.input_shape == (3, 224, 224) and vit.valid_input((3, 32, 32)) == (3, 224, 224)
    assert model_spec("lenet").valid_input((1, 32, 32)) == (1, 28, 28)


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "fcn_resnet50", "r3d_18", "raft_small", "quantized_resnet18"])
def test_non_classification_models_are_refused(name):
    with pytest.raises(PrunekitError, match="unknown model"):
        model_spec(name)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "squeezenet1_0"])
def test_small_torchvision_models_build_and_run(name):
    torch.manual_seed(0)
    spec = model_spec(name)
    model = build_model(name, 7).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small inputs: threads only add contention on a busy machine
    try:
        with torch.no_grad():
            for shape in {spec.valid_input((3, 32, 32)), (3, *spec.valid_input((3, 1, 1))[1:])}:
                assert model(torch.randn(2, *shape)).shape == (2, 7), shape  # the size runjob picks, and the minimum
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["inception_v3", "googlenet", "alexnet", "vit_b_32", "efficientnet_v2_s"])
def test_awkward_models_run_at_their_valid_size_in_training_mode(name):
    """On the meta device (shapes only, fast): the size runjob picks for 32x32 data works, and models with
    auxiliary heads return plain logits in training mode (what a cross-entropy loop needs)."""
    spec = model_spec(name)
    with torch.device("meta"):
        model = spec.build(10, 3).train()
        out = model(torch.empty(2, *spec.valid_input((3, 32, 32))))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_torchvision_gray_input_is_refused():
    with pytest.raises(PrunekitError, match="3-channel"):
        build_model("resnet18", 10, (1, 32, 32))


@pytest.mark.parametrize(("typo", "expected"), [("resnet19", "resnet18"), ("ResNet50", "resnet50"), ("lenett", "lenet")])
def test_unknown_model_lists_close_matches(typo, expected):
    with pytest.raises(PrunekitError) as exc:
        model_spec(typo)
    msg = str(exc.value)
    assert f"unknown model '{typo}'" in msg and expected in msg
    assert "python -m prunekit.models" in msg and "package.module:callable" in msg


def test_torchvision_state_dict_loads(tmp_path):
    """A torchvision-style checkpoint (plain state dict, legacy serialization like the hub's .pth files)
    loads through runjob.load_weights (torch.load weights_only=True + load_state_dict)."""
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(source.state_dict(), path, _use_new_zipfile_serialization=False)
    model = build_model("resnet18", 10)
    load_weights(model, path)
    assert torch.equal(model.fc.weight, source.fc.weight)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_checkpoint_with_auxiliary_heads_loads(tmp_path):
    """torchvision's googlenet/inception_v3 files carry the auxiliary heads prunekit builds without."""
    with torch.device("meta"):
        model = build_model("googlenet", 10)
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    state |= {"aux1.conv.conv.weight": torch.zeros(128, 512, 1, 1), "aux2.fc2.bias": torch.zeros(10)}
    torch.save(state, tmp_path / "googlenet.pth")
    load_weights(model, tmp_path / "googlenet.pth")
    torch.save({**state, "stray.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(PrunekitError, match="stray.weight"):
        load_weights(model, tmp_path / "bad.pth")  # other unexpected keys still fail


# --- package.module:callable -----------------------------------------------------------------------------------

USER_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A tiny user CNN."""

    def __init__(self, num_classes, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def build(num_classes, in_channels):
    return Net(num_classes, in_channels)


build.input_shape = (1, 12, 12)
build.min_size = (8, 8)


def classes_only(num_classes=10):
    return Net(num_classes)


class Factory:
    @staticmethod
    def make(**kwargs):
        return Net(kwargs["num_classes"])


def no_classes(depth):
    return Net(10)


def returns_dict(num_classes):
    return {"not": "a module"}


def raises(num_classes):
    raise ValueError("depth must be even")


def bad_shape(num_classes):
    return Net(num_classes)


bad_shape.input_shape = (1, 12)
NOT_CALLABLE = 3
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "pk_user_models.py").write_text(USER_MODULE)
    (tmp_path / "pk_broken_import.py").write_text("import pk_not_installed_anywhere\n")
    (tmp_path / "pk_raising_module.py").write_text("raise RuntimeError('config missing')\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("pk_user_models", "pk_broken_import", "pk_raising_module"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_import_path_model(user_models):
    spec = model_spec("pk_user_models:build")
    assert spec.input_shape == (1, 12, 12) and spec.min_size == (8, 8)
    assert model_spec("pk_user_models:Net").description == "A tiny user CNN."  # the docstring's first line
    model = build_model("pk_user_models:build", 5, spec.input_shape)
    assert model.conv.in_channels == 1
    assert model(torch.randn(2, 1, 12, 12)).shape == (2, 5)
    assert spec.valid_input((1, 4, 4)) == (1, 8, 8)


@pytest.mark.parametrize("path", ["pk_user_models:Net", "pk_user_models:classes_only", "pk_user_models:Factory.make"])
def test_import_path_forms(user_models, path):
    spec = model_spec(path)
    assert spec.input_shape == (3, 224, 224)
    assert build_model(path, 4)(torch.randn(1, 3, 16, 16)).shape == (1, 4)


def test_import_path_from_current_directory(tmp_path, monkeypatch):
    (tmp_path / "pk_cwd_models.py").write_text(USER_MODULE)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "pk_cwd_models", raising=False)
    monkeypatch.chdir(tmp_path)
    assert build_model("pk_cwd_models:build", 3, (1, 12, 12))(torch.randn(1, 1, 12, 12)).shape == (1, 3)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("pk_no_such_module:build", "no module named 'pk_no_such_module'"),
        ("pk_broken_import:build", "it imports 'pk_not_installed_anywhere', which is not installed"),
        ("pk_raising_module:build", "raised RuntimeError: config missing"),
        ("pk_user_models:biuld", "has no attribute 'biuld'; did you mean build"),
        ("pk_user_models:Factory.mkae", "pk_user_models:Factory has no attribute 'mkae'"),
        ("pk_user_models:NOT_CALLABLE", "NOT_CALLABLE is a int, not callable"),
        ("pk_user_models:no_classes", "takes (depth); it must take num_classes"),
        ("pk_user_models:bad_shape", "input_shape = (1, 12); set it to 3 positive ints"),
        ("pk_user_models:", "package.module:callable"),
    ],
)
def test_import_path_errors_at_lookup(user_models, path, message):
    with pytest.raises(PrunekitError) as exc:
        model_spec(path)
    assert message in str(exc.value) and path in str(exc.value)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("pk_user_models:returns_dict", "returned a dict, not a torch.nn.Module"),
        ("pk_user_models:raises", "pk_user_models:raises(num_classes=10) raised ValueError: depth must be even"),
    ],
)
def test_import_path_errors_at_build(user_models, path, message):
    with pytest.raises(PrunekitError) as exc:
        build_model(path, 10)
    assert message in str(exc.value)


# --- CIFAR-10 binary -------------------------------------------------------------------------------------------

CLASSES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root: Path, records: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny cifar-10-batches-bin: ``records`` random records per file, and batches.meta.txt."""
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    files = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, size=(records, 3073), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, size=records)
        rec.tofile(d / name)
        files[name] = rec
    (d / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    return files


def undo(x: torch.Tensor) -> np.ndarray:
    """Pixel bytes back from a normalised (3, 32, 32) tensor."""
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8).numpy()


@pytest.fixture
def cifar(tmp_path):
    return tmp_path, write_cifar(tmp_path)


@pytest.mark.parametrize("form", ["parent", "dir", "explicit"])
def test_cifar10_loads_byte_exact(cifar, form):
    root, files = cifar
    d = root / "cifar-10-batches-bin"
    source = {"parent": str(root), "dir": str(d), "explicit": f"cifar10:{d}"}[form]
    bundle = load_data(source, (3, 32, 32), batch_size=8, seed=0)
    assert (bundle.name, bundle.num_classes, bundle.input_shape) == ("cifar10", 10, (3, 32, 32))
    assert len(bundle.train.dataset) == 100 and len(bundle.test.dataset) == 20
    assert bundle.test.dataset.classes == CLASSES
    test = files["test_batch.bin"]
    for i in (0, 7, 19):
        x, y = bundle.test.dataset[i]
        assert int(y) == test[i, 0]
        raw = test[i, 1:]
        assert np.array_equal(undo(x)[0], raw[:1024].reshape(32, 32))  # red plane first, row-major
        assert np.array_equal(undo(x), raw.reshape(3, 32, 32))
    ys = torch.cat([y for _, y in bundle.test])
    assert ys.tolist() == test[:, 0].tolist()  # the test loader keeps file order
    train_labels = np.concatenate([files[f"data_batch_{i}.bin"][:, 0] for i in range(1, 6)])
    assert bundle.train.dataset.labels.tolist() == train_labels.tolist()


def candidates(raw: np.ndarray) -> list[np.ndarray]:
    img = raw.reshape(3, 32, 32)
    padded = np.pad(img, ((0, 0), (4, 4), (4, 4)))
    crops = [padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
    return crops + [c[:, :, ::-1] for c in crops]


def test_cifar10_train_split_is_augmented_and_seeded(cifar):
    root, files = cifar
    bundle = load_data(str(root), (3, 32, 32), batch_size=10, seed=3)
    ds = bundle.train.dataset
    assert ds.generator is bundle.train.generator  # one generator: reseeding it fixes order and augmentation
    raw = files["data_batch_1.bin"]
    changed = 0
    for i in range(10):
        x, y = ds[i]
        got = undo(x)
        assert int(y) == raw[i, 0]
        assert any(np.array_equal(got, c) for c in candidates(raw[i, 1:])), i  # a crop of the padded image, maybe flipped
        changed += not np.array_equal(got, raw[i, 1:].reshape(3, 32, 32))
    assert changed >= 5

    def first_batch(b):
        return next(iter(b.train))

    bundle.train.generator.manual_seed(11)
    a = first_batch(bundle)
    bundle.train.generator.manual_seed(11)
    b = first_batch(bundle)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    again = load_data(str(root), (3, 32, 32), batch_size=10, seed=3)
    fresh = load_data(str(root), (3, 32, 32), batch_size=10, seed=3)
    assert torch.equal(first_batch(again)[0], first_batch(fresh)[0])  # the seed alone decides
    bundle.train.generator.manual_seed(12)
    assert not torch.equal(first_batch(bundle)[0], a[0])


def test_cifar10_resized_and_gray(cifar):
    root, _ = cifar
    big = load_data(str(root), (3, 75, 75), batch_size=4, seed=0)
    assert big.test.dataset[0][0].shape == (3, 75, 75) and next(iter(big.train))[0].shape == (4, 3, 75, 75)
    gray = load_data(str(root), (1, 28, 28), batch_size=4, seed=0)
    x = gray.test.dataset[0][0]
    assert x.shape == (1, 28, 28) and torch.isfinite(x).all()
    assert abs(float(torch.stack([gray.test.dataset[i][0] for i in range(20)]).mean())) < 1.5


def test_cifar10_truncated_file(cifar):
    root, _ = cifar
    f = root / "cifar-10-batches-bin" / "data_batch_3.bin"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(PrunekitError) as exc:
        load_data(str(root), (3, 32, 32))
    assert "data_batch_3.bin" in str(exc.value) and "3073" in str(exc.value)


def test_cifar10_bad_label(cifar):
    root, files = cifar
    rec = files["test_batch.bin"].copy()
    rec[4, 0] = 11
    rec.tofile(root / "cifar-10-batches-bin" / "test_batch.bin")
    with pytest.raises(PrunekitError, match=r"test_batch.bin: record 4 has label 11; CIFAR-10 labels are 0..9"):
        load_data(str(root), (3, 32, 32))


def test_cifar10_missing_file(cifar):
    root, _ = cifar
    (root / "cifar-10-batches-bin" / "test_batch.bin").unlink()
    with pytest.raises(PrunekitError, match="lacks test_batch.bin"):
        load_data(f"cifar10:{root}", (3, 32, 32))
    with pytest.raises(PrunekitError, match="CIFAR-10 binary directory"):  # without the prefix: not recognised
        load_data(str(root), (3, 32, 32))


def test_imagefolder_loader_is_seeded(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / split / cls / "x.png")
    bundle = load_data(str(tmp_path), (3, 16, 16), batch_size=2, seed=0)
    assert bundle.num_classes == 2 and bundle.train.generator is not None
    assert next(iter(bundle.train))[0].shape == (2, 3, 16, 16)
