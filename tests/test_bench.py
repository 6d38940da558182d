"""The bench scripts' CPU helpers run (no timing is asserted): bench_mmfs.py once lost its CPU path's functions when
its CUDA path was added, and nothing noticed until it was next run."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_mmfs(*argv):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_mmfs.py"), *argv], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bench_mmfs_memory_and_first_call_helpers_run():
    peak, result_bytes = bench_mmfs("--memory", "tiny", "fused", "fwd+bwd")
    # tiny: out (1, 16, 16) float32, its upstream gradient, and the gradients of value, locations, weights
    assert result_bytes == 4 * (2 * 16 * 16 + 20 * 2 * 8 + 16 * 2 * 2 * 4 * 2 + 16 * 2 * 2 * 4)
    assert peak >= 0
    assert isinstance(bench_mmfs("--first-call"), float)
