"""Benchmark llm.py against transformers on CPU: prefill and greedy decoding with a KV cache, same weights.

A 220M-parameter LLaMA (dim 1024, 12 layers, 16 heads, FFN 2816, vocab 32000; a TinyLlama-like shape that fits a
few minutes on 2 cores), float32, batch 1, a 512-token prompt, 128 new greedy tokens. Both sides run their own
`generate`: prefill = generating 1 token, decode = (generating 129 tokens - generating 1) / 128. Repetitions are
interleaved (ours, theirs, ours, ...) so machine load hits both alike; medians are reported. Decode speed is also
compared with the memory-bandwidth bound: every weight is read once per token (bytes / measured copy bandwidth;
the read-only bandwidth of a large sum is printed too, since decoding only reads the weights).

    python bench/bench_llm.py [--reps 3] [--threads 2]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llm  # noqa: E402


def rss_mb(field):
    """VmRSS / VmHWM (peak) of this process in MiB, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def timed(fn):
    """(seconds, extra peak RSS in MiB above the RSS at the start, result)."""
    reset_peak()
    base = rss_mb("VmRSS")
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, rss_mb("VmHWM") - base, out


def bandwidth(nbytes=1 << 29, reps=5):
    """GB/s of a large tensor copy (read + write counted) and of a read-only pass (a sum), best of reps."""
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    best = {"copy": float("inf"), "read": float("inf")}
    for _ in range(reps):
        for name, fn in (("copy", lambda: b.copy_(a)), ("read", lambda: a.sum())):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return 2 * nbytes / best["copy"] / 1e9, nbytes / best["read"] / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from hf_oracle import hide_hub_kernels

    hide_hub_kernels()  # our kernels/ shadows Hugging Face's (tests/hf_oracle.py)
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).float().eval()
    hf.generation_config.eos_token_id = None  # always generate exactly the requested number of tokens
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        load_s, _, ours = timed(lambda: llm.LLaMA.from_pretrained(d))
    ours.eval()
    n_params = sum(p.numel() for p in ours.parameters())
    weight_bytes = (n_params - (hf_cfg.vocab_size - 1) * hf_cfg.hidden_size) * 4  # one embedding row per token

    prompt = torch.randint(3, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    runs = {
        "ours": lambda n: llm.generate(ours, prompt, n)[0],
        "transformers": lambda n: hf.generate(prompt, max_new_tokens=n, do_sample=False, num_beams=1,
                                              use_cache=True)[0, args.prompt:].tolist(),
    }
    results = {k: {"prefill": [], "total": [], "mem": []} for k in runs}
    outputs = {}
    for name, run in runs.items():  # warm-up (thread pools, allocator)
        run(2)
    for _ in range(args.reps):
        for name, run in runs.items():
            t1, _, _ = timed(lambda: run(1))
            tn, mem, out = timed(lambda: run(args.new + 1))
            results[name]["prefill"].append(t1)
            results[name]["total"].append(tn)
            results[name]["mem"].append(mem)
            outputs[name] = out
    bw, read_bw = bandwidth()
    bound = bw * 1e9 / weight_bytes

    same = sum(a == b for a, b in zip(outputs["ours"], outputs["transformers"]))
    print(f"# bench_llm: {n_params / 1e6:.0f}M-parameter LLaMA, float32, batch 1, prompt {args.prompt}, "
          f"{args.new} greedy tokens, torch {torch.__version__} {args.threads} threads, load avg "
          f"{os.getloadavg()[0]:.1f}, median of {args.reps}")
    print(f"# llm.LLaMA.from_pretrained: {load_s:.2f} s for {n_params * 4 / 2**20:.0f} MiB of weights (memory-mapped)")
    print(f"# copy bandwidth {bw:.1f} GB/s -> decode bound {bound:.1f} tokens/s ({weight_bytes / 1e6:.0f} MB of "
          f"weights per token; read-only bandwidth {read_bw:.1f} GB/s -> {read_bw * 1e9 / weight_bytes:.1f} tokens/s); "
          f"greedy tokens identical: {same}/{args.new + 1}")
    print(f"| {'':14s} | prefill {args.prompt} (s) | decode (ms/token) | decode tokens/s | % of bound "
          f"| peak extra RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    stats = {}
    for name, r in results.items():
        prefill = statistics.median(r["prefill"])
        decode = (statistics.median(r["total"]) - prefill) / args.new
        stats[name] = (prefill, decode)
        print(f"| {name:14s} | {prefill:.3f} | {decode * 1e3:.1f} | {1 / decode:.2f} | {100 / decode / bound:.0f}% "
              f"| {statistics.median(r['mem']):.0f} |")
    (po, do), (ph, dh) = stats["ours"], stats["transformers"]
    print(f"| speed-up       | {ph / po:.2f}x | {dh / do:.2f}x | | | |")


if __name__ == "__main__":
    main()
