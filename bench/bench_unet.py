"""UNet and VAE: ours (unet.py, vae.py) vs diffusers, same random weights, CPU float32, 2 threads (--threads).

    python bench/bench_unet.py [--repeats 3] [--only paper,vae,small] [--threads 2]

Rows: the `paper` (SD 2.1-base) UNet forward on a 32×32 latent at batch 2 (diffusers, ours, ours + MMFS residuals
reading a one-image 64/32/16/8 × 1024 pyramid); the SD VAE decode to 256×256; one training step (forward, backward,
AdamW) of the `small` preset at batch 32 on 32×32 RGB (diffusers with the same config, ours, ours + MMFS).
Calls alternate between the implementations; the table gives median wall times, the speed-up of ours over
diffusers, the largest output difference (of the loss, for training steps), and the peak extra memory of a call
(resident-set high-water mark above the resident size just before it; measured in a second process, Linux).
The paper UNets share one set of weight tensors (3.5 GB).
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from hf_oracle import hide_hub_kernels  # noqa: E402

hide_hub_kernels()  # our kernels/ shadows Hugging Face's (tests/hf_oracle.py)
import diffusers  # noqa: E402

import mmfs  # noqa: E402
import weights  # noqa: E402
from unet import PRESETS as UNET_PRESETS, MMFSNet, UNet  # noqa: E402
from vae import PRESETS as VAE_PRESETS, VAE  # noqa: E402

ROWS = {}  # (case, implementation) -> measurements
UNET_FIELDS = ("in_channels", "out_channels", "sample_size", "block_out_channels", "layers_per_block",
               "down_block_types", "up_block_types", "attention_head_dim", "cross_attention_dim",
               "use_linear_projection", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift")
VAE_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
              "down_block_types", "up_block_types", "norm_num_groups")


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def timed(fn):
    """(seconds, peak extra bytes, output) of one call."""
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current resident size
        f.write("5")
    before = _status_kb("VmRSS")
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    return seconds, (_status_kb("VmHWM") - before) * 1024, out


def compare(name, fns, repeats):
    """Alternate the implementations `repeats` times after one warm-up each; record one row per implementation."""
    for fn in fns.values():
        fn()
    times, peaks, outs = {k: [] for k in fns}, {k: 0 for k in fns}, {}
    for _ in range(repeats):
        for k, fn in fns.items():
            seconds, peak, outs[k] = timed(fn)
            times[k].append(seconds)
            peaks[k] = max(peaks[k], peak)
    base = statistics.median(times["diffusers"])
    for k in fns:
        med = statistics.median(times[k])
        diff = (outs[k] - outs["diffusers"]).abs().max().item()
        ROWS[(name, k)] = dict(seconds=med, speedup=base / med, diff=diff, peak=peaks[k])


def copy_of(ref, c, share=False):
    """Our UNet with the diffusers model's weights (shared or cloned), plus an MMFSNet with live zero convs."""
    with torch.device("meta"):
        ours = UNet(dataclasses.replace(c, mmfs=False))
    state = {k: v if share else v.clone() for k, v in ref.state_dict().items()}
    weights.load_into(ours, state, "diffusers UNet")
    if c.mmfs:  # non-zero convs, so the residuals cost (and backpropagate) what they do in training
        ours.mmfs = MMFSNet(c)
        with torch.no_grad():
            for block in ours.mmfs.blocks:
                block.zero_conv.weight.normal_(0, 1e-3)
    return ours


def bench_paper_unet(repeats):
    c = UNET_PRESETS["paper"]
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**{f: getattr(c, f) for f in UNET_FIELDS}).eval()
    ours = copy_of(ref, c, share=True).eval()  # both models read the same 3.5 GB of weight tensors
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 1024, generator=g)
    features = [torch.randn(2, 1, 1024, s, s, generator=g) for s in c.mmfs_levels]
    t = torch.tensor([10, 500])
    with torch.inference_mode():
        compare("UNet paper fwd 2×4×32×32", {
            "diffusers": lambda: ref(x, t, context).sample,
            "ours": lambda: ours(x, t, context),
            "ours + MMFS": lambda: ours(x, t, context, features),
        }, repeats)


def bench_vae(repeats):
    c = VAE_PRESETS["paper"]
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**{f: getattr(c, f) for f in VAE_FIELDS}).eval()
    with torch.device("meta"):
        ours = VAE(c).eval()
    weights.load_into(ours, dict(ref.state_dict()), "diffusers VAE")
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        compare("VAE paper decode 1×4×32×32 -> 256²", {
            "diffusers": lambda: ref.decode(z).sample,
            "ours": lambda: ours.decode(z),
        }, repeats)


def bench_small_step(repeats, batch=32):
    c = UNET_PRESETS["small"]
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**{f: getattr(c, f) for f in UNET_FIELDS})
    ours, ours_mmfs = copy_of(ref, dataclasses.replace(c, mmfs=False)), copy_of(ref, c)
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(batch, 3, 32, 32, generator=g), torch.randn(batch, 3, 32, 32, generator=g)
    context = torch.randn(batch, 16, c.cross_attention_dim, generator=g)
    features = [torch.randn(batch, 1, c.mmfs_value_dim, s, s, generator=g) for s in c.mmfs_levels]
    t = torch.randint(0, 1000, (batch,), generator=g)
    opts = {name: torch.optim.AdamW(m.parameters(), 1e-4)
            for name, m in (("diffusers", ref), ("ours", ours), ("ours + MMFS", ours_mmfs))}

    def step(name, forward):
        def run():
            loss = (forward() - noise).square().mean()
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            return loss.detach()
        return run

    compare(f"small train step B={batch} 3×32×32", {
        "diffusers": step("diffusers", lambda: ref(x, t, context).sample),
        "ours": step("ours", lambda: ours(x, t, context)),
        "ours + MMFS": step("ours + MMFS", lambda: ours_mmfs(x, t, context, features)),
    }, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="paper,vae,small", help="comma-separated subset of paper,vae,small")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2: the project's machine)")
    parser.add_argument("--memory", action="store_true", help="(internal) one call each, print peaks as JSON")
    args = parser.parse_args()
    # numba's first parallel call (the fused MMFS kernel) resets the OpenMP thread count that torch shares:
    # make that call first, then set torch's threads
    mmfs.msda(torch.zeros(1, 4, 1, 1), torch.tensor([[2, 2]]), torch.tensor([0]), torch.rand(1, 1, 1, 1, 1, 2),
              torch.rand(1, 1, 1, 1, 1))
    torch.set_num_threads(args.threads)
    runs = {"paper": bench_paper_unet, "vae": bench_vae, "small": bench_small_step}
    if args.memory:
        for name in args.only.split(","):
            runs[name](1)
        print(json.dumps([[case, impl, row["peak"]] for (case, impl), row in ROWS.items()]))
        return
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}, {args.repeats} repeats", flush=True)
    for name in args.only.split(","):
        runs[name](args.repeats)
    # Peak memory from a second process in which glibc serves every allocation of 64 KiB or more with its own
    # mmap, so the resident set follows the live tensors (in this process freed memory stays resident and the
    # timings are not disturbed by that setting).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, __file__, "--memory", "--only", args.only, "--threads", str(args.threads)]
    child = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    peaks = {(case, impl): peak for case, impl, peak in json.loads(child.stdout.strip().splitlines()[-1])}
    print("\n| case | impl | median s | speed-up vs diffusers | max abs diff | peak extra memory |")
    print("|---|---|---|---|---|---|")
    for (case, impl), r in ROWS.items():
        print(f"| {case} | {impl} | {r['seconds']:.3f} | {r['speedup']:.2f}x | {r['diff']:.1e} | "
              f"{peaks[(case, impl)] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
