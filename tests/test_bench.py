"""The bench scripts' CPU helpers run (no timing is asserted): bench_mmfs.py once lost its CPU path's functions when
its CUDA path was added, and nothing noticed until it was next run."""
import torch

from bench.bench_mmfs import MASKED_LLM, fused_reading_all, make_inputs, measure_in_subprocess
from kernels.msda import msda_fused


def test_bench_mmfs_memory_and_first_call_helpers_run():
    # each in a fresh process, as bench_mmfs.py itself runs them; a failing subprocess raises CalledProcessError
    peak, result_bytes = measure_in_subprocess("--memory", "tiny", "fused", "fwd+bwd")
    # tiny: out (1, 16, 16) float32, its upstream gradient, and the gradients of value, locations, weights
    assert result_bytes == 4 * (2 * 16 * 16 + 20 * 2 * 8 + 16 * 2 * 2 * 4 * 2 + 16 * 2 * 2 * 4)
    assert peak >= 0
    assert isinstance(measure_in_subprocess("--first-call"), float)


def test_the_read_all_variant_reads_the_masked_samples_and_gives_the_same_output():
    """bench_mmfs's "0s read" column must time the same sum with nothing skipped: its weights are the masked ones
    raised from 0 to 1e-30, so its output equals the fused kernel's to float32 rounding."""
    value, maps, starts, loc, attn = make_inputs("small-llm")
    zero = (attn == 0).double().mean().item()
    assert abs(zero - MASKED_LLM) < 0.02  # whole (query, image) pairs masked, at the stated fraction
    torch.testing.assert_close(fused_reading_all(value, maps, starts, loc, attn),
                               msda_fused(value, maps, starts, loc, attn), rtol=1e-5, atol=1e-6)
