"""Benchmark: our CLIP ViT forward vs transformers' CLIPVisionModel with the same weights (CPU, float32, no grad).

    python bench/bench_vision.py                  # paper size (ViT-L/14 at 224), batch 8, 2 threads
    python bench/bench_vision.py --preset tiny --batch 2 --repeats 5

Both models get identical random weights (no download): the HF model is built from a CLIPVisionConfig with our
preset's sizes and our state dict is copied into it. HF runs with the attention implementation a user gets by default
(printed; "sdpa" in transformers 5). Timings alternate between the two models, one warm-up each, then the median of
`--repeats` runs, in wall-clock time and in process CPU time (all threads; on a machine shared with other jobs
the CPU time is the steadier of the two). Outputs are also compared, so a fast but wrong forward cannot pass unnoticed.

Peak memory is measured apart, one fresh process per model (so neither inherits the other's allocator state), with
glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the RSS at once: it is the largest rise of the RSS
above its level before the forward (the weights), sampled every millisecond by a background thread.
"""
import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from hf_oracle import hide_hub_kernels  # noqa: E402

hide_hub_kernels()  # our kernels/ shadows Hugging Face's (tests/hf_oracle.py)
import transformers  # noqa: E402

from vit import PRESETS, ViT  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Largest RSS rise (bytes) above the level at entry, sampled by a thread while the block runs."""

    def __enter__(self):
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.rise = self.peak - self.base


def build(preset):
    """Our ViT with random weights and a transformers CLIPVisionModel holding the same weights."""
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    ours = ViT(cfg).eval()
    hf_cfg = transformers.CLIPVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                           num_hidden_layers=cfg.num_hidden_layers,
                                           num_attention_heads=cfg.num_attention_heads, image_size=cfg.image_size,
                                           patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
                                           hidden_act=cfg.hidden_act)
    hf = transformers.CLIPVisionModel(hf_cfg).eval()
    hf_keys = hf.state_dict().keys()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf_keys) else ""  # transformers < 5
    missing, unexpected = hf.load_state_dict({prefix + k: v for k, v in ours.state_dict().items()}, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return cfg, ours, hf


def peak_memory(args, which):
    """Run one forward of one model in a fresh process; returns the peak RSS rise in bytes."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--threads",
           str(args.threads), "--memory-of", which]
    return int(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.split()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-of", choices=["ours", "hf"], help=argparse.SUPPRESS)  # the child of peak_memory
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, ours, hf = build(args.preset)
    pixels = torch.randn(args.batch, cfg.num_channels, cfg.image_size, cfg.image_size)
    runs = {"ours": lambda: ours(pixels), "hf": lambda: hf(pixels).last_hidden_state}

    if args.memory_of:
        del runs["hf" if args.memory_of == "ours" else "ours"]
        with torch.no_grad(), PeakRSS() as mem:
            runs[args.memory_of]()
        print(mem.rise)
        return

    times, cpu, outs = {k: [] for k in runs}, {k: [] for k in runs}, {}
    with torch.no_grad():
        for i in range(args.repeats + 1):  # round 0 is the warm-up
            for name, fn in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                outs[name] = fn()
                if i:
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)  # all threads: less sensitive to other processes
    labels = {"ours": "ours (vit.ViT, SDPA)", "hf": f"transformers CLIPVisionModel ({hf.config._attn_implementation})"}
    del ours, hf, runs  # free the weights before the memory runs
    peaks = {name: peak_memory(args, name) for name in ("ours", "hf")}
    a, b = outs.values()
    diff = (a - b).abs().max().item()

    print(f"ViT forward, preset {args.preset!r} ({cfg.num_hidden_layers} layers, width {cfg.hidden_size}, "
          f"{cfg.image_size} px / patch {cfg.patch_size}), batch {args.batch}, float32, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':<40} {'median s':>9} {'min s':>8} {'speed-up':>9} {'CPU s':>8} {'CPU ratio':>10} "
          f"{'peak MiB':>9}")
    base, base_cpu = statistics.median(times["hf"]), statistics.median(cpu["hf"])
    for name in ("ours", "hf"):
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        print(f"{labels[name]:<40} {med:>9.3f} {min(times[name]):>8.3f} {base / med:>8.2f}x {med_cpu:>8.2f} "
              f"{base_cpu / med_cpu:>9.2f}x {peaks[name] / 2**20:>9.0f}")
    print(f"max |ours - transformers| on last_hidden_state: {diff:.2e}; peak MiB = the largest RSS rise above the "
          "loaded weights during one forward, each model in a fresh process")


if __name__ == "__main__":
    main()
