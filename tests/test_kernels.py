"""Fused MSDA kernels (kernels/msda.py) against the grid_sample oracle mmfs.msda_reference.

Tolerances (on outputs and on the gradients of value, sampling_locations and attention_weights), as
|fused - ref| <= tol * (|ref| + max(1, max|ref|)):  float64 1e-10, float32 1e-5 (ref in float64 on the same rounded
inputs), float16 2e-3, bfloat16 1.6e-2. Where a pixel coordinate x = loc·W - 0.5 is an integer, bilinear sampling
has a kink and d/dloc is one-sided: the CUDA op's rule (reference §2.2) and grid_sample may pick different sides
there (and at x = -1 the op skips the sample), so those d/dloc entries (within 1e-9 in float64, 1e-4 otherwise) are
not compared; the output and the other gradients are continuous there and are compared everywhere.

Run as a script under NUMBA_ENABLE_CUDASIM=1, this file checks the CUDA kernels in the simulator, and that importing
kernels.msda did not load numba.cuda (test_cuda_kernels_in_simulator does that in a subprocess).
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.msda import MSDAFunction, check_inputs, msda_fused, supports
from mmfs import msda_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ----------------------------------------------------------------------------------------------------------------
# inputs and comparison


@st.composite
def cases(draw, small=False):
    """Sizes of one MSDA call: Lv = images × levels maps of any (H, W), 1×1 included, and a seed for the tensors."""
    n_maps = draw(st.integers(1, 2 if small else 4)) * draw(st.integers(1, 2 if small else 4))  # images × levels
    hw = st.tuples(st.integers(1, 5), st.integers(1, 7))
    return dict(B=draw(st.integers(1, 2)), Q=draw(st.integers(1, 5 if small else 40)),
                M=draw(st.integers(1, 2 if small else 4)),
                D=draw(st.sampled_from([1, 3] if small else [1, 3, 30, 71])),
                shapes=draw(st.lists(hw, min_size=n_maps, max_size=n_maps)),
                P=draw(st.integers(1, 3 if small else 8)), seed=draw(st.integers(0, 2**31 - 1)))


def locations(g, size, n):
    """Coordinates of shape `size` for maps n pixels wide: inside, outside, borders, pixel edges and centres, far."""
    n = n.double()
    k = torch.floor(torch.rand(size, generator=g, dtype=torch.float64) * (n + 3)) - 1  # integers in [-1, n+1]
    kind = torch.randint(0, 6, size, generator=g)
    choices = [torch.rand(size, generator=g, dtype=torch.float64),                      # inside
               torch.rand(size, generator=g, dtype=torch.float64) * 2.2 - 0.6,         # around the map
               torch.randint(0, 2, size, generator=g).double(),                        # exactly 0 or 1
               k.clamp(0, None) / n,                                                    # pixel edges
               (k + 0.5) / n,                                                           # pixel centres, -0.5/n too
               (2 + 100 * torch.rand(size, generator=g, dtype=torch.float64)) * (2 * (k % 2) - 1)]  # far outside
    return torch.stack(choices, -1).gather(-1, kind[..., None])[..., 0]


def make_inputs(case, dtype):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) in dtype, contiguous."""
    g = torch.Generator().manual_seed(case["seed"])
    B, Q, M, D, P = case["B"], case["Q"], case["M"], case["D"], case["P"]
    shapes = torch.tensor(case["shapes"], dtype=torch.int64)                            # (Lv, 2) rows of (H, W)
    sizes = shapes[:, 0] * shapes[:, 1]                                                 # (Lv,)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])                      # (Lv,)
    Lv = len(shapes)
    value = torch.randn(B, int(sizes.sum()), M, D, generator=g, dtype=torch.float64)    # (B, S, M, D)
    grid = (B, Q, M, Lv, P)
    x = locations(g, grid, shapes[:, 1].view(1, 1, 1, Lv, 1))                          # (B, Q, M, Lv, P)
    y = locations(g, grid, shapes[:, 0].view(1, 1, 1, Lv, 1))
    loc = torch.stack([x, y], dim=-1)                                                   # (B, Q, M, Lv, P, 2)
    attn = torch.rand(grid, generator=g, dtype=torch.float64)                           # (B, Q, M, Lv, P)
    # a quarter of the weights exactly 0, as MMFS gives a masked image: the kernels skip those samples
    attn = attn.masked_fill(torch.rand(grid, generator=g) < 0.25, 0.0)
    return value.to(dtype), shapes, starts, loc.to(dtype), attn.to(dtype)


def run(fn, inputs, grad_seed=0):
    """Output and the gradients of value, sampling_locations, attention_weights for a random upstream gradient."""
    value, shapes, starts, loc, attn = [t.clone() for t in inputs]
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    out = fn(value, shapes, starts, loc, attn)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    return [out.detach(), *torch.autograd.grad(out, leaves, g.to(out.dtype))]


def kinks(inputs, tol):
    """(B, Q, M, Lv, P, 2) mask of coordinates whose pixel position loc·size - 0.5 is within tol of an integer."""
    shapes, loc = inputs[1], inputs[3].double()
    size = shapes.flip(-1).view(1, 1, 1, -1, 1, 2).double()                             # (x uses W, y uses H)
    pix = loc * size - 0.5
    return (pix - pix.round()).abs() < tol


def assert_matches(got, want, inputs, tol, kink_tol):
    """Compare [out, d value, d loc, d attn] at `tol` (see the module docstring), masking one-sided d/dloc."""
    mask = kinks(inputs, kink_tol)
    got, want = list(got), list(want)
    got[2], want[2] = got[2].masked_fill(mask, 0), want[2].masked_fill(mask, 0)
    for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, want):
        a, b = a.double(), b.double()
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def check_against_reference(fn, case, dtype):
    """fn (fused) on dtype inputs vs the float64 reference on the same (rounded) inputs."""
    inputs = make_inputs(case, dtype)
    want = run(msda_reference, [t.double() if t.is_floating_point() else t for t in inputs])
    got = run(fn, inputs)
    assert got[0].dtype == dtype and all(t.dtype == dtype for t in got[1:])
    assert_matches(got, want, inputs, TOL[dtype], 1e-9 if dtype == torch.float64 else 1e-4)


# ----------------------------------------------------------------------------------------------------------------
# CPU kernel vs reference


@settings(deadline=None, max_examples=25)
@given(case=cases(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_cpu_matches_reference(case, dtype):
    check_against_reference(msda_fused, case, dtype)


@pytest.mark.parametrize("Q, shapes", [(1, [(9, 7), (5, 4)]), (40, [(2, 1)])])
def test_both_value_layouts_of_the_forward(Q, shapes):
    """Few samples per head (one decoded token) read value in place; many read a head-major copy: both exact."""
    for dtype in (torch.float64, torch.float32):
        check_against_reference(msda_fused, dict(B=2, Q=Q, M=3, D=5, shapes=shapes, P=2, seed=Q), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    case = dict(B=2, Q=17, M=3, D=30, shapes=[(5, 3), (1, 1), (2, 7)], P=4, seed=7)
    check_against_reference(msda_fused, case, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huge_and_border_locations(dtype):
    """All (x, y) pairs of 1e30, -1e30, 0, 1, 0.3, -0.5/size (pixel coordinate exactly -1): finite, as the oracle."""
    case = dict(B=1, Q=9, M=2, D=3, shapes=[(4, 4), (3, 5), (1, 1)], P=6, seed=3)
    value, shapes, starts, _, attn = make_inputs(case, dtype)
    table = torch.tensor([1e30, -1e30, 0.0, 1.0, 0.3], dtype=torch.float64)

    def special(i, n):  # special value i % 6 for maps n pixels wide
        return torch.where(i % 6 == 5, -0.5 / n, table[(i % 6).clamp(max=4)])

    flat = torch.arange(case["Q"] * case["P"]).view(1, case["Q"], 1, 1, case["P"])     # (1, Q, 1, 1, P)
    x = special(flat, shapes[:, 1].double().view(1, 1, 1, -1, 1))                       # (1, Q, 1, Lv, P)
    y = special(flat // 6, shapes[:, 0].double().view(1, 1, 1, -1, 1))                  # all 36 (x, y) pairs
    loc = torch.stack(torch.broadcast_tensors(x, y), -1).expand(1, case["Q"], case["M"], len(shapes), case["P"], 2)
    inputs = (value, shapes, starts, loc.to(dtype).contiguous(), attn)
    got = run(msda_fused, inputs)
    assert all(torch.isfinite(t).all() for t in got)
    want = run(msda_reference, [t.double() if t.is_floating_point() else t for t in inputs])
    assert_matches(got, want, inputs, TOL[dtype], 1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_images_are_skipped_but_keep_their_attention_gradient(dtype):
    """Images 1 and 3 of four (two levels each) masked as MMFS masks them: weight exactly 0 for every sample. The
    kernel skips reading them, yet d/d attn there is the sampled value dotted with grad_out, as the oracle gives; a NaN
    in a masked image's values is not read (the oracle would make it NaN), one in a visible image still reaches out."""
    case = dict(B=2, Q=11, M=2, D=6, shapes=[(5, 4), (2, 3)] * 4, P=3, seed=9)
    value, shapes, starts, loc, attn = make_inputs(case, dtype)
    masked = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool).view(1, 1, 1, -1, 1)  # (1, 1, 1, Lv, 1)
    attn = attn.masked_fill(masked, 0.0)
    inputs = (value, shapes, starts, loc, attn)
    got = run(msda_fused, inputs)
    assert_matches(got, run(msda_reference, [t.double() if t.is_floating_point() else t for t in inputs]), inputs,
                   TOL[dtype], 1e-9 if dtype == torch.float64 else 1e-4)
    in_masked = masked.expand_as(attn)
    assert got[3][in_masked].abs().max() > 0.1  # skipped samples still get their attention gradient
    assert (got[2][in_masked] == 0).all()  # and no location gradient: the output does not depend on them
    n = int(starts[2])  # value rows per image: image i is rows [i·n, (i+1)·n)
    poisoned = value.clone()
    poisoned[:, n:2 * n] = float("nan")  # masked image 1
    torch.testing.assert_close(msda_fused(poisoned, shapes, starts, loc, attn), got[0], rtol=0, atol=0)
    poisoned[:, 2 * n:3 * n] = float("nan")  # visible image 2
    assert msda_fused(poisoned, shapes, starts, loc, attn).isnan().any()


def test_gradcheck():
    """First-order gradients of the fused op against finite differences (float64, locations off the kinks)."""
    case = dict(B=2, Q=3, M=2, D=3, shapes=[(3, 4), (1, 1), (2, 3)], P=2, seed=11)
    value, shapes, starts, loc, attn = make_inputs(case, torch.float64)
    loc = torch.rand(loc.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.2 - 0.1
    def fn(value, loc, attn):
        return msda_fused(value, shapes, starts, loc, attn)

    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (value, loc, attn)])


def test_backward_with_colliding_corners_is_deterministic():
    """Many samples on tiny maps hit the same corners: the CPU backward (big enough to run on all threads) must not
    race, and gives bit-identical results run after run."""
    case = dict(B=2, Q=40, M=4, D=30, shapes=[(1, 1), (2, 2), (1, 3)], P=8, seed=5)
    inputs = make_inputs(case, torch.float64)
    first, second = run(msda_fused, inputs), run(msda_fused, inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert_matches(first, run(msda_reference, inputs), inputs, TOL[torch.float64], 1e-9)


def test_supports():
    assert all(supports(torch.zeros(1, dtype=dt)) for dt in TOL)
    assert not supports(torch.zeros(1, dtype=torch.int64))
    assert not supports(torch.zeros(1, device="meta"))


# ----------------------------------------------------------------------------------------------------------------
# bad input


def _swap_strides(t):
    """Same values and shape, non-contiguous: the last two axes stored transposed."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


BAD = {  # defect: (make the five arguments from good ones, the argument the error must name)
    "value rank": (lambda v, ss, lsi, loc, a: (v[0], ss, lsi, loc, a), "value"),
    "shapes rank": (lambda v, ss, lsi, loc, a: (v, ss.flatten(), lsi, loc, a), "spatial_shapes"),
    "start rank": (lambda v, ss, lsi, loc, a: (v, ss, lsi[None], loc, a), "level_start_index"),
    "loc rank": (lambda v, ss, lsi, loc, a: (v, ss, lsi, loc[..., 0], a), "sampling_locations"),
    "attn rank": (lambda v, ss, lsi, loc, a: (v, ss, lsi, loc, a[0]), "attention_weights"),
    "batch": (lambda v, ss, lsi, loc, a: (v, ss, lsi, loc[:1].contiguous(), a), "sampling_locations"),
    "queries": (lambda v, ss, lsi, loc, a: (v, ss, lsi, loc, a[:, :2].contiguous()), "attention_weights"),
    "heads": (lambda v, ss, lsi, loc, a: (v, ss, lsi, torch.cat([loc, loc], 2), a), "sampling_locations"),
    "levels": (lambda v, ss, lsi, loc, a: (v, ss, lsi, loc, a[:, :, :, :1].contiguous()), "attention_weights"),
    "points": (lambda v, ss, lsi, loc, a: (v, ss, lsi, loc, torch.cat([a, a], -1)), "attention_weights"),
    "xy pairs": (lambda v, ss, lsi, loc, a: (v, ss, lsi, torch.cat([loc, loc], -1), a), "sampling_locations"),
    "shape pairs": (lambda v, ss, lsi, loc, a: (v, torch.cat([ss, ss], 1), lsi, loc, a), "spatial_shapes"),
    "sum H*W": (lambda v, ss, lsi, loc, a: (v, ss + 1, lsi, loc, a), "spatial_shapes"),
    "empty map": (lambda v, ss, lsi, loc, a: (v, torch.tensor([[2, 4], [0, 5]]), lsi, loc, a), "spatial_shapes"),
    "starts": (lambda v, ss, lsi, loc, a: (v, ss, lsi + 1, loc, a), "level_start_index"),
    "starts length": (lambda v, ss, lsi, loc, a: (v, ss, lsi[:1], loc, a), "level_start_index"),
    "float shapes": (lambda v, ss, lsi, loc, a: (v, ss.float(), lsi, loc, a), "spatial_shapes"),
    "float starts": (lambda v, ss, lsi, loc, a: (v, ss, lsi.float(), loc, a), "level_start_index"),
    "int value": (lambda v, ss, lsi, loc, a: (v.long(), ss, lsi, loc, a), "value"),
    "loc dtype": (lambda v, ss, lsi, loc, a: (v, ss, lsi, loc.double(), a), "sampling_locations"),
    "attn dtype": (lambda v, ss, lsi, loc, a: (v, ss, lsi, loc, a.half()), "attention_weights"),
    "device": (lambda v, ss, lsi, loc, a: (v, ss, lsi, loc, a.to("meta")), "attention_weights"),
    "value layout": (lambda v, ss, lsi, loc, a: (_swap_strides(v), ss, lsi, loc, a), "value"),
    "loc layout": (lambda v, ss, lsi, loc, a: (v, ss, lsi, _swap_strides(loc), a), "sampling_locations"),
    "no channels": (lambda v, ss, lsi, loc, a: (v[..., :0], ss, lsi, loc, a), "value"),
    "not a tensor": (lambda v, ss, lsi, loc, a: (v.numpy(), ss, lsi, loc, a), "value"),
}


@pytest.mark.parametrize("defect", list(BAD))
def test_bad_input_names_the_argument(defect):
    make, name = BAD[defect]
    good = make_inputs(dict(B=2, Q=3, M=2, D=4, shapes=[(2, 3), (1, 2)], P=2, seed=0), torch.float32)
    args = make(*good)
    with pytest.raises(ValueError, match=name) as err:
        check_inputs(*args)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=name):
        msda_fused(*args)


# ----------------------------------------------------------------------------------------------------------------
# CUDA kernels on a real GPU (skipped without one; CI has none: these ran on a lent H200, see the README)

GPU = torch.cuda.is_available()


def on_gpu(*args):
    """msda_fused on CUDA copies of the five arguments (the numba CUDA kernels), the output back on the CPU."""
    return msda_fused(*(t.cuda() for t in args)).cpu()


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@settings(deadline=None, max_examples=60)
@given(case=cases(), dtype=st.sampled_from(list(TOL)))
def test_gpu_matches_reference(case, dtype):
    check_against_reference(on_gpu, case, dtype)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_gpu_huge_border_locations_and_the_mmfs_dispatch(monkeypatch):
    """Far-off and border coordinates stay finite on the GPU, and MMFS's "auto" backend takes the kernel there."""
    import mmfs

    assert supports(torch.zeros(1, device="cuda"))
    case = dict(B=2, Q=33, M=4, D=32, shapes=[(16, 16), (8, 8), (1, 1)], P=8, seed=2)
    inputs = make_inputs(case, torch.float32)
    far = inputs[3] * 1e6  # mostly off every map: skipped samples, zero gradients
    for loc in (inputs[3], far):
        args = (*inputs[:3], loc, inputs[4])
        got = run(on_gpu, args)
        assert all(torch.isfinite(t).all() for t in got)
        assert_matches(got, run(msda_reference, [t.double() if t.is_floating_point() else t for t in args]), args,
                       TOL[torch.float32], 1e-4)
    cuda_args = [t.cuda() for t in inputs]
    monkeypatch.setattr(mmfs, "BACKEND", "auto")
    torch.testing.assert_close(mmfs.msda(*cuda_args), msda_fused(*cuda_args), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# CUDA kernels in numba's simulator (the simulator must be switched on before numba.cuda is imported: subprocess)


def test_cuda_kernels_in_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cuda simulator: kernels match the reference" in proc.stdout


CUDASIM_EXAMPLES = []


@settings(deadline=None, max_examples=10, database=None)
@given(case=cases(small=True), dtype=st.sampled_from([torch.float64, torch.float32]))
def _simulated_cuda_matches_reference(case, dtype):
    check_against_reference(lambda *args: MSDAFunction.apply(*args, "cuda"), case, dtype)
    CUDASIM_EXAMPLES.append(case)


if __name__ == "__main__":
    import numba

    assert numba.config.ENABLE_CUDASIM, "run with NUMBA_ENABLE_CUDASIM=1"
    assert "numba.cuda" not in sys.modules, "importing kernels.msda (or mmfs) must not load numba.cuda"
    _simulated_cuda_matches_reference()
    fixed = dict(B=1, Q=3, M=2, D=5, shapes=[(1, 1), (3, 2)], P=3, seed=1)
    check_against_reference(lambda *args: MSDAFunction.apply(*args, "cuda"), fixed, torch.float32)
    print(f"cuda simulator: kernels match the reference on {len(CUDASIM_EXAMPLES) + 1} cases")


def test_transformers_loads_beside_our_kernels_package():
    """This repo's kernels/ shares its name with Hugging Face's `kernels`, which transformers >= 5.25 imports as it
    loads; conftest's hide_hub_kernels() keeps it from importing ours instead. Without it this import fails with
    "cannot import name 'CUDAProperties' from 'kernels'" wherever Hugging Face's package is installed."""
    import importlib

    import kernels

    pytest.importorskip("transformers")  # a test-only dependency; its absence is not this bug
    importlib.import_module("transformers.integrations.hub_kernels")  # the import that failed: not a skip
    assert os.path.dirname(os.path.abspath(kernels.__file__)) == os.path.join(ROOT, "kernels")
