"""The training loop the CLI uses: dense training, then prune-and-fine-tune driven by a pipeline."""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError


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


def train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, desc: str = "train", progress: bool = True) -> float:
    model.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch")
    for x, y in bar:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / max(n, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = count = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        count += len(y)
    return 100.0 * correct / max(count, 1)


def fit(
    model: nn.Module,
    train: DataLoader,
    test: DataLoader,
    epochs: int,
    lr: float,
    optimizer: str = "adam",
    progress: bool = True,
    desc: str = "dense",
) -> float:
    opt = make_optimizer(model, optimizer, lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    for e in tqdm(range(epochs), desc=desc, disable=not progress, unit="epoch"):
        train_epoch(model, train, opt, f"{desc} epoch {e}", progress)
        sched.step()
    return evaluate(model, test)


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
    pipeline: object,
    model: nn.Module,
    train: DataLoader,
    test: DataLoader,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    progress: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> list[EpochRecord]:
    """Each epoch: ``pipeline.step`` acts on the schedule's decision (masks, rewind, snapshot), then one
    epoch trains with masks fixed and the model is evaluated. The optimizer and its cosine learning rate
    restart at every rewind; the rate is a pure function of the epoch, so a resumed run continues it."""
    segments = lr_segments(pipeline.plan(epochs), epochs)
    opt = None
    records = []
    bar = tqdm(range(pipeline.position, epochs), desc=f"prune {pipeline.name}", disable=not progress, unit="epoch")
    for e in bar:
        decision = pipeline.step(e, total_steps=epochs)
        if opt is None or decision.rewind:
            opt = make_optimizer(model, optimizer, lr)
        span = next(seg for seg in segments if seg[0] <= e < seg[1])
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, e, span)
        loss = train_epoch(model, train, opt, f"epoch {e}", progress)
        acc = evaluate(model, test)
        rec = EpochRecord(e, pipeline.sparsity(), decision.update, loss, acc, decision.note)
        records.append(rec)
        bar.set_postfix(sparsity=f"{rec.sparsity:.3f}", acc=f"{acc:.2f}")
        if on_epoch is not None:
            on_epoch(rec)
    return records
