"""Fused multi-scale deformable sampling (MSDA) in numba: one body compiled for the CPU and for CUDA.

`msda_fused(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)` computes, without ever
building the (..., Lv·P, D) tensor of sampled values that `mmfs.msda_reference` materialises,

    out[b, q, m·D + c] = Σ_l Σ_p attn[b, q, m, l, p] · grid_sample(V_l[b, :, m], 2·loc[b, q, m, l, p] − 1)[c]

with bilinear interpolation, zero padding and align_corners=False (reference §1.4, §2.2). Shapes: value (B, S, M, D);
spatial_shapes (Lv, 2) integer (H, W); level_start_index (Lv,); sampling_locations (B, Q, M, Lv, P, 2), last axis
(x, y), nominally in [0, 1] but any finite value is safe; attention_weights (B, Q, M, Lv, P); out (B, Q, M·D).

Written once: the per-sample maths (validity test, corner rows and weights, gradient formulas) are the three plain
Python functions `_footprint`, `_weights` and `_grads`. Each is compiled twice, by `numba.njit(inline="always")` for
the CPU kernels and by `numba.cuda.jit(device=True)` for the CUDA kernels; only the loops around them differ.

Thread -> work mapping:
  CPU forward    prange over (b, m, q), q fastest: an iteration owns out[b, q, m, :] and loops over levels, points,
                 channels. It reads a head-major copy of value, (B, M, S, D): a thread's head then lies contiguous and
                 stays in cache, where in (B, S, M, D) its rows lie M·D apart (and on few cache sets).
  CPU backward   prange over (b, m, l): an iteration owns grad_value[b, rows of level l, m, :] (bilinear corners never
                 leave their level) and the grad_loc / grad_attn slots (b, :, m, l, :), so plain += is race-free. It
                 copies its value rows to a contiguous scratch, accumulates their gradient in another and writes it
                 out once at the end (so grad_value needs no zeroing).
  CUDA forward   one thread per output element (b, q, m, c), looping over levels and points; neighbouring threads read
                 neighbouring channels, so loads coalesce.
  CUDA backward  one thread per sample (b, q, m, l, p): it loops over the D channels itself (any D, no block-size
                 limit), writes the grad_loc / grad_attn of its sample alone and adds into grad_value atomically.
Inside every channel loop the corner rows and weights are fixed: they are computed once per (b, q, m, l, p).

A sample whose attention weight is exactly 0 is skipped: the forward does not read it and the backward adds nothing
to grad_value for it (its grad_attn, the sampled value dotted with grad_out, is still computed). MMFS gives every
sample of a masked image that weight (a -10000 logit underflows in the softmax); in the --small recipe's LLM that is
about 90 % of the samples (image slots of other stories, after the query, or empty). Skipping adds exactly what
reading would add, 0, wherever the value read is finite; where it is NaN or inf the grid_sample oracle would return
NaN and the kernels return what the other samples give.

float32 and float64 run natively (`ft`, the working float type, keeps literals from promoting float32 maths to
float64); float16 / bfloat16 inputs are upcast to float32, run, and the results cast back. Nothing is compiled at
import and CUDA is never touched there: the CPU kernels compile on their first call and are cached on disk
(cache=True), so a machine compiles them once; the CUDA kernels are built on their first launch.

Read bottom-up: per-sample maths, CPU kernels, CUDA kernels, launch, autograd Function, public functions.
"""
import functools
import warnings

import numba
import numpy as np
import torch
from torch.autograd.function import once_differentiable

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CUDA_THREADS = 128  # threads per block of both CUDA kernels
_CPU_GRAIN = 1 << 16  # CPU work (samples × channels) per thread below which fewer threads are used
cuda = None  # numba.cuda, imported on first CUDA use (_cuda_kernels): importing this module never touches CUDA
# numba's "omp" threading layer shares the OpenMP runtime with torch: its set_num_threads then changes torch's thread
# count and the two pools spin against each other. The "workqueue" pool is numba's own; NUMBA_THREADING_LAYER overrides.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"

# ----------------------------------------------------------------------------------------------------------------
# per-sample maths, shared by every kernel (plain Python; compiled once for the CPU and once for CUDA below)


def _footprint(lx, ly, start, h, w, ft):
    """Bilinear footprint of one sample (reference §2.2): ok, 4 corner rows, their in-map masks, fractions lw, lh."""
    fw, fh, zero, one = ft(w), ft(h), ft(0.0), ft(1.0)  # typed constants: float32 maths stays float32
    x = lx * fw - ft(0.5)  # pixel coordinates: with align_corners=False pixel k spans [k, k+1) in loc·W
    y = ly * fh - ft(0.5)
    if not (x > -one and y > -one and x < fw and y < fh):  # skipped sample; rejects huge |loc| before any int cast
        return False, start, start, start, start, zero, zero, zero, zero, zero, zero
    x0, y0 = int(x), int(y)  # truncation, then floor below: an inline cast, not a libm floor call
    x0, y0 = x0 - (1 if ft(x0) > x else 0), y0 - (1 if ft(y0) > y else 0)  # in [-1, w-1] and [-1, h-1]
    # corners off the map read as 0: their mask is 0 and their row is clamped to an in-map pixel of the same level
    kx0, kx1 = (one if x0 >= 0 else zero), (one if x0 + 1 < w else zero)
    ky0, ky1 = (one if y0 >= 0 else zero), (one if y0 + 1 < h else zero)
    xa, xb, ya, yb = max(x0, 0), min(x0 + 1, w - 1), max(y0, 0), min(y0 + 1, h - 1)
    return (True, start + ya * w + xa, start + ya * w + xb, start + yb * w + xa, start + yb * w + xb,
            ky0 * kx0, ky0 * kx1, ky1 * kx0, ky1 * kx1, x - ft(x0), y - ft(y0))


def _weights(lw, lh, k1, k2, k3, k4, ft):
    """Masked bilinear weights of the corners (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1)."""
    hw, hh = ft(1.0) - lw, ft(1.0) - lh
    return k1 * hh * hw, k2 * hh * lw, k3 * lh * hw, k4 * lh * lw


def _grads(s1, s2, s3, s4, k1, k2, k3, k4, lw, lh, a, h, w, ft):
    """(d/d attn, d/d loc_x, d/d loc_y) of one sample from s_i = Σ_c grad_out[c]·V[corner i, c] (reference §2.3)."""
    s1, s2, s3, s4 = k1 * s1, k2 * s2, k3 * s3, k4 * s4  # off-map corners read as 0
    hw, hh = ft(1.0) - lw, ft(1.0) - lh
    grad_attn = hh * hw * s1 + hh * lw * s2 + lh * hw * s3 + lh * lw * s4  # the sampled value, dotted with grad_out
    grad_x = a * ft(w) * (hh * (s2 - s1) + lh * (s4 - s3))  # d x_pix / d loc_x = W
    grad_y = a * ft(h) * (hw * (s3 - s1) + lw * (s4 - s2))  # d y_pix / d loc_y = H
    return grad_attn, grad_x, grad_y


# ----------------------------------------------------------------------------------------------------------------
# CPU kernels: numba.njit(parallel=True); `ft` is an argument, so numba compiles (and caches) one version per type

_inline = numba.njit(inline="always", fastmath=False)
_cpu_footprint, _cpu_weights, _cpu_grads = _inline(_footprint), _inline(_weights), _inline(_grads)
_cpu_jit = numba.njit(parallel=True, cache=True, fastmath=False)  # compiled on first call, then loaded from disk
# the backward may reassociate sums, so its four channel dot products vectorise (the order is still fixed: bitwise
# reproducible run after run); no other fast-math flag (NaN / inf keep their IEEE meaning)
_cpu_jit_bwd = numba.njit(parallel=True, cache=True, fastmath={"reassoc"})


@_cpu_jit
def _cpu_forward(value, shapes, starts, loc, attn, out, ft):
    """out (B, Q, M, D), zero on entry, += the attention-weighted bilinear samples of value (B, M, S, D)."""
    B, M, _, D = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    zero = ft(0.0)
    for i in numba.prange(B * M * Q):  # iteration i owns out[b, q, m, :]; q fastest, so a thread stays on one head
        b, m, q = i // (M * Q), i // Q % M, i % Q
        for l in range(L):
            h, w, start = shapes[l, 0], shapes[l, 1], starts[l]
            for p in range(P):
                a = attn[b, q, m, l, p]
                if a == zero:  # a masked image's sample: it would add exactly 0 (see the module docstring)
                    continue
                ok, r1, r2, r3, r4, k1, k2, k3, k4, lw, lh = _cpu_footprint(
                    loc[b, q, m, l, p, 0], loc[b, q, m, l, p, 1], start, h, w, ft)
                if not ok:
                    continue
                w1, w2, w3, w4 = _cpu_weights(lw, lh, k1, k2, k3, k4, ft)
                w1, w2, w3, w4 = a * w1, a * w2, a * w3, a * w4
                for c in range(D):  # contiguous, vectorised; no array views in loops (each would be refcounted)
                    out[b, q, m, c] += (w1 * value[b, m, r1, c] + w2 * value[b, m, r2, c]
                                        + w3 * value[b, m, r3, c] + w4 * value[b, m, r4, c])


@_cpu_jit_bwd
def _cpu_backward(value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn, ft):
    """grad_value (B, S, M, D) (written whole), grad_loc, grad_attn (zero on entry) from grad_out (B, Q, M, D)."""
    B, _, M, D = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    zero = ft(0.0)
    for i in numba.prange(B * M * L):  # iteration i owns level l of (b, m): see the module docstring
        b, m, l = i // (M * L), i // L % M, i % L
        h, w, start = shapes[l, 0], shapes[l, 1], starts[l]
        # the level's rows of head (b, m), copied contiguous: in value they lie M·D apart (and on few cache sets)
        v, gv = np.empty((h * w, D), value.dtype), np.zeros((h * w, D), value.dtype)  # (h·w, D) each
        for r in range(h * w):
            for c in range(D):
                v[r, c] = value[b, start + r, m, c]
        for q in range(Q):
            for p in range(P):
                ok, r1, r2, r3, r4, k1, k2, k3, k4, lw, lh = _cpu_footprint(
                    loc[b, q, m, l, p, 0], loc[b, q, m, l, p, 1], 0, h, w, ft)  # rows counted from the level start
                if not ok:
                    continue  # the three gradients of a skipped sample stay 0
                a = attn[b, q, m, l, p]
                w1, w2, w3, w4 = _cpu_weights(lw, lh, k1, k2, k3, k4, ft)
                w1, w2, w3, w4 = a * w1, a * w2, a * w3, a * w4
                s1 = s2 = s3 = s4 = zero
                if a != zero and k1 != zero and k2 != zero and k3 != zero and k4 != zero:  # 4 in-map rows: one pass
                    for c in range(D):
                        gc = grad_out[b, q, m, c]
                        s1 += gc * v[r1, c]
                        s2 += gc * v[r2, c]
                        s3 += gc * v[r3, c]
                        s4 += gc * v[r4, c]
                        gv[r1, c] += w1 * gc
                        gv[r2, c] += w2 * gc
                        gv[r3, c] += w3 * gc
                        gv[r4, c] += w4 * gc
                else:  # on the border (off-map corners skipped, clamped rows may coincide), or masked (weight 0)
                    for c in range(D):
                        gc = grad_out[b, q, m, c]
                        s1 += gc * v[r1, c]
                        s2 += gc * v[r2, c]
                        s3 += gc * v[r3, c]
                        s4 += gc * v[r4, c]
                    for r, wr, k in ((r1, w1, k1), (r2, w2, k2), (r3, w3, k3), (r4, w4, k4)):
                        if k != zero and a != zero:  # a masked sample gets its grad_attn only: it adds 0 here
                            for c in range(D):
                                gv[r, c] += wr * grad_out[b, q, m, c]
                ga, gx, gy = _cpu_grads(s1, s2, s3, s4, k1, k2, k3, k4, lw, lh, a, h, w, ft)
                grad_attn[b, q, m, l, p] = ga
                grad_loc[b, q, m, l, p, 0] = gx
                grad_loc[b, q, m, l, p, 1] = gy
        for r in range(h * w):
            for c in range(D):
                grad_value[b, start + r, m, c] = gv[r, c]


# ----------------------------------------------------------------------------------------------------------------
# CUDA kernels: numba.cuda.jit, one pair per working float type (also run by the simulator, NUMBA_ENABLE_CUDASIM=1)


@functools.cache
def _cuda_kernels(ft):
    """Compile-on-first-launch CUDA (forward, backward) for the float type ft."""
    global cuda  # a module global, so the simulator can swap in its fake `cuda` while a kernel runs
    if not hasattr(np, "row_stack"):
        # numba-cuda (0.30.4 and older) registers an overload of np.row_stack when it compiles its first kernel;
        # NumPy 2.5 removed that alias of np.vstack, so every compile would fail with an AttributeError
        np.row_stack = np.vstack
    from numba import cuda
    # small calls (one decoded token, a tiny map) launch a few blocks by nature: numba's per-launch low-occupancy
    # warning says nothing actionable there
    warnings.filterwarnings("ignore", message=r".*Grid size \d+ will likely result in GPU under-utilization")

    device = cuda.jit(device=True)
    footprint, weights, grads = device(_footprint), device(_weights), device(_grads)

    @cuda.jit
    def forward(value, shapes, starts, loc, attn, out):
        B, _, M, D = value.shape
        Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
        i = cuda.grid(1)  # thread i computes out[b, q, m, c]
        if i >= B * Q * M * D:
            return
        b, q, m, c = i // (Q * M * D), i // (M * D) % Q, i // D % M, i % D
        acc = ft(0.0)
        for l in range(L):
            h, w, start = shapes[l, 0], shapes[l, 1], starts[l]
            for p in range(P):
                a = attn[b, q, m, l, p]
                ok, r1, r2, r3, r4, k1, k2, k3, k4, lw, lh = footprint(
                    loc[b, q, m, l, p, 0], loc[b, q, m, l, p, 1], start, h, w, ft)
                if ok and a != ft(0.0):  # a zero-weight sample is skipped, as on the CPU
                    w1, w2, w3, w4 = weights(lw, lh, k1, k2, k3, k4, ft)
                    acc += a * (w1 * value[b, r1, m, c] + w2 * value[b, r2, m, c]
                                + w3 * value[b, r3, m, c] + w4 * value[b, r4, m, c])
        out[b, q, m, c] = acc

    @cuda.jit
    def backward(value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn):
        B, _, M, D = value.shape
        Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
        i = cuda.grid(1)  # thread i handles the sample (b, q, m, l, p)
        if i >= B * Q * M * L * P:
            return
        b, q, m, l, p = i // (Q * M * L * P), i // (M * L * P) % Q, i // (L * P) % M, i // P % L, i % P
        h, w, start = shapes[l, 0], shapes[l, 1], starts[l]
        ok, r1, r2, r3, r4, k1, k2, k3, k4, lw, lh = footprint(
            loc[b, q, m, l, p, 0], loc[b, q, m, l, p, 1], start, h, w, ft)
        if not ok:
            return  # the three gradients of a skipped sample stay 0
        a = attn[b, q, m, l, p]
        live = a != ft(0.0)  # a zero-weight sample adds nothing to grad_value, as on the CPU
        w1, w2, w3, w4 = weights(lw, lh, k1, k2, k3, k4, ft)
        w1, w2, w3, w4 = a * w1, a * w2, a * w3, a * w4
        s1 = s2 = s3 = s4 = ft(0.0)
        for c in range(D):  # the channel reduction is this loop: correct for any D
            gc = grad_out[b, q, m, c]
            s1 += gc * value[b, r1, m, c]
            s2 += gc * value[b, r2, m, c]
            s3 += gc * value[b, r3, m, c]
            s4 += gc * value[b, r4, m, c]
            if live and k1 != 0:  # other samples hit the same corners: atomics; off-map corners are skipped
                cuda.atomic.add(grad_value, (b, r1, m, c), w1 * gc)
            if live and k2 != 0:
                cuda.atomic.add(grad_value, (b, r2, m, c), w2 * gc)
            if live and k3 != 0:
                cuda.atomic.add(grad_value, (b, r3, m, c), w3 * gc)
            if live and k4 != 0:
                cuda.atomic.add(grad_value, (b, r4, m, c), w4 * gc)
        ga, gx, gy = grads(s1, s2, s3, s4, k1, k2, k3, k4, lw, lh, a, h, w, ft)
        grad_attn[b, q, m, l, p] = ga
        grad_loc[b, q, m, l, p, 0] = gx
        grad_loc[b, q, m, l, p, 1] = gy

    return forward, backward


# ----------------------------------------------------------------------------------------------------------------
# launch: torch tensors in, kernels run in place on their memory


def _cuda_simulated():
    return bool(numba.config.ENABLE_CUDASIM)


def _launch(target, which, n, tensors):
    """Run kernel `which` (0 forward, 1 backward) over n work items; tensors[0] is the value in the working dtype."""
    if n == 0:
        return
    ft = np.float64 if tensors[0].dtype == torch.float64 else np.float32
    if target == "cpu":
        # as many threads as torch uses (never more than numba's pool); fewer for small calls, where waking threads
        # costs more than it saves. numba's own thread pool is used (see _THREADING_LAYER), so torch's is untouched.
        threads = min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())
        work = tensors[4].numel() * tensors[0].shape[3]  # samples × channels
        arrays = [t.numpy() for t in tensors]
        if which == 0:  # the forward reads value head-major (see the module docstring)
            head_major = tensors[0].transpose(1, 2)                                      # (B, M, S, D) view
            # copy it only when a head's Q·Lv·P samples amortise copying its S rows (not when decoding one token)
            few = tensors[4][0, :, 0].numel() < tensors[0].shape[1]
            arrays[0] = (head_major if few else head_major.contiguous()).numpy()
        saved = numba.get_num_threads()
        numba.set_num_threads(max(1, min(threads, work // _CPU_GRAIN)))
        try:
            (_cpu_forward, _cpu_backward)[which](*arrays, ft)
        finally:
            numba.set_num_threads(saved)
        return
    kernel = _cuda_kernels(ft)[which]
    blocks = (n + _CUDA_THREADS - 1) // _CUDA_THREADS
    if _cuda_simulated():  # the simulator runs kernels on host arrays
        kernel[blocks, _CUDA_THREADS](*(t.numpy() for t in tensors))
        return
    device = tensors[0].device
    with cuda.gpus[device.index if device.index is not None else torch.cuda.current_device()]:
        stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)  # stay ordered with torch
        # detach: torch refuses __cuda_array_interface__ on tensors that require grad (autograd is off in here)
        arrays = [cuda.as_cuda_array(t.detach(), sync=False) for t in tensors]
        kernel[blocks, _CUDA_THREADS, stream](*arrays)


def _working(t):
    """float16 / bfloat16 -> float32 (accumulate in float32); float32 / float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class MSDAFunction(torch.autograd.Function):
    """Autograd wrapper; `target` is "cpu" or "cuda" (tests pass "cuda" with CPU tensors under the simulator)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, target):
        ctx.target = target
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        v, loc, attn = _working(value), _working(sampling_locations), _working(attention_weights)
        shapes, starts = spatial_shapes.long(), level_start_index.long()
        B, _, M, D = v.shape
        Q = loc.shape[1]
        out = v.new_zeros(B, Q, M, D)  # (B, Q, M, D)
        _launch(target, 0, out.numel(), (v, shapes, starts, loc, attn, out))
        return out.view(B, Q, M * D).to(value.dtype)  # (B, Q, M·D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        v, loc, attn = _working(value), _working(sampling_locations), _working(attention_weights)
        shapes, starts = spatial_shapes.long(), level_start_index.long()
        B, _, M, D = v.shape
        g = grad_out.to(v.dtype).contiguous().view(B, loc.shape[1], M, D)  # (B, Q, M, D)
        # the CPU backward writes every entry of grad_value; the CUDA one adds into it
        grad_value = torch.empty_like(v) if ctx.target == "cpu" and attn.numel() else torch.zeros_like(v)
        grad_loc, grad_attn = torch.zeros_like(loc), torch.zeros_like(attn)
        _launch(ctx.target, 1, attn.numel(), (v, shapes, starts, loc, attn, g, grad_value, grad_loc, grad_attn))
        return (grad_value.to(value.dtype), None, None, grad_loc.to(sampling_locations.dtype),
                grad_attn.to(attention_weights.dtype), None)


# ----------------------------------------------------------------------------------------------------------------
# public functions


def supports(value):
    """True when a fused kernel exists for this tensor's device and dtype."""
    if value.dtype not in _FLOATS:
        return False
    if value.device.type == "cpu":
        return True
    if value.device.type != "cuda":
        return False
    if _cuda_simulated():
        return True
    from numba import cuda as numba_cuda

    return numba_cuda.is_available()


def _shape(t):
    return tuple(t.shape)


def check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Raise a one-line ValueError naming the argument when the five MSDA inputs do not fit together."""
    args = dict(value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                sampling_locations=sampling_locations, attention_weights=attention_weights)
    layouts = dict(value="(B, S, M, D)", spatial_shapes="(Lv, 2)", level_start_index="(Lv,)",
                   sampling_locations="(B, Q, M, Lv, P, 2)", attention_weights="(B, Q, M, Lv, P)")
    ranks = dict(value=4, spatial_shapes=2, level_start_index=1, sampling_locations=6, attention_weights=5)
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"msda: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ranks[name]:
            raise ValueError(f"msda: {name} must be {layouts[name]}, got shape {_shape(t)}")
    if value.dtype not in _FLOATS:
        raise ValueError(f"msda: value must be float16/bfloat16/float32/float64, got {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if args[name].dtype != value.dtype:
            raise ValueError(f"msda: {name} has dtype {args[name].dtype} but value has {value.dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        if args[name].dtype.is_floating_point or args[name].dtype.is_complex or args[name].dtype == torch.bool:
            raise ValueError(f"msda: {name} must be an integer tensor, got {args[name].dtype}")
    for name, t in args.items():
        if t.device != value.device:
            raise ValueError(f"msda: {name} is on {t.device} but value is on {value.device}")
        if not t.is_contiguous():
            raise ValueError(f"msda: {name} must be contiguous, got shape {_shape(t)} with strides {t.stride()}")
    B, S, M, D = value.shape
    Lv = spatial_shapes.shape[0]
    if M == 0 or D == 0:
        raise ValueError(f"msda: value {layouts['value']} needs M >= 1 heads and D >= 1 channels, got {_shape(value)}")
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"msda: spatial_shapes must be (Lv, 2) rows of (H, W), got shape {_shape(spatial_shapes)}")
    if _shape(level_start_index) != (Lv,):
        raise ValueError(f"msda: level_start_index has shape {_shape(level_start_index)} but spatial_shapes "
                         f"{_shape(spatial_shapes)} gives Lv={Lv}")
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    expect = dict(sampling_locations=(B, Q, M, Lv, P, 2), attention_weights=(B, Q, M, Lv, P))
    for name, want in expect.items():
        if _shape(args[name]) != want:
            raise ValueError(f"msda: {name} has shape {_shape(args[name])}, expected {layouts[name]} = {want} from "
                             f"value {_shape(value)}, spatial_shapes {_shape(spatial_shapes)} and "
                             f"sampling_locations {_shape(sampling_locations)}")
    hw = [tuple(s) for s in spatial_shapes.tolist()]
    if any(h < 1 or w < 1 for h, w in hw):
        raise ValueError(f"msda: spatial_shapes must hold positive (H, W), got {hw}")
    if sum(h * w for h, w in hw) != S:
        raise ValueError(f"msda: spatial_shapes {hw} cover {sum(h * w for h, w in hw)} positions but value "
                         f"{_shape(value)} has S={S}")
    starts = [sum(h * w for h, w in hw[:l]) for l in range(Lv)]
    if level_start_index.tolist() != starts:
        raise ValueError(f"msda: level_start_index {level_start_index.tolist()} does not match spatial_shapes {hw} "
                         f"(expected {starts})")


def msda_fused(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable sampling by the fused kernel; same arguments and result as mmfs.msda_reference."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not supports(value):
        raise ValueError(f"msda_fused: no fused kernel for value on {value.device} with dtype {value.dtype}")
    target = "cuda" if value.device.type == "cuda" else "cpu"
    return MSDAFunction.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                              target)
