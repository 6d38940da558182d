"""train.py --small's two-process CPU step with its CPU savings against without them, window by window.

    python bench/bench_ddp_step.py                          # all three savings: 8 windows of 8 steps
    python bench/bench_ddp_step.py --savings conv-bf16      # one of them alone
    python bench/bench_ddp_step.py --savings order --window 16 --windows 12   # rows paired over 16 steps

On a 2-core CPU `train.py --small` runs two one-thread DDP processes, a row each. Since session 37 the recipe saves
time in three ways that a single-process bench cannot show together:
  order      each 8 steps' 16 rows trained in pairs of alike work (`--balance-window 8`), so the rank with the
             lighter row waits less at the gradient all-reduce (`--savings order` times it alone, as session
             36's bench_balance.py did with one AdamW group: 0.973);
  conv-bf16  every convolution wider than 1x1 in bfloat16 (`--conv-bf16`; bench_step.py --alternate bf16-conv);
  zero       the AdamW update sharded between the ranks (ZeroRedundancyOptimizer; bench_zero.py).
Both arms train the same rows per window, so each window runs twice on one model in the same two processes, once
as the session-36 recipe (plain order, float32 convolutions, every rank updating every parameter) and once with
`--savings` (which goes first alternates): the host's drift falls on both, and the sum of the work is the same
(`--window` is both the pairing's window and the timed one). The model is the
small preset (fresh init, two AdamW groups as bench_zero.py, clipping, no EMA); its weights change as it trains,
which does not change what a step costs. Do not run it beside anything else: two processes use both cores.
"""
import argparse
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model as M  # noqa: E402
from bench.recipe import small_batches, small_config, spawn_two_ranks, train_preset, two_adamw_groups  # noqa: E402

SMALL = train_preset("small")
SAVINGS = ("order", "conv-bf16", "zero")


def worker(rank, args, tok):
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")  # as train.py
    cfg = small_config(tok)
    torch.manual_seed(0)
    net = M.MMInterleaved(cfg)
    net.train()
    bf16 = [False]  # the arm's number format, read by every convolution at call time
    M.convolutions_in_bfloat16(net, when=lambda: bf16[0])
    model = nn.parallel.DistributedDataParallel(net)
    params = [p for p in net.parameters() if p.requires_grad]
    adamw = dict(lr=SMALL["lr"], betas=(0.9, 0.99))
    opts = {False: torch.optim.AdamW(two_adamw_groups(params), **adamw),
            True: ZeroRedundancyOptimizer(two_adamw_groups(params), optimizer_class=torch.optim.AdamW,
                                          parameters_as_bucket_view=True, **adamw)}
    window = args.window
    orders = {w: small_batches(tok, cfg, 2, balance_window=w) for w in (0, window)}

    def step(s, saving):
        bf16[0] = saving and "conv-bf16" in args.savings
        b = orders[window if saving and "order" in args.savings else 0].batch(s, rank, 2)
        gens = [torch.Generator().manual_seed(s * 2 + rank)]
        res = model(b["tokens"], b["images"], b["images_per_row"], generator=gens)
        (res["loss"] * 2).backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt = opts[saving and "zero" in args.savings]
        opt.step()
        opt.zero_grad(set_to_none=True)

    for s in range(args.warmup):  # allocator and oneDNN warm-up, both arms
        step(s, s % 2 == 1)
    ratios = []
    first = -(-args.warmup // window)  # the first whole window after the warm-up
    for w in range(first, first + args.windows):
        took = {}
        for saving in (False, True) if w % 2 else (True, False):
            dist.barrier()
            t = time.perf_counter()
            for s in range(w * window, (w + 1) * window):
                step(s, saving)
            dist.barrier()
            took[saving] = (time.perf_counter() - t) / window
        ratios.append(took[True] / took[False])
        if rank == 0:
            print(f"window {w}: without {took[False]:.3f} s/step, with {took[True]:.3f} s/step, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    if rank == 0:
        r = torch.tensor(ratios, dtype=torch.float64)
        print(f"with {' + '.join(args.savings)} / without, over {len(r)} windows of {window} steps: {r.mean():.3f} ± "
              f"{r.std() / len(r) ** 0.5:.3f} (mean ± standard error)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--savings", nargs="+", choices=SAVINGS, default=list(SAVINGS), help="what the second arm has")
    ap.add_argument("--window", type=int, default=SMALL.get("balance_window") or 8,
                    help="steps a window pairs its rows over (default the recipe's)")
    ap.add_argument("--windows", type=int, default=8, help="windows timed, each in both arms")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    ap.add_argument("--port", type=int, default=29545, help="the gloo rendezvous port on 127.0.0.1")
    args = ap.parse_args()
    if args.window < 1 or args.windows < 2 or args.warmup < 0:
        sys.exit("bench_ddp_step.py: --window must be >= 1, --windows >= 2 and --warmup >= 0")
    spawn_two_ranks(worker, args, args.port)


if __name__ == "__main__":
    main()
