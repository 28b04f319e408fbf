"""One checkpoint per epoch: everything a resumed run needs to continue as if it had never stopped.

``OUT/checkpoint.pt`` is one ``torch.save`` dict, written atomically (temp file, then rename), so a crash
leaves the previous epoch's checkpoint or this one, never a mix. It reads with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only.

=================  ====================================================================================
key                what
=================  ====================================================================================
format             ``prunekit-checkpoint/1``
epoch              the last finished epoch (the resumed run starts at ``epoch + 1``)
run                JSON: what must match to resume (pipeline, its components and params, model, data,
                   epochs, lr, optimizer, batch size, seed) and the world size it was written with
model              the model's state_dict, masks included (parametrized weights as ``original``)
optimizer          the optimizer's state_dict (momentum / Adam moments)
scheduler          JSON: the learning-rate schedule (cosine segments restarting at rewinds, base lr)
                   and the rate of each parameter group in the last epoch; the rate is a pure function
                   of the epoch, so this is a check, not a state to replay
pipeline           ``Pipeline.state_dict()``: masks, permutations, schedule position, rewind snapshots
rng                one dict per process (rank order): torch CPU, CUDA (when present), python ``random``,
                   numpy and the training loader's generator (shuffling, augmentation) states as tensors
history            JSON: the EpochRecords so far (the report's ``history``)
dense              JSON: dense accuracy and where the dense weights came from (the report's fields)
sha256             digest of everything above (``content_digest``): torch.load checks no checksum, so a
                   flipped bit in a tensor would otherwise resume silently from different weights
=================  ====================================================================================
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from prunekit.atomic import atomic_torch_save
from prunekit.errors import CheckpointError

CHECKPOINT_FORMAT = "prunekit-checkpoint/1"
_RNG_KEYS = ("torch", "python", "python_gauss", "numpy", "numpy_meta", "numpy_gauss")
_KEYS = ("format", "epoch", "run", "model", "optimizer", "scheduler", "pipeline", "rng", "history", "dense")


@attrs.define
class Checkpoint:
    epoch: int
    run: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    pipeline: dict[str, Any]
    rng: list[dict[str, torch.Tensor]]
    history: list[dict[str, Any]]
    dense: dict[str, Any]
    # read from a file with a matching sha256 (False: an older prunekit's, without one): checks that the digest
    # makes needless apply to the others
    verified: bool = attrs.field(default=True, eq=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "run": json.dumps(self.run, sort_keys=True),
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": json.dumps(self.scheduler),
            "pipeline": self.pipeline,
            "rng": self.rng,
            "history": json.dumps(self.history),
            "dense": json.dumps(self.dense),
        }


def content_digest(obj: Any) -> str:
    """sha256 over a checkpoint's content in a fixed order: dict keys sorted, tensors by dtype, shape and
    bytes, everything else as JSON."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode() + b":")
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def save(ckpt: Checkpoint, path: Path) -> None:
    raw = ckpt.to_dict()
    raw["sha256"] = content_digest(raw)
    atomic_torch_save(raw, path)


def load(path: Path) -> Checkpoint:
    """Read and check a checkpoint; anything else (truncated, foreign, an older prunekit's) is one CheckpointError."""
    fix = "remove it or pass another --out to start afresh"
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable prunekit checkpoint ({type(exc).__name__}); {fix}") from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        what = raw.get("format") if isinstance(raw, dict) and isinstance(raw.get("format"), str) else None
        if what is None and isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
            what = "model weights only, an older prunekit's checkpoint without optimizer or RNG state"
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} file ({what or 'unknown content'}); {fix}")
    missing = [k for k in _KEYS if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: {CHECKPOINT_FORMAT} file without {', '.join(missing)}; {fix}")
    verified = "sha256" in raw
    if verified:  # files written before the digest have none: read as they are, with deeper checks
        digest = raw.pop("sha256")
        if not isinstance(digest, str) or content_digest(raw) != digest:
            raise CheckpointError(f"{path}: damaged {CHECKPOINT_FORMAT} file (its content does not match its sha256: "
                                  f"a changed bit, or an edit); {fix}")  # fmt: skip
    try:
        ckpt = Checkpoint(
            epoch=int(raw["epoch"]),
            run=json.loads(raw["run"]),
            model=dict(raw["model"]),
            optimizer=raw["optimizer"],
            scheduler=json.loads(raw["scheduler"]),
            pipeline=raw["pipeline"],
            rng=list(raw["rng"]),
            history=json.loads(raw["history"]),
            dense=json.loads(raw["dense"]),
            verified=verified,
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged {CHECKPOINT_FORMAT} file ({exc}); {fix}") from None
    shapes = {"run": dict, "scheduler": dict, "dense": dict, "history": list, "optimizer": dict, "pipeline": dict}
    wrong = [k for k, t in shapes.items() if not isinstance(getattr(ckpt, k), t)]
    if wrong:
        raise CheckpointError(f"{path}: damaged {CHECKPOINT_FORMAT} file ({', '.join(wrong)} of the wrong type); {fix}")
    for i, state in enumerate(ckpt.rng):
        lacks = [k for k in _RNG_KEYS if not isinstance(state, dict) or not isinstance(state.get(k), torch.Tensor)]
        if lacks:
            raise CheckpointError(f"{path}: the generator states of process {i} lack {', '.join(lacks)}; {fix}")
    return ckpt


def check_run(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """The checkpoint must come from the same run settings (world size aside)."""
    for key in sorted(set(saved) | set(now)):
        if key == "world_size":
            continue
        if saved.get(key) != now.get(key):
            raise CheckpointError(
                f"{path}: written by a run with {key} = {saved.get(key)!r}, this run has {key} = {now.get(key)!r}; "
                "resume with the same settings or pass another --out"
            )


# ---------------------------------------------------------------- RNG states as tensors


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """This process's generator states: torch CPU (and CUDA), python ``random``, numpy's global generator,
    and ``generators`` by name (the training loader's, which data augmentation draws from too)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    if kind != "MT19937":
        raise CheckpointError(f"numpy's global generator is {kind}, not MT19937; it cannot be checkpointed")
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *mt], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else 1.0, 0.0 if gauss is None else gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    for name, g in (generators or {}).items():
        state[f"generator:{name}"] = g.get_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what ``rng_state`` took (a generator the state lacks is left as it is)."""
    torch.set_rng_state(state["torch"])
    py = state["python"].tolist()
    has, value = state["python_gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), value if has else None))
    pos, has_gauss = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, float(state["numpy_gauss"][0])))
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
    for name, g in (generators or {}).items():
        if f"generator:{name}" in state:
            g.set_state(state[f"generator:{name}"])


def seed_all(seed: int, generators: dict[str, torch.Generator] | None = None) -> None:
    """Fresh generator states from ``seed`` (fine-tuning starts from them whether the dense model was
    trained in this run or read from the cache)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    for i, g in enumerate((generators or {}).values()):
        g.manual_seed(seed + 7919 * (i + 1))  # not the global stream again
