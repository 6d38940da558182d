"""The bench scripts' CPU helpers run (no timing is asserted): bench_mmfs.py once lost its CPU path's functions when
its CUDA path was added, and nothing noticed until it was next run. probe_features.py's fit and sampling are checked
against what they claim to compute."""
import torch

import data
import model as M
from bench.bench_mmfs import MASKED_LLM, fused_reading_all, make_inputs, measure_in_subprocess
from bench.probe_features import linear_probe, object_features
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


def test_linear_probe_reads_a_linear_label_and_not_noise():
    """probe_features.py's fit: near-perfect where the label is one linear read of the features, near chance (1/3)
    where the label is independent of them; fitted on two rows in three, scored on the third."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g, dtype=torch.float64)
    test = torch.arange(600) % 3 == 0
    linear = (x @ torch.randn(8, 3, generator=g, dtype=torch.float64)).argmax(1)
    noise = torch.randint(0, 3, (600,), generator=g)
    assert linear_probe(x, linear, test, 3) > 0.95
    assert linear_probe(x, noise, test, 3) < 0.45


def test_probe_features_samples_each_level_at_the_object_centroid(tiny_checkpoint):
    """The feature of an object is its pyramid maps bilinearly interpolated at its centroid, pixel centres at
    (j + 0.5) * S / s: checked by hand-written interpolation against grid_sample's convention."""
    net, _ = M.MMInterleaved.from_checkpoint(tiny_checkpoint)
    stories = [data.make_story("eval", 0, i, net.cfg.image_size) for i in range(3)]
    feats, shape, colour, frame, sides = object_features(net, stories)
    assert len(shape) == sum(len(s.objects[0]) for s in stories) and feats.shape[:2] == (len(shape), len(sides))
    assert torch.isfinite(feats).all()
    with torch.no_grad():
        _, pyramid = net.encode_images(torch.stack([data.to_tensor(s.images[0]) for s in stories]))
    S = net.cfg.image_size
    k = int((frame == 2).nonzero()[0])  # the first object of the third frame
    o = stories[2].objects[0][0]
    assert (shape[k], colour[k]) == (data.SHAPES.index(o.shape), data.COLOURS.index(o.colour))
    for j, p in enumerate(pyramid):
        s = p.shape[-1]
        u, v = o.x * s / S - 0.5, o.y * s / S - 0.5  # continuous map coordinates, 0 = the first pixel's centre
        x0, y0 = int(u // 1), int(v // 1)
        want = 0
        for yy, wy in ((y0, 1 - (v - y0)), (y0 + 1, v - y0)):
            for xx, wx in ((x0, 1 - (u - x0)), (x0 + 1, u - x0)):
                if 0 <= xx < s and 0 <= yy < s:  # outside the map: zeros (grid_sample's padding)
                    want = want + wy * wx * p[2, :, yy, xx].double()
        torch.testing.assert_close(feats[k, j], want, rtol=1e-5, atol=1e-5)
