"""MSDA core of MMFS: mmfs.msda_reference (grid_sample) vs the fused numba kernels (kernels/msda.py).

    python bench/bench_mmfs.py [--repeats 5] [--device cuda]

Prints median wall times side by side, speed-ups, the fused kernel's time when it must read the samples of masked
images too (their weights raised from 0 to 1e-30, so it cannot skip them: what skipping saves), the peak extra memory
of each (resident-set high-water mark above the level just before the call, each measured in a fresh process), the
part of it beyond the results every implementation must hold ("workspace": output, upstream gradient, the three
gradients), and the fused kernel's compile time in a process with an empty numba cache and in a second process that
finds the cache. float32, torch's and numba's default threads. With --device cuda: the CUDA kernel against
grid_sample on the GPU, times between synchronisations, and the peak of torch's allocator during one call above what
was allocated before it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kernels.msda import msda_fused  # noqa: E402
from mmfs import msda_reference  # noqa: E402

MASKED_LLM = 0.9  # the fraction of zero-weight samples in the LLM's MSDA calls of train.py --small (see the README)
SHAPES = {  # B batch, Q queries, M heads, D channels per head, P points; maps: one (H, W) per image-level;
    # masked: that fraction of (query, image) pairs gets weight exactly 0, as MMFS gives a query the images it must not
    # see; images: the number of image slots, each of len(maps) / images levels
    "tiny": dict(B=1, Q=16, M=2, D=8, P=4, maps=[(4, 4), (2, 2)]),
    "llm": dict(B=1, Q=512, M=16, D=64, P=8, maps=[(32, 32), (16, 16), (8, 8)] * 4),  # 4 images × 3 levels
    # a --small UNet MMFS residual on its 16x16 map: 32 images (16 frames x 2 noise draws), each reading its previous
    # frame's 16/8/4/2 pyramid (MMFS leaves frames with no previous one out of the call)
    "small-unet": dict(B=32, Q=256, M=4, D=16, P=4, maps=[(16, 16), (8, 8), (4, 4), (2, 2)]),
    # a --small LLM MMFS layer: two rows of 512 tokens, 15 image slots of 16/8/4 levels each; a query sees only the
    # images before it in its own story, so most (query, slot) pairs are masked
    "small-llm": dict(B=2, Q=512, M=4, D=32, P=4, maps=[(16, 16), (8, 8), (4, 4)] * 15,
                      masked=MASKED_LLM, images=15),
}


def fused_reading_all(value, maps, starts, loc, attn):
    """The fused kernel made to read every sample: a weight of 0 (which it skips) becomes 1e-30 (which it reads)."""
    return msda_fused(value, maps, starts, loc, attn.clamp_min(1e-30))


IMPLS = {"reference": msda_reference, "fused": msda_fused, "fused-read-all": fused_reading_all}
MEASURED = ("reference", "fused")  # the two whose peak memory is measured
MODES = ("fwd", "fwd+bwd")
# memory runs: blocks over 64 KiB get their own mmap, so freed memory leaves the resident set and every new
# allocation shows up in it (glibc would otherwise recycle freed heap silently)
MALLOC_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


def make_inputs(shape, seed=0):
    """Inputs as MMFS makes them: points scattered around image centres, one softmax over levels × points."""
    s = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    maps = torch.tensor(s["maps"])                                                      # (Lv, 2)
    sizes = maps[:, 0] * maps[:, 1]                                                     # (Lv,)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])                      # (Lv,)
    B, Q, M, D, P, Lv = s["B"], s["Q"], s["M"], s["D"], s["P"], len(maps)
    value = torch.randn(B, int(sizes.sum()), M, D, generator=g)                         # (B, S, M, D)
    loc = 0.5 + 0.25 * torch.randn(B, Q, M, Lv, P, 2, generator=g)                      # (B, Q, M, Lv, P, 2)
    attn = torch.randn(B, Q, M, Lv * P, generator=g).softmax(-1).view(B, Q, M, Lv, P)   # (B, Q, M, Lv, P)
    if "masked" in s:  # whole images masked, as MMFS masks them: every level, head and point weighs exactly 0
        n = s["images"]
        hidden = torch.rand(B, Q, 1, n, 1, 1, generator=g) < s["masked"]                # (B, Q, 1, n, 1, 1)
        attn = attn.view(B, Q, M, n, Lv // n, P).masked_fill(hidden, 0.0).view(B, Q, M, Lv, P)
    return value, maps, starts, loc, attn


def step(impl, args, mode):
    """One forward (no autograd graph) or one forward + backward of an all-ones upstream gradient; -> result bytes."""
    fn = IMPLS[impl]
    if mode == "fwd":
        with torch.no_grad():
            out = fn(*args)
        return out.numel() * out.element_size()
    value, maps, starts, loc, attn = args
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], maps, starts, leaves[1], leaves[2])
    out.backward(torch.ones_like(out))
    results = [out, out, *(t.grad for t in leaves)]  # out, its upstream gradient, the three gradients
    return sum(t.numel() * t.element_size() for t in results)


def _sync(args):
    if args[0].is_cuda:
        torch.cuda.synchronize(args[0].device)


def median_seconds(impl, args, mode, repeats):
    step(impl, args, mode)  # warm-up (and, for the fused kernel, compile it or load it from the cache)
    times = []
    for _ in range(repeats):
        _sync(args)
        t = time.perf_counter()
        step(impl, args, mode)
        _sync(args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cuda_peak_extra_bytes(impl, args, mode):
    """torch's allocator high-water mark during one call above its level just before, and the result bytes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result_bytes = step(impl, args, mode)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, result_bytes


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_extra_bytes(shape, impl, mode):
    """In this (fresh) process: resident high-water mark of one call above the resident size just before it,
    and the bytes of its results (output, upstream gradient, gradients), which any implementation must hold."""
    step(impl, make_inputs("tiny"), mode)  # load kernels and torch's lazy state first
    args = make_inputs(shape)
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current resident size
        f.write("5")
    before = _status_kb("VmRSS")
    result_bytes = step(impl, args, mode)
    return (_status_kb("VmHWM") - before) * 1024, result_bytes


def measure_in_subprocess(*argv, env=None):
    """Run this script with `argv` in a fresh process; -> the JSON it prints last."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def first_call_seconds():
    """Wall time of the first fused forward + backward of this process (compile or cache load included)."""
    args = make_inputs("tiny")
    t = time.perf_counter()
    step("fused", args, "fwd+bwd")
    first = time.perf_counter() - t
    return first - median_seconds("fused", args, "fwd+bwd", 5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run both")
    parser.add_argument("--memory", nargs=3, metavar=("SHAPE", "IMPL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--first-call", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.memory:
        print(json.dumps(peak_extra_bytes(*a.memory)))
        return
    if a.first_call:
        print(json.dumps(first_call_seconds()))
        return

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("bench_mmfs.py: --device cuda, but torch sees no CUDA device")
    if cuda:
        print(f"MSDA core, float32, {torch.cuda.get_device_name()}: median of {a.repeats} runs")
    else:
        with tempfile.TemporaryDirectory() as cache:  # compile cost: empty numba cache, then a second process
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            compile_s, cached_s = (measure_in_subprocess("--first-call", env=env) for _ in range(2))
        print(f"MSDA core, float32, CPU: {os.cpu_count()} cores, torch {torch.get_num_threads()} threads, "
              f"load average {os.getloadavg()[0]:.1f} at start; median of {a.repeats} runs")
    cols = ["shape", "pass", "reference ms", "fused ms", "speed-up", "fused, 0s read ms", "skip gain", "ref peak MB",
            "fused peak MB", "peak ratio", "ref workspace MB", "fused workspace MB"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in cols) + "|")
    for shape in SHAPES:
        args = [t.cuda() for t in make_inputs(shape)] if cuda else make_inputs(shape)
        for mode in MODES:
            impls = IMPLS if "masked" in SHAPES[shape] else MEASURED  # nothing to skip without masked images
            t = {impl: median_seconds(impl, args, mode, a.repeats) for impl in impls}
            if cuda:  # one process: the allocator's statistics are exact per call
                mem = {impl: cuda_peak_extra_bytes(impl, args, mode) for impl in MEASURED}
            else:
                mem = {impl: measure_in_subprocess("--memory", shape, impl, mode, env=MALLOC_ENV) for impl in MEASURED}
            peak = {impl: mem[impl][0] / 2**20 for impl in MEASURED}
            work = {impl: max(0, mem[impl][0] - mem[impl][1]) / 2**20 for impl in MEASURED}  # peak beyond the results
            ratio = f"1/{peak['reference'] / peak['fused']:.1f}" if peak["fused"] > 0 else "n/a"
            read_all = t.get("fused-read-all")
            row = [shape, mode, f"{t['reference'] * 1e3:.3f}", f"{t['fused'] * 1e3:.3f}",
                   f"{t['reference'] / t['fused']:.1f}x", f"{read_all * 1e3:.3f}" if read_all else "-",
                   f"{read_all / t['fused']:.2f}x" if read_all else "-", f"{peak['reference']:.1f}",
                   f"{peak['fused']:.1f}", ratio, f"{work['reference']:.1f}", f"{work['fused']:.1f}"]
            print("| " + " | ".join(f"{v:>{len(c)}}" for v, c in zip(row, cols)) + " |")
    if not cuda:
        print(f"fused first call (fwd+bwd, tiny) beyond a warm call: {compile_s:.1f} s with an empty numba cache, "
              f"{cached_s:.2f} s in a second process (cache hit); load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
