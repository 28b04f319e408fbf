"""More than one process: ``torchrun --nproc_per_node N -m prunekit run ...`` (gloo on CPU, NCCL on GPU).

What each process does, and why the result does not depend on N:

* Data: ``GlobalBatchSampler`` shuffles by ``(seed, epoch)`` only and cuts whole global batches of
  ``batch_size``; process r trains on slice r of every global batch (``batch_size / N`` samples). So one
  process and N processes see the same global batches in the same order; the ``n % batch_size`` leftover
  samples of a shuffle sit out that epoch.
* Gradients: DistributedDataParallel averages them over the processes, which with equal slices is the
  gradient of the mean loss over the global batch.
* Batch norm: during training every ``BatchNorm*d`` normalises with the statistics of the whole global
  batch (``global_batch_norm``: two all-reduces per layer, CPU and GPU alike), so the forward is the
  one-process forward too. Running statistics are then the same on every process.
* Masks: computed on every process from identical weights, buffers and calibration batches, then
  compared across processes after every schedule step (``check_same``): a component that is not
  deterministic fails the run at once instead of training different models.

Float sums are ordered differently (a 64-sample GEMM versus two 32-sample ones plus an all-reduce), so
N processes match one process to rounding, not bit for bit; everything identical across processes is
identical bit for bit.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Iterator
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

from prunekit.errors import PrunekitError

BACKEND_ENV = "PRUNEKIT_DIST_BACKEND"  # override the backend choice, e.g. "gloo" on a GPU machine


@attrs.frozen
class Dist:
    """This process's place in the run; the default is one process (no process group)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str = ""
    device: str = "cpu"
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """What torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) says; one process without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise PrunekitError("WORLD_SIZE, RANK and LOCAL_RANK must be integers; start the run with torchrun") from None
    return Dist(world, rank, local)


def start(batch_size: int) -> Dist:
    """Join the process group torchrun set up (one process: nothing to do). ``batch_size`` is the global
    batch; it must split evenly, checked before any collective so that every process fails the same way."""
    d = from_env()
    if not d.active:
        return d
    if batch_size % d.world_size:
        raise PrunekitError(
            f"batch_size = {batch_size} (the global batch) does not split over {d.world_size} processes; "
            f"set batch_size to a multiple of {d.world_size} or change --nproc_per_node"
        )
    backend = os.environ.get(BACKEND_ENV) or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    device = "cpu"
    if "nccl" in backend:
        torch.cuda.set_device(d.local_rank)
        device = f"cuda:{d.local_rank}"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend)
    return attrs.evolve(d, backend=backend, device=device, owns_group=owns)


def stop(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


# ---------------------------------------------------------------- data


class GlobalBatchSampler(Sampler[int]):
    """Process ``rank``'s share of a shuffle seeded by ``(seed, epoch)``: whole global batches only, each
    cut into ``world_size`` contiguous slices. Call ``set_epoch`` before each epoch (DistributedSampler's
    protocol); the order never depends on a generator's state, so resuming at an epoch needs nothing saved."""

    def __init__(self, n: int, global_batch: int, world_size: int = 1, rank: int = 0, seed: int = 0) -> None:
        if global_batch % world_size:
            raise PrunekitError(f"batch_size = {global_batch} does not split over {world_size} processes")
        if n < global_batch:
            raise PrunekitError(
                f"the training set has {n} samples, fewer than one batch of batch_size = {global_batch}; lower batch_size"
            )
        self.n, self.global_batch, self.world_size, self.rank, self.seed = n, global_batch, world_size, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def steps(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return self.steps * (self.global_batch // self.world_size)

    def __iter__(self) -> Iterator[int]:
        digest = hashlib.sha256(f"{self.seed}:data:{self.epoch}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        order = torch.randperm(self.n, generator=g)[: self.steps * self.global_batch]
        mine = order.view(self.steps, self.world_size, -1)[:, self.rank]
        return iter(mine.flatten().tolist())


def train_loader(dataset: Any, global_batch: int, d: Dist, seed: int) -> DataLoader:
    """This process's training loader: ``batch_size / world_size`` samples of every global batch."""
    sampler = GlobalBatchSampler(len(dataset), global_batch, d.world_size, d.rank, seed)
    return DataLoader(dataset, batch_size=global_batch // d.world_size, sampler=sampler, num_workers=0)


def eval_loader(loader: DataLoader, d: Dist) -> DataLoader:
    """Every ``world_size``-th test sample for this process (``evaluate`` sums the counts over processes)."""
    if not d.active:
        return loader
    part = Subset(loader.dataset, range(d.rank, len(loader.dataset), d.world_size))
    return DataLoader(part, batch_size=loader.batch_size, num_workers=0)


# ---------------------------------------------------------------- collectives on small CPU values


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Sum of ``values`` over the processes (float64; exact for counts)."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def flag_from_main(d: Dist, value: bool) -> bool:
    """Rank 0's ``value`` on every process (a decision only rank 0 may take, such as a cache hit)."""
    if not d.active:
        return value
    t = torch.tensor([1 if value else 0], dtype=torch.int64, device=d.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def _digest(t: torch.Tensor) -> int:
    data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode() + data).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def check_same(d: Dist, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Fail on every process, naming the first entry, unless ``tensors`` are bit-identical on all of them."""
    if not d.active or not tensors:
        return
    names = sorted(tensors)
    mine = torch.tensor([_digest(tensors[n]) for n in names], dtype=torch.int64, device=d.device)
    every = [torch.empty_like(mine) for _ in range(d.world_size)]
    dist.all_gather(every, mine)
    for r, theirs in enumerate(every):
        differs = (theirs != every[0]).nonzero().flatten().tolist()
        if differs:
            raise PrunekitError(
                f"{what}: {names[differs[0]]} differs between process 0 and process {r}; a score or select component "
                "is not deterministic (draw randomness only from the hook's generator)"
            )


def gather_tensors(d: Dist, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every process's ``state`` (same keys and shapes on all, e.g. RNG states), in rank order, on every process."""
    if not d.active:
        return [state]
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(d.world_size)]
    for k in sorted(state):
        t = state[k].to(d.device)
        parts = [torch.empty_like(t) for _ in range(d.world_size)]
        dist.all_gather(parts, t)
        for r, p in enumerate(parts):
            out[r][k] = p.cpu()
    return out


@torch.no_grad()
def broadcast_buffers(d: Dist, model: nn.Module, skip: set[str]) -> None:
    """Rank 0's buffers (batch-norm statistics) on every process; ``skip`` (the masks) are left alone: they
    are computed identically and checked, never overwritten, so a broadcast cannot hide a mismatch."""
    if not d.active:
        return
    for name, buf in model.named_buffers():
        if name not in skip and buf.numel():
            dist.broadcast(buf, src=0)


# ---------------------------------------------------------------- batch norm over the global batch


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the gradients too (each process's loss depends on all inputs)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _global_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
        return nn.modules.batchnorm._BatchNorm.forward(self, x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    channels = x.shape[1]
    local = torch.cat([x.sum(dims), x.new_tensor([x.numel() / channels])])
    total = _AllReduceSum.apply(local)
    count = total[-1]
    mean = total[:channels] / count
    centred = x - mean.view(shape)
    var = _AllReduceSum.apply(centred.square().sum(dims)) / count  # two passes: as accurate as F.batch_norm
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            n = float(count)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1.0)), alpha=m)
    y = centred * torch.rsqrt(var + self.eps).view(shape)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    return y


_GLOBAL_BN: dict[type, type] = {
    cls: type(f"Global{cls.__name__}", (cls,), {"forward": _global_bn_forward, "__doc__": f"{cls.__name__} over the global batch"})
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
}
_LOCAL_BN = {v: k for k, v in _GLOBAL_BN.items()}


def global_batch_norm(model: nn.Module, on: bool) -> int:
    """Switch every plain ``BatchNorm*d`` to (``on``) or back from global-batch statistics in place: same
    parameters, buffers and state_dict keys, only the training forward differs. Returns how many."""
    table = _GLOBAL_BN if on else _LOCAL_BN
    switched = 0
    for mod in model.modules():
        cls = table.get(type(mod))
        if cls is not None:
            mod.__class__ = cls
            switched += 1
    return switched


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """The module to train: DistributedDataParallel around ``model`` (which the pipeline keeps acting on).

    No buffer sync before each forward: DDP would otherwise broadcast rank 0's buffers, masks included,
    every step; batch-norm statistics are global already and masks are checked instead. (DDP still
    broadcasts parameters and buffers once at construction: identical by then anyway.)"""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    global_batch_norm(model, True)
    ids = [d.local_rank] if d.device.startswith("cuda") else None
    # newer torch names the switch forward_sync_buffers and warns on the old broadcast_buffers
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters else "broadcast_buffers"
    return DDP(model, device_ids=ids, **{no_sync: False})


def unwrap(model: nn.Module, d: Dist) -> None:
    """Undo ``wrap``'s batch-norm switch on the underlying model (the DDP wrapper is simply dropped)."""
    if d.active:
        global_batch_norm(model, False)
