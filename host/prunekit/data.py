"""Data sets: scikit-learn's handwritten digits (built in), CIFAR-10 from its binary files, or an ImageFolder.

Nothing is downloaded and nothing is unpickled: CIFAR-10 is read from ``cifar-10-batches-bin`` (the
plain byte format: per record one label byte, then 1024 red, 1024 green, 1024 blue bytes of a row-major
32x32 image); its pickled "python version" is not supported.
"""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from prunekit.errors import PrunekitError


@attrs.frozen
class DataBundle:
    name: str
    train: DataLoader
    test: DataLoader
    num_classes: int
    input_shape: tuple[int, int, int]


def digits_tensors(input_shape: tuple[int, int, int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The 1797 8x8 digits, resized to ``input_shape`` and standardised; a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(ds.target, dtype=torch.long)
    c, h, w = input_shape
    if (h, w) != (8, 8):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    x = x.expand(-1, c, -1, -1).contiguous()
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for label in range(10):
        idx = (y == label).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[: len(idx) // 5])
    test = torch.cat(test_idx)
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test] = True
    return x[~is_test], y[~is_test], x[is_test], y[is_test]


# --- CIFAR-10, binary version ----------------------------------------------------------------------------

CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = "test_batch.bin"
CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per channel over the 50000 training images, pixels in [0, 1]
CIFAR_STD = (0.2470, 0.2435, 0.2616)
GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's Grayscale
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar10_dir(source: str) -> Path | None:
    """The ``cifar-10-batches-bin`` directory ``source`` names (``cifar10:PATH``, the directory itself or
    its parent), or None when ``source`` is not CIFAR-10. Raises when ``cifar10:PATH`` lacks a file."""
    explicit = source.startswith("cifar10:")
    root = Path(source.removeprefix("cifar10:")).expanduser()
    for d in (root, root / CIFAR_DIR):
        if all((d / f).is_file() for f in (*CIFAR_TRAIN, CIFAR_TEST)):
            return d
    if not explicit:
        return None
    d = root / CIFAR_DIR if (root / CIFAR_DIR).is_dir() else root
    missing = [f for f in (*CIFAR_TRAIN, CIFAR_TEST) if not (d / f).is_file()]
    raise PrunekitError(f"--data {source}: {d} lacks {', '.join(missing)}; point it at the unpacked "
                        f"cifar-10-binary.tar.gz ({CIFAR_DIR}/ with data_batch_1.bin .. data_batch_5.bin and "
                        f"{CIFAR_TEST}; the pickled python version is not read)")  # fmt: skip


def is_cifar10(source: str) -> bool:
    """Whether ``load_data(source, ...)`` reads CIFAR-10 (native 32x32 RGB images)."""
    return source.startswith("cifar10:") or cifar10_dir(source) is not None


def read_cifar10_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one binary batch file, validated."""
    size = path.stat().st_size
    if size == 0 or size % CIFAR_RECORD:
        raise PrunekitError(f"{path}: {size} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records "
                            "(1 label byte + 3072 pixel bytes); the file is truncated or not the binary version")  # fmt: skip
    rec = np.fromfile(path, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = rec[:, 0]
    if int(labels.max()) >= 10:
        i = int(np.argmax(labels >= 10))
        raise PrunekitError(f"{path}: record {i} has label {int(labels[i])}; CIFAR-10 labels are 0..9 "
                            "(a CIFAR-100 file has 2 label bytes per record and is not read)")  # fmt: skip
    images = torch.from_numpy(rec[:, 1:].reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def cifar10_classes(d: Path) -> list[str]:
    meta = d / "batches.meta.txt"
    if meta.is_file():
        names = [line.strip() for line in meta.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        if len(names) >= 10:
            return names[:10]
    return list(CIFAR_CLASSES)


class Cifar10(Dataset):
    """CIFAR-10 images as normalised float tensors of ``input_shape`` (gray when it has 1 channel).

    ``augment``: random 32x32 crop of the image zero-padded by 4 pixels, then a horizontal flip with
    probability 1/2, drawn from ``generator``: the training DataLoader's own generator, so reseeding that
    one (``bundle.train.generator.manual_seed``) fixes the order and the augmentation alike (one process:
    the loaders use no workers).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, input_shape: tuple[int, int, int],
                 augment: bool = False, generator: torch.Generator | None = None,
                 classes: list[str] | None = None) -> None:  # fmt: skip
        self.images, self.labels, self.input_shape = images, labels, input_shape
        self.augment, self.generator = augment, generator
        self.classes = classes or list(CIFAR_CLASSES)
        c = input_shape[0]
        if c not in (1, 3):
            raise PrunekitError(f"CIFAR-10 images have 3 channels (or 1 as gray); the model asks for {c}")
        mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
        if c == 1:  # the channel statistics combined with the luma weights
            w = torch.tensor(GRAY)
            mean, std = (w * mean).sum(0, keepdim=True), (w * std).sum(0, keepdim=True)
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
        self.luma = torch.tensor(GRAY).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]
        if self.augment:
            dy, dx = torch.randint(0, 9, (2,), generator=self.generator).tolist()
            img = F.pad(img, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
            if torch.randint(0, 2, (1,), generator=self.generator).item():
                img = img.flip(-1)
        x = img.float() / 255.0
        if self.input_shape[0] == 1:
            x = (self.luma * x).sum(0, keepdim=True)
        x = (x - self.mean) / self.std
        if tuple(self.input_shape[1:]) != (32, 32):
            smaller = math.prod(self.input_shape[1:]) < 32 * 32
            x = F.interpolate(x[None], size=self.input_shape[1:], mode="bilinear", align_corners=False, antialias=smaller)[0]
        return x, self.labels[i]


def load_cifar10(d: Path, input_shape: tuple[int, int, int], batch_size: int, seed: int) -> DataBundle:
    parts = [read_cifar10_file(d / f) for f in CIFAR_TRAIN]
    xtr, ytr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    xte, yte = read_cifar10_file(d / CIFAR_TEST)
    classes = cifar10_classes(d)
    g = torch.Generator().manual_seed(seed)
    train = Cifar10(xtr, ytr, input_shape, augment=True, generator=g, classes=classes)
    test = Cifar10(xte, yte, input_shape, classes=classes)
    return DataBundle("cifar10", DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
                      DataLoader(test, batch_size=256), 10, input_shape)  # fmt: skip


# --- the entry point -----------------------------------------------------------------------------------------


def load_data(source: str, input_shape: tuple[int, int, int], batch_size: int = 64, seed: int = 0) -> DataBundle:
    """``source``: ``digits``; a CIFAR-10 binary directory (``cifar-10-batches-bin`` or its parent), or
    explicitly ``cifar10:PATH``; or a directory with ``train/`` and ``val/`` ImageFolder subdirectories.
    Every training loader is shuffled by its own ``generator``, seeded with ``seed``."""
    if source == "digits":
        xtr, ytr, xte, yte = digits_tensors(input_shape, seed)
        g = torch.Generator().manual_seed(seed)
        train = DataLoader(TensorDataset(xtr, ytr), batch_size=batch_size, shuffle=True, generator=g)
        test = DataLoader(TensorDataset(xte, yte), batch_size=256)
        return DataBundle("digits", train, test, 10, input_shape)
    cifar = cifar10_dir(source)
    if cifar is not None:
        return load_cifar10(cifar, input_shape, batch_size, seed)
    root = Path(source)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise PrunekitError(f"--data {source}: expected 'digits', a CIFAR-10 binary directory ({CIFAR_DIR}/ or "
                            "cifar10:PATH) or a directory with train/ and val/ ImageFolder subdirectories")  # fmt: skip
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    c, h, w = input_shape
    tf = T.Compose([T.Resize((h, w)), T.Grayscale(c) if c == 1 else T.Lambda(lambda im: im.convert("RGB")), T.ToTensor()])
    tr, va = ImageFolder(root / "train", tf), ImageFolder(root / "val", tf)
    g = torch.Generator().manual_seed(seed)
    return DataBundle(
        root.name,
        DataLoader(tr, batch_size=batch_size, shuffle=True, num_workers=0, generator=g),
        DataLoader(va, batch_size=256, num_workers=0),
        len(tr.classes),
        input_shape,
    )
