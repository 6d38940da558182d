"""Rows paired by work (`train.py --balance-window W`) against the plain order, in two one-thread DDP processes.

    python bench/bench_balance.py                  # 8 windows of 8 steps: the ratio balanced / plain
    python bench/bench_balance.py --windows 12 --window 16

On a 2-core CPU `train.py --small` runs two one-thread DDP processes, a row each, and the rank with the lighter row
waits for the other at the gradient all-reduce. `StoryBatches(balance_window=W)` trains the same W·2 rows of each
W steps in pairs of alike work. Both orders train the same rows per window, so the bench runs each window twice
on one model in the same two processes, once in each order (which goes first alternates), and compares the
window's wall time: the host's drift falls on both, and the sum of the work is the same. The model is the small
preset as train.py builds it (fresh init, AdamW with one group, clipping, no EMA); its weights change as it trains,
which does not change what a step costs. Do not run it beside anything else: two processes use both cores.
"""
import argparse
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import llm  # noqa: E402
import model as M  # noqa: E402
from bench.recipe import small_batches, small_config, small_tokenizer, train_preset  # noqa: E402

SMALL = train_preset("small")


def worker(rank, args, tok_path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")  # as train.py
    tok = llm.Tokenizer(tok_path)
    cfg = small_config(tok)
    torch.manual_seed(0)
    net = M.MMInterleaved(cfg)
    net.train()
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.AdamW(net.parameters(), lr=SMALL["lr"], betas=(0.9, 0.99), weight_decay=0.05)
    orders = {w: small_batches(tok, cfg, 2, balance_window=w, unet_passes=cfg.noise_draws) for w in (0, args.window)}

    def step(batches, s):
        b = batches.batch(s, rank, 2)
        gens = [torch.Generator().manual_seed(s * 2 + rank)]
        res = model(b["tokens"], b["images"], b["images_per_row"], generator=gens)
        (res["loss"] * 2).backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for s in range(args.warmup):  # allocator and oneDNN warm-up, in the plain order
        step(orders[0], s)
    ratios = []
    first = -(-args.warmup // args.window)  # the first whole window after the warm-up
    for w in range(first, first + args.windows):
        took = {}
        for name in (0, args.window) if w % 2 else (args.window, 0):
            dist.barrier()
            t = time.perf_counter()
            for s in range(w * args.window, (w + 1) * args.window):
                step(orders[name], s)
            dist.barrier()
            took[name] = (time.perf_counter() - t) / args.window
        ratios.append(took[args.window] / took[0])
        if rank == 0:
            print(f"window {w}: plain {took[0]:.3f} s/step, balanced {took[args.window]:.3f} s/step, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    if rank == 0:
        r = torch.tensor(ratios, dtype=torch.float64)
        print(f"balanced (--balance-window {args.window}) / plain over {len(r)} windows: {r.mean():.3f} ± "
              f"{r.std() / len(r) ** 0.5:.3f} (mean ± standard error)")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=int, default=8, help="steps a window pairs its rows over")
    ap.add_argument("--windows", type=int, default=8, help="windows timed, each in both orders")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    ap.add_argument("--port", type=int, default=29541, help="the gloo rendezvous port on 127.0.0.1")
    args = ap.parse_args()
    if args.window < 1 or args.windows < 2:
        sys.exit("bench_balance.py: --window must be >= 1 and --windows >= 2")
    with tempfile.TemporaryDirectory() as tmp:  # the --small tokenizer, trained once for both processes
        tok = small_tokenizer(tmp)
        mp.spawn(worker, args=(args, str(tok.path), args.port), nprocs=2)


if __name__ == "__main__":
    main()
