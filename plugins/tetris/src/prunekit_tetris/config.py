"""The reference repository's per-layer JSON config, read as is.

Format (CRAFT-THU/tetris ``config.json.example``)::

    {"vgg16": {"block_sizes": [[8, 0, 0, 0], [8, 8, 0, 0], ..., [8, 8]],
               "pruning_rates": [0.42, 0.78, ..., 0.77]}}

One entry per prunable layer in network order (for VGG/AlexNet: every Conv2d of ``features`` then every
Linear of ``classifier``, which is the host's selection order; for other models: ``LayerInfo.index``),
one block size per weight dim (0 = whole dim), rates = fraction of blocks pruned, in [0, 1).
``config = "published"`` names the copy shipped with this package (vgg16, vgg16_bn, alexnet).
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path

import attrs

from prunekit import LayerInfo, PrunekitError, SelectionError

PUBLISHED = "published"


@attrs.frozen
class ArchConfig:
    source: str
    arch: str
    block_sizes: tuple[tuple[int, ...], ...]
    pruning_rates: tuple[float, ...]

    def entry(self, layer: LayerInfo) -> tuple[tuple[int, ...], float]:
        """This layer's (block sizes, rate), checked against the layer; SelectionError names the entry."""
        where = f"config '{self.arch}' ({self.source})"
        if len(self.block_sizes) != layer.count:  # the config does not fit this model: a pipeline error, not a layer's
            raise PrunekitError(
                f"{where} has {len(self.block_sizes)} entries but the pipeline selects {layer.count} layers of this "
                f"model (at layer {layer.name}): it describes another architecture, or include/exclude/"
                "keep_first_dense/keep_last_dense changed the selection; use the config of this model"
            )
        i = layer.index
        block = self.block_sizes[i]
        ndim = len(layer.weight_shape)
        if len(block) != ndim:
            raise SelectionError(
                f"{where}: entry {i} block_sizes {list(block)} has {len(block)} ints but layer {layer.name} "
                f"({layer.kind} {list(layer.weight_shape)}) has {ndim} dims; give one block size per dim"
            )
        return block, self.pruning_rates[i]


def _resolve(path: str) -> str:
    if path == PUBLISHED:
        return str(resources.files("prunekit_tetris").joinpath("published.json"))
    return path


@functools.lru_cache(maxsize=16)
def _read(path: str, mtime: float) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SelectionError(f"config {path}: not valid JSON ({exc}); fix the file") from None


def load_config(path: str, arch: str) -> ArchConfig:
    """Read and validate ``arch``'s entry of the JSON config at ``path`` ("published" = shipped copy)."""
    real = _resolve(path)
    try:
        mtime = os.stat(real).st_mtime
    except OSError:
        raise SelectionError(f"config {path}: no such file; give the path of a TETRIS JSON config or \"published\"") from None
    data = _read(real, mtime)
    where = f"config {path}"
    if not isinstance(data, dict):
        raise SelectionError(f"{where}: the top level must be an object of architecture name -> entry")
    if not arch:
        raise SelectionError(f"{where}: arch is empty; set arch to one of {', '.join(sorted(data))}")
    if arch not in data:
        raise SelectionError(f"{where} has no architecture '{arch}' (it has {', '.join(sorted(data))}); set arch to one of them")
    entry = data[arch]
    where = f"config '{arch}' ({path})"
    if not isinstance(entry, dict) or set(entry) != {"block_sizes", "pruning_rates"}:
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise SelectionError(f"{where}: needs exactly the keys block_sizes and pruning_rates, got {got}")
    blocks, rates = entry["block_sizes"], entry["pruning_rates"]
    if not isinstance(blocks, list) or not isinstance(rates, list) or len(blocks) != len(rates):
        raise SelectionError(f"{where}: block_sizes and pruning_rates must be lists of equal length (one entry per layer)")
    for i, b in enumerate(blocks):
        if not isinstance(b, list) or not b or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in b):
            raise SelectionError(f"{where}: entry {i} block_sizes {b!r} must be a list of ints >= 0 (0 = whole dim)")
    for i, r in enumerate(rates):
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0.0 <= r < 1.0:
            raise SelectionError(f"{where}: entry {i} pruning_rates {r!r} is outside [0, 1); give the fraction of blocks to prune")
    return ArchConfig(path, arch, tuple(tuple(b) for b in blocks), tuple(float(r) for r in rates))
