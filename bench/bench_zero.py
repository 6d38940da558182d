"""The AdamW update sharded between the ranks (ZeRO stage 1, as train.py runs DDP) against every rank updating all.

    python bench/bench_zero.py                 # 20 updates each, alternating, in two one-thread processes
    python bench/bench_zero.py --updates 40

On a 2-core CPU `train.py --small` runs two one-thread DDP processes, and with a plain optimiser each runs the whole
AdamW update on all 8.9M parameters. `ZeroRedundancyOptimizer` gives each rank about half of them to update and
then broadcasts them from flat buckets. Both optimisers here hold the same parameters of the small preset (fresh
init, random gradients: the update's arithmetic does not depend on their values) and step in turns, which one goes
first alternating, each step timed between two barriers. Prints both medians, the ratio, and the bytes of optimiser
state on each rank. Do not run it beside anything else: two processes use both cores.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model as M  # noqa: E402
from bench.recipe import small_config, spawn_two_ranks, two_adamw_groups  # noqa: E402


def state_bytes(opt):
    """Bytes of tensors in this rank's optimiser state (the AdamW moments and steps it keeps)."""
    inner = opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt
    return sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
               if torch.is_tensor(t))


def worker(rank, args, tok):
    torch.manual_seed(0)
    net = M.MMInterleaved(small_config(tok))
    params = [p for p in net.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)  # the same gradients on both ranks, as after DDP's all-reduce
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opts = {"plain": torch.optim.AdamW(two_adamw_groups(params), lr=1e-3, betas=(0.9, 0.99)),
            "zero": ZeroRedundancyOptimizer(two_adamw_groups(params), optimizer_class=torch.optim.AdamW,
                                            parameters_as_bucket_view=True, lr=1e-3, betas=(0.9, 0.99))}
    took = {k: [] for k in opts}
    for i in range(args.warmup + args.updates):
        for name in ("plain", "zero") if i % 2 else ("zero", "plain"):
            dist.barrier()
            t = time.perf_counter()
            opts[name].step()
            dist.barrier()
            if i >= args.warmup:
                took[name].append(time.perf_counter() - t)
    sizes = [None, None]
    dist.all_gather_object(sizes, {k: state_bytes(o) for k, o in opts.items()})
    if rank == 0:
        ratios = torch.tensor(took["zero"], dtype=torch.float64) / torch.tensor(took["plain"], dtype=torch.float64)
        plain, zero = statistics.median(took["plain"]), statistics.median(took["zero"])
        print(f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters, {len(ratios)} updates each, alternating")
        se = ratios.std() / len(ratios) ** 0.5
        print(f"plain AdamW on every rank: {plain * 1e3:.1f} ms an update (median); sharded: {zero * 1e3:.1f} ms; "
              f"sharded / plain {ratios.mean():.3f} ± {se:.3f} (mean ± standard error)")
        for r, s in enumerate(sizes):
            print(f"rank {r} optimiser state: plain {s['plain'] / 2**20:.1f} MiB, sharded {s['zero'] / 2**20:.1f} MiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=20, help="timed updates of each optimiser")
    ap.add_argument("--warmup", type=int, default=4, help="untimed updates of each first")
    ap.add_argument("--port", type=int, default=29543, help="the gloo rendezvous port on 127.0.0.1")
    args = ap.parse_args()
    if args.updates < 2 or args.warmup < 0:
        sys.exit("bench_zero.py: --updates must be >= 2 and --warmup >= 0")
    spawn_two_ranks(worker, args, args.port)


if __name__ == "__main__":
    main()
