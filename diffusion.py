"""Gaussian diffusion for the image decoder: noise schedule, training targets, DDPM / DDIM samplers and CFG.

Read bottom-up: the `Schedule` (betas and alphas_cumprod, as diffusers' `scheduler_config.json` describes them),
then training (`q_sample`, `training_target`, `min_snr_weight`), then one sampler step each (`ddpm_step`,
`ddim_step`), then classifier-free guidance (`guide`, `cfg_model`) and the loop `sample`.

Notation follows DDPM (Ho et al. 2020): a = alphas_cumprod[t] (alpha-bar), x_t = sqrt(a) x0 + sqrt(1 - a) eps.
The authors train with epsilon prediction and sample with diffusers' `DDPMScheduler` (SD-2.1-base settings,
"leading" spacing, steps_offset 1; reference §5.2 and §5.5); every number here reproduces diffusers'.
The schedule is kept in float64 and each step's coefficients are Python floats, so the functions work on any
device and dtype, and any tensor shape (SD latents or RGB pixels), with the batch on dim 0.
"""
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch

from weights import read_json

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("scaled_linear", "linear")
SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
SAMPLERS = ("ddpm", "ddim")
# diffusers config keys that we accept only at their default value (we do not implement the alternative)
_UNSUPPORTED = {"thresholding": False, "rescale_betas_zero_snr": False}


def _one_of(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r} (expected one of {', '.join(allowed)})")


@dataclass(frozen=True)
class Schedule:
    """The discrete noise schedule of DDPM (Ho et al. 2020) with diffusers' sampler settings; defaults = SD-2.1-base."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "scaled_linear": beta = linspace(sqrt(b0), sqrt(b1), T)^2 (SD)
    prediction_type: str = "epsilon"  # what the network outputs: "epsilon", "v_prediction" or "sample" (x0)
    timestep_spacing: str = "leading"  # how `timesteps` picks the sampling steps (diffusers' three rules)
    steps_offset: int = 1  # added to every "leading" timestep: 30 steps end at t = 1, not 0
    set_alpha_to_one: bool = False  # DDIM's last step goes to alpha-bar = 1 (True) or alphas_cumprod[0] (SD)
    clip_sample: bool = False  # clamp the predicted x0 to +-clip_sample_range in each step (SD: off)
    clip_sample_range: float = 1.0
    variance_type: str = "fixed_small"  # DDPM step noise: posterior variance (fixed_small) or beta_t (fixed_large)
    trained_betas: tuple | None = None  # explicit betas, overriding beta_schedule (rarely used)

    def __post_init__(self):
        _one_of(self.prediction_type, PREDICTION_TYPES, "prediction_type")
        _one_of(self.beta_schedule, BETA_SCHEDULES, "beta_schedule")
        _one_of(self.timestep_spacing, SPACINGS, "timestep_spacing")
        _one_of(self.variance_type, VARIANCE_TYPES, "variance_type")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {self.num_train_timesteps!r}")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative int, got {self.steps_offset!r}")
        for name in ("beta_start", "beta_end", "clip_sample_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(f"trained_betas has {len(self.trained_betas)} values, "
                                 f"num_train_timesteps is {self.num_train_timesteps}")
        for name in ("set_alpha_to_one", "clip_sample"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (0 < min(self.betas) and max(self.betas) < 1):
            raise ValueError(f"betas must lie in (0, 1), got {min(self.betas)}..{max(self.betas)}")

    @cached_property
    def betas(self):
        """beta_1..beta_T in float64 (scaled_linear is SD's; linear is DDPM's)."""
        if self.trained_betas is not None:
            return torch.tensor(self.trained_betas, dtype=torch.float64)
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float64)
        return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_train_timesteps,
                              dtype=torch.float64) ** 2

    @cached_property
    def alphas_cumprod(self):
        """alpha-bar_t = prod_{s <= t} (1 - beta_s), float64 on the CPU (DDPM eq. 4)."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    def alpha_bar(self, t):
        """alpha-bar at integer timestep t as a Python float; t < 0 means "before the first step" (alpha-bar = 1)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    @classmethod
    def from_config(cls, config, source="config"):
        """Build from a diffusers scheduler config dict (keys we do not use, like `_class_name`, are ignored)."""
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        for key, default in _UNSUPPORTED.items():
            if config.get(key, default) != default:
                raise ValueError(f"{source}: {key}={config[key]!r} is not supported")
        fields = {k: config[k] for k in cls.__dataclass_fields__ if config.get(k) is not None}
        try:
            return cls(**fields)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Read a diffusers `scheduler_config.json`: given the SD directory, its `scheduler/` folder or the file."""
        path = Path(path)
        if path.is_dir():
            nested = path / "scheduler" / "scheduler_config.json"
            path = nested if nested.is_file() else path / "scheduler_config.json"
        config = read_json(path)
        return cls.from_config({**config, **overrides} if isinstance(config, dict) else config, source=str(path))

    def to_config(self):
        """The fields as a JSON-ready dict (what `from_config` reads back)."""
        return {k: v for k, v in asdict(self).items() if not (k == "trained_betas" and v is None)}


# Suggested settings; the schedule itself costs nothing, so "tiny" equals "small".
# "small": pixel-space 32x32 frames: DDPM's linear betas, v-prediction (well-behaved at every noise level: its plain
# MSE keeps weight on the noisy steps where layout and colour are decided), "trailing" spacing so few-step sampling
# starts at t = T-1 (pure noise).
_SMALL = Schedule(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="v_prediction",
                  timestep_spacing="trailing", steps_offset=0)
PRESETS = {"tiny": _SMALL, "small": _SMALL, "paper": Schedule()}


@lru_cache(maxsize=16)
def _sqrt_table(schedule, device, dtype):
    """(2, T): sqrt(alpha-bar) and sqrt(1 - alpha-bar), computed in float64 and rounded once; cached per device."""
    a = schedule.alphas_cumprod
    return torch.stack([a.sqrt(), (1.0 - a).sqrt()]).to(device=device, dtype=dtype)


def _coefficients(schedule, t, like):
    """sqrt(alpha-bar_t) and sqrt(1 - alpha-bar_t) for a batch of timesteps t, shaped to broadcast against `like`."""
    table = _sqrt_table(schedule, like.device, like.dtype)
    t = torch.as_tensor(t, device=like.device).long().reshape(-1)
    coef = table[:, t].reshape(2, -1, *([1] * (like.dim() - 1)))  # (2, B, 1, ..., 1)
    return coef[0], coef[1]


# ---------------------------------------------------------------------------------------------------- training

def sample_timesteps(batch, schedule, generator=None, device=None):
    """t ~ U{0, ..., T-1}, one per example (DDPM Alg. 1, line 3)."""
    t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator,
                      device=generator.device if generator is not None else device)
    return t.to(device) if device is not None else t


def stratified_timesteps(draws, batch, schedule, generator=None, device=None, parts=None, logit_normal=None):
    """(draws, batch) timesteps, draw r of each example in the r-th of `draws` equal parts of [0, T): t =
    floor((r + u) T / draws) with u ~ U[0, 1). Over all draws t is still uniform on [0, T) (for T divisible by
    draws), but an example's draws cover the range evenly: stratified sampling, as VDM's low-discrepancy sampler
    spreads t across a batch (Kingma et al. 2021), so no step trains a condition at low noise alone.

    `parts` (batch,): an example that uses only its first n <= draws draws takes them from n parts instead; its
    later draws are T - 1 (unused). The same u, so parts = draws everywhere gives exactly the default.

    `logit_normal` (mean, std): t / T follows a logit-normal density instead of the uniform one (SD3's timestep
    sampling, Esser et al. 2024, §3.1): the strata are then equal parts of its probability mass, t = floor(T
    sigmoid(mean + std Phi^-1(p))) at p = (r + u) / n. Drawing t more often where the density is high weights the
    loss there, as a loss weight would (Kingma & Gao 2023)."""
    T = schedule.num_train_timesteps
    dev = generator.device if generator is not None else device
    u = torch.rand(draws, batch, generator=generator, device=dev, dtype=torch.float64)
    r = torch.arange(draws, device=dev, dtype=torch.float64)[:, None]
    n = draws if parts is None else parts.to(dev, torch.float64)                        # each example's parts
    if logit_normal is None:
        t = ((r + u) * T / n).floor().long().clamp(max=T - 1)                            # (draws, batch)
    else:
        mean, std = logit_normal
        # an unused draw (r >= its parts) has p > 1: at 1, ndtri gives +inf and t = T - 1 as above; p = 0 gives t = 0
        p = ((r + u) / n).clamp(max=1.0)
        t = (torch.sigmoid(mean + std * torch.special.ndtri(p)) * T).floor().long().clamp(max=T - 1)
    return t.to(device) if device is not None else t


def q_sample(x0, t, noise, schedule):
    """Forward process x_t = sqrt(a) x0 + sqrt(1 - a) eps (DDPM eq. 4); t is a (B,) tensor of timesteps."""
    sqrt_a, sqrt_1ma = _coefficients(schedule, t, x0)
    return sqrt_a * x0 + sqrt_1ma * noise


def training_target(x0, noise, t, schedule, prediction_type=None):
    """What the network regresses: eps, v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, sec. 4) or x0."""
    prediction_type = prediction_type or schedule.prediction_type
    _one_of(prediction_type, PREDICTION_TYPES, "prediction_type")
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    sqrt_a, sqrt_1ma = _coefficients(schedule, t, x0)
    return sqrt_a * noise - sqrt_1ma * x0


def predict_x0_eps(output, x, alpha_bar, prediction_type):
    """Turn a network output at noise level alpha_bar (float or broadcastable tensor) into (x0, eps) estimates."""
    _one_of(prediction_type, PREDICTION_TYPES, "prediction_type")
    sqrt_a, sqrt_1ma = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (x - sqrt_1ma * output) / sqrt_a, output
    if prediction_type == "sample":
        return output, (x - sqrt_a * output) / sqrt_1ma
    # v-prediction: x = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0 are a rotation of (x0, eps)
    return sqrt_a * x - sqrt_1ma * output, sqrt_a * output + sqrt_1ma * x


def output_from_x0(x0, x, alpha_bar, prediction_type):
    """The inverse of `predict_x0_eps`: the network output at x (noise level alpha_bar) whose x0 estimate is `x0`,
    with eps = (x - sqrt(a) x0) / sqrt(1 - a) the noise that x0 leaves in x. A sampler step fed this output moves as
    if the network had predicted that x0 (how `sample`'s x0_fn edits the prediction)."""
    _one_of(prediction_type, PREDICTION_TYPES, "prediction_type")
    sqrt_a, sqrt_1ma = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    eps = (x - sqrt_a * x0) / sqrt_1ma
    return {"epsilon": eps, "sample": x0, "v_prediction": sqrt_a * eps - sqrt_1ma * x0}[prediction_type]


def snr(t, schedule, dtype=torch.float32):
    """Signal-to-noise ratio alpha-bar_t / (1 - alpha-bar_t) per timestep, a (B,) tensor on t's device."""
    a = schedule.alphas_cumprod
    t = torch.as_tensor(t).long()
    return (a / (1.0 - a)).to(device=t.device, dtype=dtype)[t]


def elbo_weight(t, schedule, dtype=torch.float64):
    """The weight of ||x0 - x0_hat(x_t)||^2 in the ELBO's step-t term, 1/2 (SNR(t-1) - SNR(t)) (Ho et al. 2020 eq. 5,
    the KL between q(x_{t-1} | x_t, x0) and the model's step of the same variance; Kingma et al. 2021 eq. 13), per
    timestep t >= 1, a (B,) tensor on t's device. Summed over the T steps with the model's errors, it is -log p(x0)
    up to the first and last steps' terms, which do not depend on the condition."""
    t = torch.as_tensor(t).long()
    if (t < 1).any():
        raise ValueError("elbo_weight: timesteps start at 1 (the step from t = 0 is the decoder's term)")
    return 0.5 * (snr(t - 1, schedule, dtype) - snr(t, schedule, dtype))


def spread_timesteps(T, levels, draws=1):
    """The middles of `levels` equal parts of [0, T), the whole list `draws` times -> (levels · draws,) long: an even,
    fixed sample of the schedule for an ELBO estimate (model.py's drawing_nll), none at t = 0 for levels <= T / 2."""
    return torch.tensor([round((j + 0.5) * T / levels) for j in range(levels)] * draws)


def min_snr_weight(t, schedule, gamma=5.0, prediction_type=None, dtype=torch.float32):
    """Min-SNR-gamma loss weight (Hang et al. 2023): the MSE on the target, times this, is min(SNR, gamma) * |dx0|^2."""
    prediction_type = prediction_type or schedule.prediction_type
    _one_of(prediction_type, PREDICTION_TYPES, "prediction_type")
    s = snr(t, schedule, dtype=dtype)
    clipped = s.clamp(max=gamma)
    # |d eps|^2 = SNR |dx0|^2 and |dv|^2 = (SNR + 1) |dx0|^2, hence the denominators
    return {"epsilon": clipped / s, "v_prediction": clipped / (s + 1), "sample": clipped}[prediction_type]


# ---------------------------------------------------------------------------------------------------- sampling

def timesteps(schedule, steps, spacing=None):
    """The descending sampling timesteps by diffusers' three spacing rules (compared by Lin et al. 2024)."""
    spacing = spacing or schedule.timestep_spacing
    _one_of(spacing, SPACINGS, "timestep spacing")
    T = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int between 1 and num_train_timesteps={T}, got {steps!r}")
    if spacing == "leading":  # k * (T // steps) + offset: 30 steps give 958, 925, ..., 34, 1
        ts = [k * (T // steps) + schedule.steps_offset for k in reversed(range(steps))]
    elif spacing == "trailing":  # round(T - k * T / steps) - 1: always starts at T - 1
        # float arange as diffusers; for some step counts it yields one extra (negative) entry, which we drop
        ts = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps].tolist()
    else:  # evenly spread over [0, T-1], both ends included
        ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64).tolist()
    if ts[0] >= T:
        raise ValueError(f"steps={steps} with steps_offset={schedule.steps_offset} gives timestep {ts[0]} "
                         f">= num_train_timesteps={T}")
    return ts


def ddpm_step(output, x, t, prev_t, schedule, noise=None):
    """Ancestral step x_t -> x_prev_t via the posterior q(x_prev | x_t, x0_hat) (DDPM eqs. 6-7), as diffusers."""
    a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(prev_t)
    alpha_t = a_t / a_prev  # the one-step alpha of the (possibly strided) jump from prev_t to t
    beta_t = 1 - alpha_t
    x0, _ = predict_x0_eps(output, x, a_t, schedule.prediction_type)
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    mean = (a_prev ** 0.5 * beta_t / (1 - a_t)) * x0 + (alpha_t ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
    if t <= 0:  # the final step returns the mean
        return mean
    if noise is None:
        raise ValueError(f"ddpm_step at t={t} > 0 needs a noise tensor")
    if schedule.variance_type == "fixed_small":  # posterior variance beta-tilde (eq. 7), floored as diffusers
        variance = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
    else:
        variance = beta_t
    return mean + variance ** 0.5 * noise


def ddim_step(output, x, t, prev_t, schedule, eta=0.0, noise=None):
    """Generalised step of DDIM (Song et al. 2021, eq. 12): eta = 0 is deterministic, eta = 1 is DDPM-like."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    a_t = schedule.alpha_bar(t)
    # at the end of the chain SD (set_alpha_to_one=False) steps to alphas_cumprod[0], not to a clean x0
    a_prev = schedule.alpha_bar(prev_t) if prev_t >= 0 else 1.0 if schedule.set_alpha_to_one else schedule.alpha_bar(0)
    x0, eps = predict_x0_eps(output, x, a_t, schedule.prediction_type)
    if schedule.clip_sample:  # eps is kept as predicted, as diffusers' default use_clipped_model_output=False
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5  # eq. 16
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps  # "predicted x0" + "direction to x_t"
    if eta > 0:
        if noise is None:
            raise ValueError(f"ddim_step with eta={eta} > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev


def guide(cond_out, uncond_out, scale):
    """Classifier-free guidance (Ho & Salimans 2022): out_u + s (out_c - out_u); s = 1 returns out_c itself."""
    if scale == 1:
        return cond_out
    return uncond_out + scale * (cond_out - uncond_out)


def _twice(value):
    """Duplicate a batched input for the two CFG halves (tensors along dim 0, lists and tuples element-wise)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    if isinstance(value, (list, tuple)):
        return type(value)(_twice(v) for v in value)
    return value


def cfg_model(model, cond, uncond, **shared):
    """Wrap `model(x, t, context, **shared)` into a model_fn (x, t) -> (cond_out, uncond_out) of one batched call.

    The batch is [unconditional; conditional], as the authors; `uncond` may have batch 1 (a learned negative
    context) and is expanded. Tensors in `shared` (e.g. MMFS features and masks) are batched on dim 0 and sent
    unchanged to both halves. With guidance 1, pass the plain model to `sample` instead: half the work.
    """
    def model_fn(x, t):
        B = x.shape[0]
        if cond.shape[0] != B:
            raise ValueError(f"cfg_model: cond has batch {cond.shape[0]}, x has batch {B}")
        context = torch.cat([uncond.expand(B, *uncond.shape[1:]), cond])  # (2B, ...) uncond first
        extra = {k: _twice(v) for k, v in shared.items()}
        out = model(torch.cat([x, x]), torch.cat([t, t]), context, **extra)  # (2B, ...)
        out_u, out_c = out.chunk(2)  # (B, ...) each
        return out_c, out_u
    return model_fn


def _randn(shape, generator, device, dtype):
    """N(0, I) drawn on the generator's device (as diffusers' randn_tensor), so a seed gives the same draws."""
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


@torch.no_grad()
def sample(model_fn, shape, schedule, steps=30, sampler="ddpm", eta=0.0, guidance=1.0, generator=None,
           callback=None, x_T=None, spacing=None, device=None, dtype=None, t_start=None, x0_fn=None):
    """Draw x0 from noise with ancestral DDPM (Ho et al. 2020, Alg. 2) or DDIM (Song et al. 2021) and optional CFG.

    `model_fn(x, t)` gets x (B, ...) and t (B,) int64 and returns the prediction, or a (cond_out, uncond_out) pair
    that `guide` combines with `guidance` (see `cfg_model`). `callback(i, t, x)` runs after each step (a progress
    bar). Noise comes from `generator` only, in the order diffusers' pipeline draws it, so a seed reproduces a run.
    Start from `x_T` if given (then `shape` is ignored); x keeps `dtype` (default float32, or x_T's). With `t_start`,
    x_T is x at that timestep (an image noised by q_sample: SDEdit, Meng et al. 2022) and the steps are t_start, then
    the listed timesteps below it. `x0_fn(x0, t)`, if given, sees each step's x0 estimate (after guidance) and
    returns the one the step moves toward: Universal Guidance's "backward guidance" (Bansal et al. 2023) and MPGD
    (He et al. 2024) edit x0 so, without a gradient through the network; model.py's reading guidance is one.
    """
    _one_of(sampler, SAMPLERS, "sampler")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    ts = timesteps(schedule, steps, spacing)
    if t_start is not None:
        if x_T is None or not 0 <= t_start < schedule.num_train_timesteps:
            raise ValueError(f"t_start {t_start} needs x_T and a timestep in [0, {schedule.num_train_timesteps})")
        ts = [int(t_start)] + [t for t in ts if t < t_start]
    if x_T is None:
        x = _randn(tuple(shape), generator, device or "cpu", dtype or torch.float32)  # initial noise, sigma = 1
    else:
        x = x_T.to(device=device or x_T.device, dtype=dtype or x_T.dtype)
    for i, t in enumerate(ts):
        # the step goes to the next listed timestep (diffusers' DDPM rule); for "leading" spacing that is
        # t - T // steps, the rule of diffusers' DDIM, whose jumps differ slightly under the other spacings
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        out = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        if isinstance(out, (tuple, list)):
            out = guide(out[0], out[1], guidance)
        elif guidance != 1:
            raise ValueError(f"guidance={guidance} needs a model_fn that returns (cond_out, uncond_out); "
                             "wrap the model with cfg_model")
        out = out.to(x.dtype)
        if x0_fn is not None:  # edit the x0 estimate, then hand the step the output that predicts the edited one
            a_t = schedule.alpha_bar(t)
            x0, _ = predict_x0_eps(out, x, a_t, schedule.prediction_type)
            edited = x0_fn(x0, t)
            if edited is not x0:  # left alone, the step stays bit for bit the plain one (no round trip)
                out = output_from_x0(edited.to(x.dtype), x, a_t, schedule.prediction_type)
        if sampler == "ddpm":
            noise = _randn(x.shape, generator, x.device, x.dtype) if t > 0 else None
            x = ddpm_step(out, x, t, prev_t, schedule, noise)
        else:
            noise = _randn(x.shape, generator, x.device, x.dtype) if eta > 0 else None
            x = ddim_step(out, x, t, prev_t, schedule, eta, noise)
        if callback is not None:
            callback(i, t, x)
    return x
