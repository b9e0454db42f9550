"""Continuous-state diffusion: noise schedules, forward process and parameterizations.

Shared block B1 of the diffusion family (spec card `diffusion.md` section 0.2). Sources:

* Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020, arXiv:2006.11239
  (linear beta schedule 1e-4..0.02, T = 1000; the forward process q(x_t | x_0));
* Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021,
  arXiv:2102.09672 (cosine schedule, eq. 17);
* Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022,
  arXiv:2112.10752 (the "scaled_linear" schedule of Stable Diffusion);
* Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models",
  NeurIPS 2022, arXiv:2206.00364 (EDM sigma schedule, eq. 5);
* Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022,
  arXiv:2202.00512 (the v parameterization).

Forward process (variance preserving, discrete t in {0..T-1}, abar_t = prod_{s<=t} (1 - beta_s)):

  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I).

Parameterizations, with a = sqrt(abar), b = sqrt(1 - abar):

  x_0 = (x_t - b eps) / a,   eps = (x_t - a x_0) / b,   v = a eps - b x_0,
  eps = b x_t + a v,         x_0 = a x_t - b v.

Variance-exploding view (EDM): x = x_t / a = x_0 + sigma eps with sigma = b / a, so
abar = 1 / (1 + sigma^2) and SNR = abar / (1 - abar) = 1 / sigma^2.

Schedules:
  linear:        beta_t linear in t from beta_start to beta_end (DDPM: 1e-4, 0.02);
  scaled_linear: sqrt(beta_t) linear from sqrt(beta_start) to sqrt(beta_end) (SD: 0.00085,
                 0.012);
  cosine:        abar(t) = f(t) / f(0), f(t) = cos(((t / T + s) / (1 + s)) pi / 2)^2, s = 0.008,
                 with beta_t = 1 - abar(t + 1) / abar(t) clipped at 0.999 (improved-diffusion);
                 abar_t here is abar(t + 1) of the paper, so index 0 is already one step of
                 noise, as for the other schedules.
  karras:        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) -
                 sigma_max^(1/rho)))^rho, i = 0..N-1, then sigma_N = 0 (EDM defaults
                 0.002, 80, 7).

Timestep spacing for a sampler with N < T steps follows diffusers' `timestep_spacing`:
  leading  (default, diffusers' DDIM default and DDIM's "uniform" skip): t_i = (N-1-i) * (T // N)
           + offset;
  trailing: t_i = round(T - i * T / N) - 1 (always starts at T - 1);
  linspace: round(linspace(T - 1, 0, N)).

Differences from the papers' code:
* Everything is float32; schedules are built in float64 NumPy on the host (static, like
  diffusers' torch.float64 betas) and cast once.
* The cosine schedule's beta clip at 0.999 follows improved-diffusion; diffusers'
  `squaredcos_cap_v2` is the same schedule.
* `sigma_to_timestep` interpolates log sigma linearly between integer timesteps (diffusers'
  `_sigma_to_t`), giving fractional timesteps for an EDM sampler run on a discrete VP model.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v", "x0")


def _check_num_steps(name: str, n: int, minimum: int = 1) -> None:
  if not isinstance(n, (int, np.integer)) or n < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}; got {n!r}")


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """DDPM betas linear in t.

  Args:
    num_timesteps: T.
    beta_start: beta_0.
    beta_end: beta_{T-1}.

  Returns:
    float64 NumPy array [T].
  """
  _check_num_steps("num_timesteps", num_timesteps)
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> np.ndarray:
  """Stable Diffusion betas: sqrt(beta) linear in t. Returns float64 NumPy [T]."""
  _check_num_steps("num_timesteps", num_timesteps)
  return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008,
                 max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal cosine schedule as betas (eq. 17), clipped at `max_beta`.

  Returns:
    float64 NumPy array [T]; beta_t = 1 - abar(t + 1) / abar(t) with abar(t) = f(t) / f(0).
  """
  _check_num_steps("num_timesteps", num_timesteps)
  f = lambda t: np.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
  t = np.arange(num_timesteps, dtype=np.float64)
  return np.minimum(1.0 - f(t + 1) / f(t), max_beta)


def alphas_cumprod_from_betas(betas) -> jax.Array:
  """abar_t = prod_{s<=t} (1 - beta_s). Args: betas [T]. Returns float32 [T]."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas >= 1):
    raise ValueError("betas must be a 1-D array with entries in (0, 1)")
  return jnp.asarray(np.cumprod(1.0 - betas), jnp.float32)


def make_alphas_cumprod(name: str = "linear", num_timesteps: int = 1000, **kwargs) -> jax.Array:
  """alphas_cumprod of a named schedule.

  Args:
    name: one of `SCHEDULES` ("linear" | "scaled_linear" | "cosine").
    num_timesteps: T.
    **kwargs: passed to the beta builder (beta_start/beta_end, or s/max_beta for cosine).

  Returns:
    float32 [T], strictly decreasing, abar_0 close to 1.
  """
  builders = {"linear": linear_betas, "scaled_linear": scaled_linear_betas,
              "cosine": cosine_betas}
  if name not in builders:
    raise ValueError(f"name={name!r}; choose one of {SCHEDULES}")
  return alphas_cumprod_from_betas(builders[name](num_timesteps, **kwargs))


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> jax.Array:
  """EDM sigma schedule (Karras et al. eq. 5) with a final sigma_N = 0 appended.

  Args:
    num_steps: N >= 2, the number of noise levels before the final 0.
    sigma_min, sigma_max, rho: EDM defaults 0.002, 80, 7.

  Returns:
    float32 [N + 1], decreasing from sigma_max to sigma_min, then 0.
  """
  _check_num_steps("num_steps", num_steps, 2)
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
  i = np.arange(num_steps, dtype=np.float64)
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  sig = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
  return jnp.asarray(np.append(sig, 0.0), jnp.float32)


def discrete_sigmas(alphas_cumprod: jax.Array, timesteps) -> jax.Array:
  """The VE sigmas sqrt((1 - abar_t) / abar_t) of `timesteps`, with a final 0 appended.

  Args:
    alphas_cumprod: float [T].
    timesteps: int [N], decreasing (e.g. from `make_timesteps`).

  Returns:
    float32 [N + 1].
  """
  sig = alpha_bar_to_sigma(jnp.asarray(alphas_cumprod)[jnp.asarray(timesteps)])
  return jnp.concatenate([sig, jnp.zeros((1,), sig.dtype)]).astype(jnp.float32)


def make_timesteps(num_steps: int, num_timesteps: int = 1000, spacing: str = "leading",
                   offset: int = 0) -> np.ndarray:
  """Decreasing integer timesteps for a sampler with N <= T steps (diffusers' spacings).

  Args:
    num_steps: N.
    num_timesteps: T.
    spacing: one of `SPACINGS`; "leading" (default) is diffusers' DDIM default and the DDIM
      paper's uniform skip tau_i = i * (T // N).
    offset: added to "leading" timesteps (diffusers `steps_offset`; SD uses 1).

  Returns:
    int32 NumPy array [N], strictly decreasing, within [0, T - 1]. Host-side and static.
  """
  _check_num_steps("num_steps", num_steps)
  _check_num_steps("num_timesteps", num_timesteps)
  if num_steps > num_timesteps:
    raise ValueError(f"num_steps={num_steps} must be <= num_timesteps={num_timesteps}")
  if spacing == "leading":
    ts = np.arange(num_steps)[::-1] * (num_timesteps // num_steps) + offset
  elif spacing == "trailing":
    ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)) - 1
  elif spacing == "linspace":
    ts = np.round(np.linspace(0, num_timesteps - 1, num_steps))[::-1]
  else:
    raise ValueError(f"spacing={spacing!r}; choose one of {SPACINGS}")
  ts = ts.astype(np.int32)
  if ts.min() < 0 or ts.max() >= num_timesteps or np.any(np.diff(ts) >= 0):
    raise ValueError(f"offset={offset} pushes timesteps outside [0, {num_timesteps - 1}]")
  return ts


def snr(alpha_bar: jax.Array) -> jax.Array:
  """Signal-to-noise ratio abar / (1 - abar); same shape as alpha_bar."""
  return alpha_bar / (1.0 - alpha_bar)


def sigma_to_alpha_bar(sigma: jax.Array) -> jax.Array:
  """abar = 1 / (1 + sigma^2); same shape as sigma (sigma = 0 gives abar = 1)."""
  return 1.0 / (1.0 + jnp.square(sigma))


def alpha_bar_to_sigma(alpha_bar: jax.Array) -> jax.Array:
  """sigma = sqrt((1 - abar) / abar); same shape as alpha_bar."""
  return jnp.sqrt((1.0 - alpha_bar) / alpha_bar)


def sigma_to_timestep(sigma: jax.Array, alphas_cumprod: jax.Array) -> jax.Array:
  """Fractional timestep of a VE sigma, interpolating log sigma between integer timesteps.

  Args:
    sigma: float, any shape.
    alphas_cumprod: float [T] (decreasing, so the discrete sigmas increase with t).

  Returns:
    float32, same shape as sigma, clipped to [0, T - 1].
  """
  log_sig = jnp.log(alpha_bar_to_sigma(jnp.asarray(alphas_cumprod, jnp.float32)))
  t = jnp.arange(log_sig.shape[0], dtype=jnp.float32)
  # jnp.interp clamps outside the table, which is the clip to [0, T - 1].
  return jnp.interp(jnp.log(jnp.maximum(sigma, 1e-20)), log_sig, t).astype(jnp.float32)


def expand_like(coef: jax.Array, x: jax.Array) -> jax.Array:
  """Reshape a per-example coefficient [B] (or a scalar) to [B, 1, ...] to broadcast with x."""
  coef = jnp.asarray(coef, x.dtype)
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array,
             alphas_cumprod: jax.Array) -> jax.Array:
  """Forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

  Args:
    x0: float [B, ...] clean data.
    t: int [B] (or scalar) timesteps in [0, T - 1].
    noise: float [B, ...] standard normal.
    alphas_cumprod: float [T].

  Returns:
    x_t, float [B, ...].
  """
  if noise.shape != x0.shape:
    raise ValueError(f"noise shape {noise.shape} must equal x0 shape {x0.shape}")
  abar = expand_like(jnp.asarray(alphas_cumprod)[t], x0)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


# The conversions take alpha_bar broadcastable to x_t: a scalar, or [B] through `expand_like`.
def eps_to_x0(x_t, eps, alpha_bar):
  """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); shapes of x_t."""
  return (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)


def x0_to_eps(x_t, x0, alpha_bar):
  """eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar); shapes of x_t."""
  return (x_t - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1.0 - alpha_bar)


def v_to_eps(x_t, v, alpha_bar):
  """eps = sqrt(1 - abar) x_t + sqrt(abar) v; shapes of x_t."""
  return jnp.sqrt(1.0 - alpha_bar) * x_t + jnp.sqrt(alpha_bar) * v


def v_to_x0(x_t, v, alpha_bar):
  """x_0 = sqrt(abar) x_t - sqrt(1 - abar) v; shapes of x_t."""
  return jnp.sqrt(alpha_bar) * x_t - jnp.sqrt(1.0 - alpha_bar) * v


def eps_to_v(x_t, eps, alpha_bar):
  """v = sqrt(abar) eps - sqrt(1 - abar) x_0 with x_0 from eps; shapes of x_t."""
  return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * eps_to_x0(x_t, eps, alpha_bar)


def x0_to_v(x_t, x0, alpha_bar):
  """v = sqrt(abar) eps - sqrt(1 - abar) x_0 with eps from x_0; shapes of x_t."""
  return jnp.sqrt(alpha_bar) * x0_to_eps(x_t, x0, alpha_bar) - jnp.sqrt(1.0 - alpha_bar) * x0


def check_prediction_type(prediction_type: str) -> None:
  """Raise ValueError unless prediction_type is one of `PREDICTION_TYPES`."""
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}")


def pred_to_x0(pred, x_t, alpha_bar, prediction_type: str):
  """x_0 estimate from a model output of the given type ("epsilon" | "v" | "x0")."""
  check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return eps_to_x0(x_t, pred, alpha_bar)
  if prediction_type == "v":
    return v_to_x0(x_t, pred, alpha_bar)
  return pred


def pred_to_eps(pred, x_t, alpha_bar, prediction_type: str):
  """eps estimate from a model output of the given type ("epsilon" | "v" | "x0")."""
  check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return pred
  if prediction_type == "v":
    return v_to_eps(x_t, pred, alpha_bar)
  return x0_to_eps(x_t, pred, alpha_bar)
