"""Where the forward pass of a `train.py --small` step spends its time, module by module.

    python bench/probe_step_parts.py                 # 6 steps, the first 2 untimed
    python bench/probe_step_parts.py --steps 10

bench_step.py times whole steps (forward, backward, update) of recipe variants side by side; this probe opens the
forward of the preset's step. Forward hooks time the ViT, the LLM's decoder layers, the UNet, the UNet's MMFS
residuals (all blocks together) and, inside them, the value path (value_norm + value_proj), which each block runs on
every draw of every image: with two noise draws per image the same previous-frame pyramid is normalised and projected
twice. The rows print seconds per step (mean over the timed steps) and the share of the forward; backward is timed
only as a whole.
Do not run it beside a training run: two 2-thread processes on 2 cores slow each other several-fold.
"""
import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model as M  # noqa: E402
from bench.recipe import small_batches, small_config, small_tokenizer, train_preset  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--steps", type=int, default=4, help="timed steps")
ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
args = ap.parse_args()

SMALL = train_preset("small")
with tempfile.TemporaryDirectory() as tmp:
    tok = small_tokenizer(tmp)
cfg = small_config(tok)
torch.manual_seed(0)
net = M.MMInterleaved(cfg).train()
batches = small_batches(tok, cfg)

spent, value_shape = defaultdict(float), []  # seconds of this step per part; the UNet MMFS value tensor's shape


def timed(name, module):
    """Add the module's forward time to spent[name] (a part called several times a step adds up)."""
    def pre(m, inputs):
        spent[name] -= time.perf_counter()

    def post(m, inputs, output):
        spent[name] += time.perf_counter()
    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


timed("ViT + adapter", net.vit)
for layer in net.llm.model.layers:  # LLaMA.hidden() is a method, not forward(): time its decoder layers
    timed("LLM layers", layer)
timed("UNet", net.unet)
if cfg.unet.mmfs:
    timed("  UNet MMFS residuals", net.unet.mmfs)
    for block in net.unet.mmfs.blocks:
        if not isinstance(block, nn.Identity):
            timed("    value_norm + value_proj", block.value_norm)
            timed("    value_norm + value_proj", block.attn.value_proj)
    block = next(b for b in net.unet.mmfs.blocks if not isinstance(b, nn.Identity))
    block.register_forward_hook(lambda m, inputs, out: value_shape.append(tuple(inputs[1].shape)))

totals = defaultdict(float)
for step in range(args.warmup + args.steps):
    spent.clear()
    batch = batches.batch(step, 0, 1)
    gens = [torch.Generator().manual_seed(step * SMALL["batch_size"] + j) for j in range(SMALL["batch_size"])]
    t0 = time.perf_counter()
    loss = net(batch["tokens"], batch["images"], batch["images_per_row"], generator=gens)["loss"]
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    net.zero_grad(set_to_none=True)
    if step >= args.warmup:
        for k, v in {"forward": t1 - t0, "backward": t2 - t1, **spent}.items():
            totals[k] += v / args.steps

print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; --small, {cfg.noise_draws} noise draws; "
      f"{args.steps} timed steps after {args.warmup}; UNet MMFS values of the last step {value_shape[-1]}")
print(f"{'part':<30} {'s / step':>9} {'of forward':>11}")
for k, v in totals.items():
    share = f"{100 * v / totals['forward']:>10.1f}%" if k != "backward" else ""
    print(f"{k:<30} {v:>9.3f} {share:>11}")
