"""The training loop the CLI uses: dense training, then prune-and-fine-tune driven by a pipeline."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from prunekit import distributed
from prunekit.distributed import Dist
from prunekit.errors import PrunekitError
from prunekit.masking import WeightMask

# Tests only: SIGKILL this process right after epoch N's ``on_epoch`` (where ``prunekit run`` writes its
# checkpoint), the crash that tests/test_resume.py resumes from. Unset in normal use.
KILL_AFTER_EPOCH_ENV = "PRUNEKIT_TEST_KILL_AFTER_EPOCH"


@attrs.frozen
class EpochRecord:
    epoch: int
    sparsity: float
    updated: bool
    loss: float
    accuracy: float
    note: str = ""


def make_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    # weight decay only on >= 2-D tensors (weights), not on biases and BN parameters
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise PrunekitError(f"optimizer '{kind}' is unknown; use 'sgd' or 'adam'")


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def train_epoch(
    model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, desc: str = "train", progress: bool = True,
    dist: Dist | None = None,
) -> float:  # fmt: skip
    """One pass over ``loader``; the mean loss (over every process's samples when ``dist`` has several)."""
    model.train()
    device = _device(model)
    total, n = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch")
    for x, y in bar:
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / n:.4f}")
    if dist is not None and dist.active:
        total, n = distributed.all_sum(dist, [total, float(n)])
    return total / max(n, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, dist: Dist | None = None) -> float:
    """Top-1 accuracy in percent; with ``dist``, each process counts its shard and the counts are summed."""
    model.eval()
    device = _device(model)
    correct = count = 0
    for x, y in loader:
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        count += len(y)
    if dist is not None and dist.active:
        correct, count = distributed.all_sum(dist, [float(correct), float(count)])
    return 100.0 * correct / max(count, 1)


def _mask_keys(model: nn.Module) -> set[str]:
    return {f"{name}.mask" for name, mod in model.named_modules() if isinstance(mod, WeightMask)}


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def fit(
    model: nn.Module,
    train: DataLoader,
    test: DataLoader,
    epochs: int,
    lr: float,
    optimizer: str = "adam",
    progress: bool = True,
    desc: str = "dense",
    dist: Dist | None = None,
) -> float:
    """Dense training; with several processes ``train`` is this process's shard and the model trains
    under DistributedDataParallel (``test`` likewise a shard: the accuracy is summed)."""
    dist = dist or Dist()
    opt = make_optimizer(model, optimizer, lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    trained = distributed.wrap(model, dist)
    try:
        for e in tqdm(range(epochs), desc=desc, disable=not progress, unit="epoch"):
            _set_epoch(train, e)
            train_epoch(trained, train, opt, f"{desc} epoch {e}", progress, dist)
            distributed.broadcast_buffers(dist, model, _mask_keys(model))
            sched.step()
    finally:
        distributed.unwrap(model, dist)
        del trained
    return evaluate(model, test, dist)


def lr_segments(decisions: list, epochs: int) -> list[tuple[int, int]]:
    """``[start, end)`` spans of one cosine learning-rate schedule each: a rewind starts a new one (the
    run starts over from the rewound weights), so every lottery-ticket round trains a full schedule."""
    starts = sorted({0, *(d.step for d in decisions if d.rewind and 0 < d.step < epochs)})
    return [(a, b) for a, b in zip(starts, [*starts[1:], epochs])]


def cosine_lr(base: float, e: int, span: tuple[int, int]) -> float:
    """The learning rate of epoch ``e`` in its segment (what CosineAnnealingLR stepped per epoch gives)."""
    start, end = span
    return base * 0.5 * (1.0 + math.cos(math.pi * (e - start) / max(end - start, 1)))


def prune_and_finetune(
    pipeline: Any,
    model: nn.Module,
    train: DataLoader,
    test: DataLoader,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    progress: bool = True,
    on_epoch: Callable[[EpochRecord, torch.optim.Optimizer], None] | None = None,
    *,
    dist: Dist | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> list[EpochRecord]:
    """Each epoch from ``pipeline.position``: ``pipeline.step`` acts on the schedule's decision (masks,
    rewind, snapshot), then one epoch trains with masks fixed, the model is evaluated and
    ``on_epoch(record, optimizer)`` runs (``prunekit run`` checkpoints there).

    The optimizer and its cosine learning rate restart at every rewind; the rate is a pure function of
    the epoch, so a resumed run continues it, and ``optimizer_state`` (the checkpoint's) is loaded into
    the first epoch's optimizer unless that epoch rewinds (an uninterrupted run restarts it there too).

    With ``dist`` of several processes the model trains under DistributedDataParallel while the pipeline
    keeps acting on ``model`` itself; masks are checked identical on every process after each update,
    buffers (batch-norm statistics) are made rank 0's after each epoch, ``train`` and ``test`` are this
    process's shards (see ``prunekit.distributed``)."""
    dist = dist or Dist()
    segments = lr_segments(pipeline.plan(epochs), epochs)
    kill_after = os.environ.get(KILL_AFTER_EPOCH_ENV)
    opt = None
    records = []
    trained = distributed.wrap(model, dist)
    try:
        bar = tqdm(range(pipeline.position, epochs), desc=f"prune {pipeline.name}", disable=not progress, unit="epoch")
        for e in bar:
            _set_epoch(train, e)
            decision = pipeline.step(e, total_steps=epochs)
            if decision.update:
                distributed.check_same(dist, _selections(pipeline), f"masks after step {e}")
            if opt is None or decision.rewind:
                opt = make_optimizer(model, optimizer, lr)
                if optimizer_state is not None and not decision.rewind:
                    opt.load_state_dict(optimizer_state)
                optimizer_state = None
            span = next(seg for seg in segments if seg[0] <= e < seg[1])
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, e, span)
            loss = train_epoch(trained, train, opt, f"epoch {e}", progress, dist)
            distributed.broadcast_buffers(dist, model, _mask_keys(model))
            acc = evaluate(model, test, dist)
            rec = EpochRecord(e, pipeline.sparsity(), decision.update, loss, acc, decision.note)
            records.append(rec)
            bar.set_postfix(sparsity=f"{rec.sparsity:.3f}", acc=f"{acc:.2f}")
            if on_epoch is not None:
                on_epoch(rec, opt)
            if kill_after is not None and kill_after == str(e):
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        distributed.unwrap(model, dist)
        del trained
    return records


def _selections(pipeline: Any) -> dict[str, torch.Tensor]:
    """Every layer's mask and permutations, for the check that all processes selected the same."""
    out = {}
    for name, st in pipeline.layers.items():
        if st.selection is None:
            continue
        out[f"{name} mask"] = st.selection.mask
        for d, p in enumerate(st.selection.perms):
            if p is not None:
                out[f"{name} permutation {d}"] = p
    return out
