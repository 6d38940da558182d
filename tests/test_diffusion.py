"""diffusion.py against diffusers' DDPMScheduler / DDIMScheduler (SD-2.1-base settings), plus CFG and bad input.

Tolerances: with "float64 oracle" the diffusers scheduler is handed our float64 alphas_cumprod, so only the step
arithmetic is compared (1e-12). With diffusers' own float32 alphas_cumprod (relative error <= 1e-6 after the
1000-term cumprod, and ~1e-4 in 1 - alpha-bar near t = 0, which x0-prediction divides by) the comparison allows
1e-4 (absolute and relative), still in float64 tensors.
"""
import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import diffusion as D
from weights import WeightsError

F64 = torch.float64
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False)
TIGHT = dict(rtol=1e-12, atol=1e-12)
LOOSE = dict(rtol=1e-4, atol=1e-4)
# the authors' scheduler_config.json of stable-diffusion-2-1-base (a PNDM config; they build DDPM from it)
SD21_JSON = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def oracle(sampler, schedule=None, float64=False, **kw):
    """A diffusers scheduler with SD-2.1-base settings; float64=True swaps in our float64 alphas_cumprod."""
    if sampler == "ddpm":
        sched = DDPMScheduler(**{**SD, **kw})
    else:
        sched = DDIMScheduler(**{**SD, "set_alpha_to_one": False, **kw})
    if float64:
        a = schedule.alphas_cumprod.clone()
        sched.alphas_cumprod, sched.one = a, torch.tensor(1.0, dtype=F64)
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=F64) if schedule.set_alpha_to_one else a[0].clone()
    return sched


# ------------------------------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("kw", [{}, dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)])
def test_alphas_cumprod_match_diffusers(kw):
    ours = D.Schedule(**kw).alphas_cumprod
    assert ours.dtype == F64 and ours.shape == (1000,)
    assert_close(ours, DDPMScheduler(**{**SD, **kw}).alphas_cumprod.double(), rtol=2e-6, atol=0)
    b0, b1 = (kw.get("beta_start", 0.00085), kw.get("beta_end", 0.012))
    betas = np.linspace(b0, b1, 1000) if kw else np.linspace(b0 ** 0.5, b1 ** 0.5, 1000) ** 2
    assert_close(ours, torch.from_numpy(np.cumprod(1 - betas)), **TIGHT)


def test_trained_betas():
    betas = torch.linspace(1e-4, 0.02, 10, dtype=F64)
    s = D.Schedule(num_train_timesteps=10, trained_betas=betas.tolist())
    assert_close(s.alphas_cumprod, torch.cumprod(1 - betas, 0), **TIGHT)


@pytest.mark.parametrize("spacing", D.SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 30, 50, 250, 999])
def test_timesteps_match_diffusers(spacing, steps):
    s = D.Schedule(timestep_spacing=spacing)
    for sampler in D.SAMPLERS:
        sched = oracle(sampler, timestep_spacing=spacing)
        sched.set_timesteps(steps)
        assert D.timesteps(s, steps) == sched.timesteps.tolist()


def test_timesteps_known_values():
    """Reference §5.5: leading spacing + steps_offset 1."""
    ts = D.timesteps(D.Schedule(), 30)
    assert ts[:2] == [958, 925] and ts[-2:] == [34, 1]
    ts = D.timesteps(D.Schedule(), 250)
    assert ts[:2] == [997, 993] and ts[-2:] == [5, 1]


@settings(deadline=None, max_examples=40)
@given(steps=st.integers(1, 999), spacing=st.sampled_from(D.SPACINGS))
def test_timesteps_property(steps, spacing):
    """Always `steps` distinct descending timesteps in [0, T); equal to diffusers wherever its list is well-formed."""
    ts = D.timesteps(D.Schedule(timestep_spacing=spacing), steps)
    assert len(ts) == steps and all(a > b for a, b in zip(ts, ts[1:])) and 0 <= ts[-1] and ts[0] < 1000
    sched = oracle("ddpm", timestep_spacing=spacing)
    sched.set_timesteps(steps)
    theirs = sched.timesteps.tolist()
    if len(theirs) == steps:
        assert ts == theirs
    else:  # float arange in diffusers' "trailing" adds a final -1 for some step counts
        assert spacing == "trailing" and theirs == ts + [-1]


# ------------------------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_config_from_save_pretrained(tmp_path, sampler):
    sched = oracle(sampler, prediction_type="v_prediction")
    sched.save_pretrained(tmp_path / "sd" / "scheduler")
    want = D.Schedule(prediction_type="v_prediction")
    for path in ("sd", "sd/scheduler", "sd/scheduler/scheduler_config.json"):
        got = D.Schedule.from_pretrained(tmp_path / path)
        assert got == want
        assert_close(got.alphas_cumprod, sched.alphas_cumprod.double(), rtol=2e-6, atol=0)
    got = D.Schedule.from_pretrained(tmp_path / "sd", prediction_type="epsilon")
    assert got == D.Schedule()


def test_config_sd21_json_and_roundtrip(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD21_JSON))
    assert D.Schedule.from_pretrained(tmp_path) == D.Schedule() == D.PRESETS["paper"]
    small = D.PRESETS["small"]
    assert D.Schedule.from_config(json.loads(json.dumps(small.to_config()))) == small


# ------------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("float64", [True, False])
def test_q_sample_and_targets_match_diffusers(float64):
    s = D.Schedule()
    sched = oracle("ddpm", s, float64=float64)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g, dtype=F64), torch.randn(4, 3, 5, 5, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 500, 999])
    tol = TIGHT if float64 else LOOSE
    assert_close(D.q_sample(x0, t, noise, s), sched.add_noise(x0, noise, t), **tol)
    assert_close(D.training_target(x0, noise, t, s, "v_prediction"), sched.get_velocity(x0, noise, t), **tol)
    assert torch.equal(D.training_target(x0, noise, t, s), noise)
    assert torch.equal(D.training_target(x0, noise, t, s, "sample"), x0)
    x32 = D.q_sample(x0.float(), t, noise.float(), s)
    assert x32.dtype == torch.float32
    assert_close(x32, sched.add_noise(x0.float(), noise.float(), t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_predict_x0_eps_inverts_target(prediction_type):
    s = D.Schedule()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 3, 4, 4, generator=g, dtype=F64), torch.randn(5, 3, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 10, 300, 700, 999])
    x_t = D.q_sample(x0, t, noise, s)
    target = D.training_target(x0, noise, t, s, prediction_type)
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_hat, eps_hat = D.predict_x0_eps(target, x_t, a, prediction_type)
    assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    assert_close(eps_hat, noise, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_output_from_x0_is_the_output_that_predicts_that_x0(prediction_type):
    """output_from_x0 inverts predict_x0_eps at any x and noise level: the output it gives predicts the x0 it was
    handed, with the eps that x0 leaves in x; and a true target maps back to itself (float64)."""
    s = D.Schedule()
    g = torch.Generator().manual_seed(2)
    x0, noise, x = (torch.randn(5, 3, 4, 4, generator=g, dtype=F64) for _ in range(3))
    t = torch.tensor([0, 10, 300, 700, 999])
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    out = D.output_from_x0(x0, x, a, prediction_type)
    x0_back, eps_back = D.predict_x0_eps(out, x, a, prediction_type)
    assert_close(x0_back, x0, rtol=1e-9, atol=1e-9)
    assert_close(eps_back, (x - a.sqrt() * x0) / (1 - a).sqrt(), rtol=1e-9, atol=1e-9)
    x_t = D.q_sample(x0, t, noise, s)
    target = D.training_target(x0, noise, t, s, prediction_type)
    assert_close(D.output_from_x0(x0, x_t, a, prediction_type), target, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_min_snr_weight(prediction_type):
    """weight * |d target|^2 == min(SNR, gamma) * |d x0|^2 for any prediction error (Hang et al. 2023)."""
    s = D.Schedule()
    t = torch.tensor([0, 5, 100, 400, 999])
    a = oracle("ddpm").alphas_cumprod[t]  # float32: 1 - alpha-bar loses ~5 digits at t = 0 (1 - 0.99915)
    assert_close(D.snr(t, s), a / (1 - a), rtol=5e-5, atol=0)
    g = torch.Generator().manual_seed(2)
    x0, noise, err = (torch.randn(5, 2, 3, 3, generator=g, dtype=F64) for _ in range(3))
    x_t, a = D.q_sample(x0, t, noise, s), s.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = D.training_target(x0, noise, t, s, prediction_type)
    x0_hat, _ = D.predict_x0_eps(target + err, x_t, a, prediction_type)
    w = D.min_snr_weight(t, s, gamma=5.0, prediction_type=prediction_type, dtype=F64)
    lhs = w * err.pow(2).flatten(1).mean(1)
    rhs = D.snr(t, s, dtype=F64).clamp(max=5.0) * (x0_hat - x0).pow(2).flatten(1).mean(1)
    assert_close(lhs, rhs, rtol=1e-9, atol=0)
    assert torch.isfinite(w).all() and (w > 0).all()


@pytest.mark.parametrize("schedule", [D.Schedule(), D.PRESETS["small"]])
def test_elbo_weight_is_the_kl_of_the_reverse_step(schedule):
    """The ELBO's step-t term, KL(q(x_{t-1} | x_t, x0) || q(x_{t-1} | x_t, x0_hat)) with the posterior's variance
    (DDPM eq. 6-7), is |mu(x0) - mu(x0_hat)|^2 / (2 beta~_t) = elbo_weight(t) · |x0 - x0_hat|^2, mu's x0 coefficient
    being sqrt(a_{t-1}) beta_t / (1 - a_t): checked in float64 from the betas; t = 0 has no such term."""
    t = torch.tensor([1, 2, 50, 400, 999])
    betas = torch.as_tensor(schedule.betas, dtype=F64)
    a = torch.cumprod(1 - betas, 0)
    coef = a[t - 1].sqrt() * betas[t] / (1 - a[t])
    var = (1 - a[t - 1]) / (1 - a[t]) * betas[t]
    assert_close(D.elbo_weight(t, schedule), coef ** 2 / (2 * var), rtol=1e-9, atol=0)
    assert (D.elbo_weight(t, schedule) > 0).all()
    with pytest.raises(ValueError, match="start at 1"):
        D.elbo_weight(torch.tensor([0, 5]), schedule)


@settings(max_examples=40, deadline=None)
@given(levels=st.integers(1, 50), draws=st.integers(1, 3), T=st.sampled_from([100, 999, 1000]))
def test_spread_timesteps_are_the_middles_of_equal_parts(levels, draws, T):
    """The caption check's timesteps: one in each of `levels` equal parts of [0, T), at its middle, repeated `draws`
    times; never 0 (elbo_weight refuses it), so the ELBO estimate has a term at every one."""
    t = D.spread_timesteps(T, levels, draws)
    assert t.dtype == torch.int64 and t.shape == (levels * draws,) and torch.equal(t, t[:levels].repeat(draws))
    edges = torch.arange(levels + 1, dtype=F64) * T / levels
    assert ((edges[:-1] <= t[:levels]) & (t[:levels] < edges[1:])).all() and (t[:levels].diff() > 0).all()
    assert ((t[:levels] - (edges[:-1] + edges[1:]) / 2).abs() <= 0.5).all() and (t >= 1).all()
    assert D.spread_timesteps(1000, 10, 2).tolist() == list(range(50, 1000, 100)) * 2  # eval.py's check


def test_sample_timesteps():
    s = D.Schedule()
    t1 = D.sample_timesteps(4096, s, torch.Generator().manual_seed(3))
    t2 = D.sample_timesteps(4096, s, torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and t1.dtype == torch.int64 and t1.shape == (4096,)
    assert 0 <= t1.min() < 10 and 990 <= t1.max() < 1000
    assert not torch.equal(t1, D.sample_timesteps(4096, s, torch.Generator().manual_seed(4)))


@settings(max_examples=40, deadline=None)
@given(draws=st.integers(1, 7), T=st.sampled_from([1, 10, 999, 1000]), seed=st.integers(0, 2**31 - 1))
def test_stratified_timesteps_put_draw_r_in_the_rth_part(draws, T, seed):
    """Draw r lies in [floor(r T / R), ceil((r + 1) T / R)) and in [0, T), the same for the same generator seed."""
    s = D.Schedule(num_train_timesteps=T)
    t = D.stratified_timesteps(draws, 512, s, torch.Generator().manual_seed(seed))
    assert t.shape == (draws, 512) and t.dtype == torch.int64
    assert torch.equal(t, D.stratified_timesteps(draws, 512, s, torch.Generator().manual_seed(seed)))
    for r in range(draws):
        lo, hi = (r * T) // draws, -(-(r + 1) * T // draws)
        assert (t[r] >= lo).all() and (t[r] < min(hi, T)).all(), (r, lo, hi, t[r].min(), t[r].max())


def test_stratified_timesteps_are_uniform_over_all_draws():
    """Pooled over the draws, t is uniform on [0, T): each of 10 bins of 100 timesteps holds 1/10 of 2 x 50000."""
    t = D.stratified_timesteps(2, 50_000, D.Schedule(), torch.Generator().manual_seed(0))
    counts = torch.bincount(t.flatten() // 100, minlength=10).double() / t.numel()
    assert (counts - 0.1).abs().max() < 0.006  # 4.5 standard errors of a bin's share (sqrt(.09 / 1e5) = 0.00095)
    assert (t[0] < 500).all() and (t[1] >= 500).all()


@given(st.lists(st.integers(1, 4), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_stratified_timesteps_with_parts_stratify_each_example_over_its_own_draws(parts, seed):
    """parts[i] = n: example i's first n draws lie in the n parts of [0, T) in order, its later ones are T - 1;
    parts equal to draws everywhere is the default."""
    s, R = D.Schedule(num_train_timesteps=1000), max(parts)
    n = torch.tensor(parts)
    t = D.stratified_timesteps(R, len(parts), s, torch.Generator().manual_seed(seed), parts=n)
    for i, k in enumerate(parts):
        for r in range(k):
            assert (r * 1000) // k <= t[r, i] < -(-(r + 1) * 1000 // k), (k, r, t[:, i])
        assert (t[k:, i] == 999).all()
    full = D.stratified_timesteps(R, len(parts), s, torch.Generator().manual_seed(seed), parts=torch.full_like(n, R))
    assert torch.equal(full, D.stratified_timesteps(R, len(parts), s, torch.Generator().manual_seed(seed)))


@settings(max_examples=40, deadline=None)
@given(draws=st.integers(1, 4), mean=st.floats(-2, 2), std=st.floats(0.2, 3), seed=st.integers(0, 2**31 - 1))
def test_logit_normal_timesteps_put_draw_r_in_the_rth_part_of_its_mass(draws, mean, std, seed):
    """With logit_normal (m, s), draw r lies between the density's r/R and (r+1)/R quantiles, T sigmoid(m + s
    Phi^-1(q)) (float64 here; one step of slack for the float rounding at a bound), and the generator's use is the
    uniform sampler's: the same u, another map."""
    s, T = D.Schedule(), 1000
    t = D.stratified_timesteps(draws, 256, s, torch.Generator().manual_seed(seed), logit_normal=(mean, std))
    assert t.shape == (draws, 256) and t.dtype == torch.int64 and (t >= 0).all() and (t < T).all()
    q = torch.arange(draws + 1, dtype=F64) / draws
    edge = T * torch.sigmoid(mean + std * torch.special.ndtri(q))                      # (R + 1,) the quantiles
    for r in range(draws):
        assert (t[r] >= edge[r].floor() - 1).all() and (t[r] <= edge[r + 1].ceil()).all(), (r, edge, t[r])
    uniform = D.stratified_timesteps(draws, 256, s, torch.Generator().manual_seed(seed))
    # a monotone map of the same u: wherever the uniform draws rise from one example to the next, these do not fall
    assert (torch.sign(t[:, 1:] - t[:, :-1]) * torch.sign(uniform[:, 1:] - uniform[:, :-1]) >= 0).all()


def test_logit_normal_timesteps_follow_its_cdf():
    """Pooled over 2 x 50000 draws of (m, s) = (-0.2, 1), the share below t = k is Phi((logit(k / T) - m) / s)."""
    t = D.stratified_timesteps(2, 50_000, D.Schedule(), torch.Generator().manual_seed(0), logit_normal=(-0.2, 1.0))
    for k in (100, 300, 450, 600, 900):
        want = 0.5 * (1 + math.erf((math.log(k / (1000 - k)) + 0.2) / math.sqrt(2)))
        assert abs(float((t < k).double().mean()) - want) < 0.006, k  # about 4 standard errors of a share
    assert (t[0] < 451).all() and (t[1] >= 449).all()  # the strata split at the median, T sigmoid(-0.2) = 450.2


# ------------------------------------------------------------------------------------------------- samplers

CASES = [("ddpm", 0.0, "leading"), ("ddim", 0.0, "leading"), ("ddim", 1.0, "leading"), ("ddpm", 0.0, "trailing"),
         ("ddpm", 0.0, "linspace")]


@pytest.mark.parametrize("float64", [True, False], ids=["float64_oracle", "float32_oracle"])
@pytest.mark.parametrize("steps", [1, 7, 30])
@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
@pytest.mark.parametrize("sampler,eta,spacing", CASES)
def test_step_parity(sampler, eta, spacing, prediction_type, steps, float64):
    """Same model outputs and noise: each of our steps equals diffusers' step."""
    s = D.Schedule(prediction_type=prediction_type, timestep_spacing=spacing)
    sched = oracle(sampler, s, float64=float64, prediction_type=prediction_type, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    ts = D.timesteps(s, steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=F64)
    for i, t in enumerate(ts):
        out = torch.randn(x.shape, generator=g, dtype=F64)
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i), dtype=F64)
        step_gen = torch.Generator().manual_seed(100 + i)
        if sampler == "ddpm":
            want = sched.step(out, t, x, generator=step_gen).prev_sample
            got = D.ddpm_step(out, x, t, prev_t, s, noise)
        else:
            want = sched.step(out, t, x, eta=eta, generator=step_gen).prev_sample
            got = D.ddim_step(out, x, t, prev_t, s, eta, noise)
        assert torch.isfinite(got).all()
        assert_close(got, want, **(TIGHT if float64 else LOOSE))
        x = got


def test_guide_and_cfg_model():
    g = torch.Generator().manual_seed(5)
    c, u = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    assert D.guide(c, u, 1.0) is c
    assert_close(D.guide(c, u, 7.5), u + 7.5 * (c - u))
    calls = []

    def model(x, t, context, feats, mask):
        calls.append((x, t, context, feats, mask))
        return x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    B = 3
    x, t = torch.randn(B, 2, 4, 4, generator=g), torch.full((B,), 7)
    cond, uncond = torch.randn(B, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    feats, mask = [torch.randn(B, 1, 6, generator=g)], torch.ones(B, 1)
    out_c, out_u = D.cfg_model(model, cond, uncond, feats=feats, mask=mask)(x, t)
    assert len(calls) == 1  # one batched call
    x2, t2, ctx2, feats2, mask2 = calls[0]
    assert torch.equal(ctx2[:B], uncond.expand(B, 5, 8)) and torch.equal(ctx2[B:], cond)  # uncond first
    assert torch.equal(x2, torch.cat([x, x])) and torch.equal(t2, torch.cat([t, t]))
    assert torch.equal(feats2[0], torch.cat([feats[0], feats[0]])) and mask2.shape == (2 * B, 1)
    assert_close(out_c, model(x, t, cond, feats, mask))
    assert_close(out_u, model(x, t, uncond.expand(B, 5, 8), feats, mask))


def toy_model(x, t, context):
    """A deterministic stand-in for the UNet, depending on x, t and the context."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return 0.4 * x + torch.sin(t.to(x.dtype) / 300).view(shape) + context.mean(dim=(1, 2)).view(shape).to(x.dtype)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_sample_loop_matches_diffusers_hand_loop(sampler, eta):
    """Our `sample` with CFG equals a pipeline-style loop over diffusers' scheduler, pixel-space RGB."""
    s = D.Schedule(prediction_type="v_prediction")
    g = torch.Generator().manual_seed(6)
    cond, uncond = torch.randn(2, 4, 6, generator=g, dtype=F64), torch.randn(1, 4, 6, generator=g, dtype=F64)
    shape, steps, scale = (2, 3, 8, 8), 10, 3.0
    seen = []
    got = D.sample(D.cfg_model(toy_model, cond, uncond), shape, s, steps=steps, sampler=sampler, eta=eta,
                   guidance=scale, generator=torch.Generator().manual_seed(7), dtype=F64,
                   callback=lambda i, t, x: seen.append((i, t)))
    assert seen == list(enumerate(D.timesteps(s, steps)))

    sched = oracle(sampler, s, float64=True, prediction_type="v_prediction")
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(7)
    x = randn_tensor(shape, generator=gen, dtype=F64)
    context = torch.cat([uncond.expand(2, 4, 6), cond])
    for t in sched.timesteps:
        out_u, out_c = toy_model(torch.cat([x, x]), t.expand(4), context).chunk(2)
        out = out_u + scale * (out_c - out_u)
        kw = dict(eta=eta) if sampler == "ddim" else {}
        x = sched.step(out, t, x, generator=gen, **kw).prev_sample
    assert torch.isfinite(got).all()
    assert_close(got, x, **TIGHT)


def test_sample_reproducible_any_shape_and_dtype():
    s = D.PRESETS["small"]
    fn = D.cfg_model(toy_model, torch.ones(3, 2, 2), torch.zeros(1, 2, 2))
    run = lambda seed, **kw: D.sample(fn, (3, 16), s, steps=5, guidance=2.0,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed), **kw)
    a, b = run(0), run(0)
    assert a.dtype == torch.float32 and a.shape == (3, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, run(1))
    z = torch.randn(3, 16, generator=torch.Generator().manual_seed(9))
    x1 = D.sample(lambda x, t: toy_model(x, t, torch.ones(3, 2, 2)), None, s, steps=4, sampler="ddim", x_T=z)
    x2 = D.sample(lambda x, t: toy_model(x, t, torch.ones(3, 2, 2)), None, s, steps=4, sampler="ddim", x_T=z)
    assert torch.equal(x1, x2) and x1.dtype == torch.float32  # eta = 0 from a given x_T needs no generator
    x3 = D.sample(lambda x, t: toy_model(x, t, torch.ones(3, 2, 2)), None, s, steps=4, sampler="ddim", x_T=z.double())
    assert x3.dtype == F64
    assert_close(x3, x1.double(), rtol=1e-5, atol=1e-5)


def test_sample_from_t_start_visits_it_then_the_grid_below():
    """t_start: the steps are t_start and the listed timesteps below it (SDEdit); t_start = the grid's first is the
    plain run from that x_T; without x_T or out of range it is refused."""
    s = D.PRESETS["small"]
    fn = lambda x, t: toy_model(x, t, torch.ones(3, 2, 2))  # noqa: E731
    z = torch.randn(3, 16, generator=torch.Generator().manual_seed(9))
    seen = []
    D.sample(fn, None, s, steps=20, sampler="ddim", x_T=z, t_start=500, callback=lambda i, t, x: seen.append(t))
    grid = D.timesteps(s, 20)
    assert seen == [500] + [t for t in grid if t < 500] and seen[:3] == [500, 499, 449]  # 499: the trailing grid's
    plain = D.sample(fn, None, s, steps=20, sampler="ddim", x_T=z)
    assert torch.equal(D.sample(fn, None, s, steps=20, sampler="ddim", x_T=z, t_start=grid[0]), plain)
    for bad in (dict(t_start=500), dict(x_T=z, t_start=1000), dict(x_T=z, t_start=-1)):
        with pytest.raises(ValueError, match="t_start"):
            D.sample(fn, (3, 16), s, steps=20, sampler="ddim", **bad)


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_sample_x0_fn_sees_each_estimate_and_steers_the_step(sampler):
    """x0_fn gets every step's x0 estimate after CFG, in order; returning it unchanged changes nothing, and returning a
    fixed frame F makes DDIM a known contraction toward F: x - sqrt(a) F shrinks by sqrt((1 - a') / (1 - a)) a
    step, whatever the model says, so the end is sqrt(a_0) F + sqrt((1 - a_0) / (1 - a_T)) (x_T - sqrt(a_T) F)."""
    s = D.PRESETS["small"]  # v-prediction, trailing spacing
    fn = D.cfg_model(toy_model, torch.ones(3, 2, 2, dtype=F64), torch.zeros(1, 2, 2, dtype=F64))
    z = torch.randn(3, 16, generator=torch.Generator().manual_seed(9), dtype=F64)
    run = lambda **kw: D.sample(fn, None, s, steps=6, sampler=sampler, guidance=2.0, x_T=z,  # noqa: E731
                                generator=torch.Generator().manual_seed(1), **kw)
    seen, xs = [], []
    plain = run(callback=lambda i, t, x: xs.append(x))
    assert torch.equal(run(x0_fn=lambda x0, t: seen.append((t, x0)) or x0), plain)
    grid = D.timesteps(s, 6)
    assert [t for t, _ in seen] == grid
    for (t, x0), x in zip(seen, [z] + xs):  # each estimate is the guided output's x0 at that step's x
        tt = torch.full((3,), t)
        out = D.guide(*fn(x, tt), 2.0)
        assert_close(x0, D.predict_x0_eps(out, x, s.alpha_bar(t), s.prediction_type)[0], rtol=1e-12, atol=1e-12)
    if sampler == "ddim":
        frame = torch.linspace(-1, 1, 16, dtype=F64).expand(3, 16)
        a_T, a_0 = s.alpha_bar(grid[0]), s.alpha_bar(0)
        want = a_0 ** 0.5 * frame + ((1 - a_0) / (1 - a_T)) ** 0.5 * (z - a_T ** 0.5 * frame)
        assert_close(run(x0_fn=lambda x0, t: frame), want, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_on_cuda_matches_cpu():
    """A CPU generator gives the same draws on any device, so the result matches the CPU run."""
    s = D.Schedule()
    fn = D.cfg_model(toy_model, torch.ones(2, 2, 2), torch.zeros(1, 2, 2))
    fn_cuda = D.cfg_model(toy_model, torch.ones(2, 2, 2, device="cuda"), torch.zeros(1, 2, 2, device="cuda"))
    cpu = D.sample(fn, (2, 4, 8, 8), s, steps=8, guidance=3.0, generator=torch.Generator().manual_seed(0))
    gpu = D.sample(fn_cuda, (2, 4, 8, 8), s, steps=8, guidance=3.0, generator=torch.Generator().manual_seed(0),
                   device="cuda")
    assert gpu.device.type == "cuda"
    assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------- bad input

def test_bad_options():
    x = torch.zeros(1, 2)
    t = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown prediction_type 'x0' \\(expected one of epsilon, v_prediction"):
        D.Schedule(prediction_type="x0")
    with pytest.raises(ValueError, match="unknown prediction_type 'eps'"):
        D.training_target(x, x, t, D.Schedule(), "eps")
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'"):
        D.Schedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="unknown timestep_spacing 'uniform'"):
        D.Schedule(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="unknown timestep spacing 'uniform'"):
        D.timesteps(D.Schedule(), 10, spacing="uniform")
    for steps in (0, 1001, 2.5):
        message = f"steps must be an int between 1 and num_train_timesteps=1000, got {steps}"
        with pytest.raises(ValueError, match=re.escape(message)):
            D.timesteps(D.Schedule(), steps)
    with pytest.raises(ValueError, match="steps=1000 with steps_offset=1 gives timestep 1000 >= num_train_timesteps"):
        D.timesteps(D.Schedule(), 1000)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        D.sample(lambda x, t: x, (1, 2), D.Schedule(), sampler="euler")
    with pytest.raises(ValueError, match="guidance=7.5 needs a model_fn that returns \\(cond_out, uncond_out\\)"):
        D.sample(lambda x, t: x, (1, 2), D.Schedule(), guidance=7.5)
    with pytest.raises(ValueError, match="eta must be in \\[0, 1\\], got 2"):
        D.sample(lambda x, t: x, (1, 2), D.Schedule(), sampler="ddim", eta=2)
    with pytest.raises(ValueError, match="ddpm_step at t=5 > 0 needs a noise tensor"):
        D.ddpm_step(x, x, 5, 4, D.Schedule())
    with pytest.raises(ValueError, match="beta_end must be a positive number"):
        D.Schedule(beta_end=-1)


def test_bad_config_files(tmp_path):
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(WeightsError, match=re.escape(f"{missing / 'scheduler_config.json'}: file not found")):
        D.Schedule.from_pretrained(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(WeightsError, match=re.escape(f"{bad}: not valid JSON")):
        D.Schedule.from_pretrained(bad)
    cases = {"list.json": ([1, 2], "expected a JSON object, got list"),
             "type.json": ({**SD21_JSON, "beta_start": "abc"}, "beta_start must be a positive number, got 'abc'"),
             "pred.json": ({**SD21_JSON, "prediction_type": "flow"}, "unknown prediction_type 'flow'"),
             "thr.json": ({**SD21_JSON, "thresholding": True}, "thresholding=True is not supported"),
             "var.json": ({**SD21_JSON, "variance_type": "learned"}, "unknown variance_type 'learned'")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: {message}")):
            D.Schedule.from_pretrained(tmp_path / name)
