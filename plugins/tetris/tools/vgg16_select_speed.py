"""Time a registry pipeline's select on every layer of a random-init torchvision VGG16, nothing else.

The same selection `prunekit bench PIPELINE --model vgg16` times as `select_s` (attach + prune), without the
compile and latency runs, so its peak RSS is the selection's own (plus the model and the host's scores).

    python plugins/tetris/tools/vgg16_select_speed.py tetris-1x16-cpu --threads 2 --sparsity 0.75
    python plugins/tetris/tools/vgg16_select_speed.py tetris-vgg16-published --threads 2
    python plugins/tetris/tools/vgg16_select_speed.py tetris-vgg16-published --set max_axis_mib=1024
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import attrs
import torch
import torchvision

from prunekit.pipeline import Pipeline
from prunekit.registry import load_registry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline")
    ap.add_argument("--registry", default="registry.toml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--set", nargs="*", default=[], help="param overrides KEY=JSON, e.g. solver='\"exact\"'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reg = load_registry(args.registry)
    name, spec = reg.pipeline(args.pipeline)
    params = dict(spec.params)
    for item in args.set:
        key, value = item.split("=", 1)
        params[key] = json.loads(value)
    pipe = Pipeline(name, attrs.evolve(spec, params=params), reg)
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    pipe.host.sparsity = args.sparsity
    pipe.attach(model)
    t0 = time.perf_counter()
    sels = pipe.prune(args.sparsity)
    select_s = time.perf_counter() - t0
    for layer, sel in sels.items():
        m = sel.meta
        print(f"{layer:14s} {str(list(sel.mask.shape)):22s} sparsity {m['achieved_sparsity']:.3f} retained |w| "
              f"{m['baseline_retained_l1']:.4f} -> {m['retained_l1']:.4f} rounds {m['iterations']} moved {m['swaps']} "
              f"skipped {m['skipped_axes'] or '-'}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"select_s {select_s:.2f} achieved_sparsity {pipe.sparsity():.4f} peak_rss_gib {peak:.2f}")


if __name__ == "__main__":
    main()
