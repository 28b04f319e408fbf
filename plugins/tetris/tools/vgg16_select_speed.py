"""Time the tetris select on every layer of a random-init torchvision VGG16 (no host CLI needed).

    python plugins/tetris/tools/vgg16_select_speed.py --threads 2 --block 16 1 0 0 --sparsity 0.75
    python plugins/tetris/tools/vgg16_select_speed.py --threads 2 --config published --arch vgg16
Prints one line per layer (seconds, retained |w| before/after reordering) and the total.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torchvision
from prunekit_tetris.components import TetrisL1, TetrisParams, TetrisSelect
from torch import nn

from prunekit.pipeline import layer_info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, nargs="+", default=[16, 1, 0, 0])
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--config", default="")
    ap.add_argument("--arch", default="")
    ap.add_argument("--solver", default="greedy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    params = TetrisParams(block=args.block, config=args.config, arch=args.arch, solver=args.solver)
    score, select = TetrisL1(), TetrisSelect()
    total = 0.0
    for i, (name, mod) in enumerate(layers):
        info = layer_info(name, mod, i, len(layers))
        w = mod.weight.detach()
        t0 = time.perf_counter()
        s = score.prunekit_score(weight=w)
        sel = select.prunekit_select_mask(layer=info, weight=w, scores=s, sparsity=args.sparsity, target=args.sparsity, params=params)
        dt = time.perf_counter() - t0
        total += dt
        m = sel.meta
        print(f"{name:14s} {str(list(w.shape)):22s} {dt:7.2f}s sparsity {m['achieved_sparsity']:.3f} retained {m['baseline_retained_l1']:.4f} -> "
              f"{m['retained_l1']:.4f} iters {m['iterations']} swaps {m['swaps']} skipped {m['skipped_axes']}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"select_s {total:.2f} peak_rss_gib {peak:.2f}")


if __name__ == "__main__":
    main()
