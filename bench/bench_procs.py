"""One N-thread process against N one-thread DDP processes for `train.py --small` on a CPU, side by side.

    python bench/bench_procs.py                      # --procs 1 vs --procs 2, 60 steps each, two rounds
    python bench/bench_procs.py --procs 1 2 --steps 40 --rounds 3

Each layout runs the real `train.py --small --stop-at STEPS` in a fresh output directory (tokenizer, model, AdamW,
EMA: everything the run does), alternated round by round so that the host's drift falls on both. The time of a step
is read from the run's own metrics.jsonl between the second logged step and the last (the first steps warm the
allocator and oneDNN up). Peak memory is the largest process's resident set in that layout (with N processes, N
such). Both layouts train the same rows with the same random draws (DDP splits the batch by rows): the same work.

The ratio column is each layout's step time over the first one's, in this run. Run it on an otherwise idle machine:
a training run beside it would take cores from one layout more than the other.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# runs a command and writes the largest resident set (kB) among its descendants to a file: one run's own peak
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[2:]).returncode; "
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(r)")


def one_run(procs, steps, out):
    """train.py --small --procs N --stop-at steps into `out` -> (s/step between the 2nd and the last log, the
    largest process's peak resident kB, wall seconds)."""
    t0 = time.time()
    peak_file = f"{out}.peak"
    r = subprocess.run([sys.executable, "-c", PEAK, peak_file, sys.executable, str(ROOT / "train.py"), "--small",
                        "--procs", str(procs), "--stop-at", str(steps), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_procs.py: train.py --procs {procs} failed:\n{r.stderr[-2000:]}")
    wall = time.time() - t0
    log = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    (s0, e0), (s1, e1) = (log[1]["step"], log[1]["elapsed_s"]), (log[-1]["step"], log[-1]["elapsed_s"])
    return (e1 - e0) / (s1 - s0), int(Path(peak_file).read_text()), wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="layouts to compare (the first is the base)")
    ap.add_argument("--steps", type=int, default=60, help="steps per run (logged every 10)")
    ap.add_argument("--rounds", type=int, default=2, help="times each layout runs, alternated")
    args = ap.parse_args()
    if args.steps < 30:
        sys.exit("bench_procs.py: --steps must be >= 30 (the time is read between the 2nd and the last logged step)")
    times = {n: [] for n in args.procs}
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for n in args.procs:
                t, peak, wall = one_run(n, args.steps, Path(tmp) / f"p{n}.{i}")
                times[n].append(t)
                peaks[n] = max(peaks.get(n, 0), peak)
                print(f"round {i + 1}, --procs {n}: {t:.3f} s/step ({wall:.0f} s in all)", file=sys.stderr)
    base = statistics.mean(times[args.procs[0]])
    print(f"\ntrain.py --small, {args.steps} steps a run, {args.rounds} rounds; s/step from metrics.jsonl")
    print(f"| --procs | s/step (each round) | mean | ratio to --procs {args.procs[0]} | peak RSS of one process |")
    print("|---|---|---|---|---|")
    for n in args.procs:
        m = statistics.mean(times[n])
        print(f"| {n} | {' / '.join(f'{t:.3f}' for t in times[n])} | {m:.3f} | {m / base:.3f} | "
              f"{peaks[n] / 1024:.0f} MiB |")


if __name__ == "__main__":
    main()
