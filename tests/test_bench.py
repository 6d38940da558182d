"""The bench scripts' CPU helpers run (no timing is asserted): bench_mmfs.py once lost its CPU path's functions when
its CUDA path was added, and nothing noticed until it was next run."""
from bench.bench_mmfs import measure_in_subprocess


def test_bench_mmfs_memory_and_first_call_helpers_run():
    # each in a fresh process, as bench_mmfs.py itself runs them; a failing subprocess raises CalledProcessError
    peak, result_bytes = measure_in_subprocess("--memory", "tiny", "fused", "fwd+bwd")
    # tiny: out (1, 16, 16) float32, its upstream gradient, and the gradients of value, locations, weights
    assert result_bytes == 4 * (2 * 16 * 16 + 20 * 2 * 8 + 16 * 2 * 2 * 4 * 2 + 16 * 2 * 2 * 4)
    assert peak >= 0
    assert isinstance(measure_in_subprocess("--first-call"), float)
