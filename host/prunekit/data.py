"""Data sets: scikit-learn's handwritten digits (built in, no download) or an ImageFolder directory."""

from __future__ import annotations

from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

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


def load_data(source: str, input_shape: tuple[int, int, int], batch_size: int = 64, seed: int = 0) -> DataBundle:
    """``digits`` or a directory with ``train/`` and ``val/`` ImageFolder subdirectories."""
    if source == "digits":
        xtr, ytr, xte, yte = digits_tensors(input_shape, seed)
        g = torch.Generator().manual_seed(seed)
        train = DataLoader(TensorDataset(xtr, ytr), batch_size=batch_size, shuffle=True, generator=g)
        test = DataLoader(TensorDataset(xte, yte), batch_size=256)
        return DataBundle("digits", train, test, 10, input_shape)
    root = Path(source)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise PrunekitError(f"--data {source}: expected 'digits' or a directory with train/ and val/ ImageFolder subdirectories")
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    c, h, w = input_shape
    tf = T.Compose([T.Resize((h, w)), T.Grayscale(c) if c == 1 else T.Lambda(lambda im: im.convert("RGB")), T.ToTensor()])
    tr, va = ImageFolder(root / "train", tf), ImageFolder(root / "val", tf)
    return DataBundle(
        root.name,
        DataLoader(tr, batch_size=batch_size, shuffle=True, num_workers=0),
        DataLoader(va, batch_size=256, num_workers=0),
        len(tr.classes),
        input_shape,
    )
