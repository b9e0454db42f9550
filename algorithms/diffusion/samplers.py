"""Continuous-state diffusion samplers as `lax.scan` programs, and classifier-free guidance.

Shared block B3/B4 of the diffusion family (spec card `diffusion.md` section 0.2). Sources:

* Ho et al., "Denoising Diffusion Probabilistic Models", 2020, arXiv:2006.11239 (ancestral
  sampling, posterior q(x_{t-1} | x_t, x_0), "fixed small" variance);
* Song et al., "Denoising Diffusion Implicit Models", ICLR 2021, arXiv:2010.02502 (eq. 12 and
  eq. 16: generalized steps with eta; eta = 0 is the deterministic ODE sampler);
* Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022,
  arXiv:2206.00364 (Algorithm 1 deterministic Heun, Algorithm 2 stochastic churn);
* Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
  Models", 2022, arXiv:2211.01095 (Algorithm 2, multistep second order "2M");
* Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022, arXiv:2207.12598.

Model interface: `model_fn(x, t, cond) -> prediction` with x [B, ...], t [B] and `cond` any
pytree passed through unchanged. The prediction is "epsilon", "v" or "x0" (`prediction_type`).

Discrete-time VP samplers (`ddpm`, `ddim`, `dpm_solver_pp_2m`, `ddim_invert`) walk a decreasing
grid t_0 > ... > t_{N-1} of integer timesteps (`schedules.make_timesteps`) and pass t as int32
[B]. Writing a_i = abar_{t_i} and a_{N} = `final_alpha_cumprod` (1.0 by default, so the last
step returns the x_0 prediction, as in the DDIM paper's code), step i maps x_{t_i} to x_{t_{i+1}}:

  DDIM:  x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z,
         s = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a');
  DDPM:  x' = mean + sqrt(var) z with beta = 1 - a / a',
         mean = sqrt(a') beta / (1 - a) x0 + sqrt(1 - beta) (1 - a') / (1 - a) x,
         var = beta (1 - a') / (1 - a)  (equal to DDIM with eta = 1);
  DPM-Solver++(2M): with alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma),
         h = lambda' - lambda, r = h_prev / h,
         x' = (sigma' / sigma) x - alpha' (e^{-h} - 1) (m0 + (m0 - m1) / (2 r)),
         m0, m1 the current and previous x0 predictions; first order (= DDIM eta 0) on the
         first step and on the last one when it lands on sigma = 0 or N < 15
         (diffusers' `lower_order_final`).

EDM samplers (`euler`, `heun`) walk a decreasing sigma grid sigma_0 > ... > sigma_N (usually
`schedules.karras_sigmas`, sigma_N = 0) in the VE state x = x_0 + sigma eps and pass t = sigma
as float32 [B]. A prediction of type p is read through the VP relations at abar = 1 / (1 +
sigma^2) with x_vp = x sqrt(abar), so "epsilon" gives D = x - sigma eps and "v" matches
diffusers' Euler scheduler. `vp_model_to_ve` wraps a discrete-time VP model for them.

  x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z,  sigma_hat = (1 + gamma) sigma,
  gamma = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma <= S_tmax else 0,
  d = (x_hat - D(x_hat, sigma_hat)) / sigma_hat,  x' = x_hat + (sigma' - sigma_hat) d,
  Heun: if sigma' > 0, x' = x_hat + (sigma' - sigma_hat) (d + d') / 2, d' at (x', sigma').

Randomness: a stochastic sampler with N steps draws the noise of step i as
`jax.random.normal(jax.random.split(key, N)[i], x.shape, x.dtype)`.

Trajectories: with `return_trajectory=True` a sampler returns `(x, Trajectory)` whose
`x[i]`/`t[i]` are exactly the state and time fed to the model at step i (for Heun and Euler the
churned x_hat and sigma_hat), and `x0[i]` the x_0 prediction there. Later papers cache
per-step features or calibrate quantisers on these, so the labels are never off by one.

Differences from the papers' code:
* Samplers are pure functions, not jitted themselves: jit at the call site, e.g.
  `jax.jit(lambda x, c: ddim(model_fn, x, c, ac, ts))`, so that a model that closes over
  parameters can be differentiated through the sampler (`remat=True` checkpoints each step).
* `clip_x0` clips the x_0 prediction and recomputes eps from it (diffusers' `clip_sample`).
* Heun's correction is skipped with a scalar `lax.cond` when sigma' = 0, so it costs 2N - 1
  model calls, as in EDM.
* `ddim_invert` evaluates the model at the target timestep with the current state (diffusers'
  `DDIMInverseScheduler` with `set_alpha_to_one`), so the first step starts from abar = 1.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.algorithms.diffusion import schedules as sch

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


class Trajectory(NamedTuple):
  """Per-step record of a sampler run with N steps.

  Attributes:
    x: [N, B, ...] the state fed to the model at step i.
    t: [N] the timestep (int32) or sigma (float32) fed to the model at step i.
    x0: [N, B, ...] the x_0 prediction at step i.
  """
  x: jax.Array
  t: jax.Array
  x0: jax.Array


def _batched(t: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.full((x.shape[0],), t, jnp.asarray(t).dtype)


def _check_grid(name: str, grid: jax.Array) -> None:
  if jnp.ndim(grid) != 1 or grid.shape[0] < 1:
    raise ValueError(f"{name} must be a non-empty 1-D array; got shape {jnp.shape(grid)}")


def _step_noise(key, n: int, stochastic: bool, who: str):
  """[N] keys for the per-step noise, or None for a deterministic run."""
  if not stochastic:
    return None
  if key is None:
    raise ValueError(f"{who}: a stochastic setting needs `key` (a jax.random.key)")
  return jax.random.split(key, n)


def _noise(keys_i, x):
  return jax.random.normal(keys_i, x.shape, x.dtype)


def _clip(x0, clip_x0):
  return x0 if clip_x0 is None else jnp.clip(x0, -clip_x0, clip_x0)


def _vp_predict(model_fn, x, t, cond, abar, prediction_type, clip_x0):
  """(x0, eps) estimates at a VP state x of level abar; eps is recomputed after clipping."""
  pred = model_fn(x, _batched(t, x), cond)
  x0 = sch.pred_to_x0(pred, x, abar, prediction_type)
  if clip_x0 is None:
    return x0, sch.pred_to_eps(pred, x, abar, prediction_type)
  x0 = _clip(x0, clip_x0)
  return x0, sch.x0_to_eps(x, x0, abar)


def _vp_levels(alphas_cumprod, timesteps, final_alpha_cumprod):
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  a = ac[timesteps]
  a_next = jnp.concatenate([a[1:], jnp.full((1,), final_alpha_cumprod, jnp.float32)])
  return a, a_next


def _finish(x, ys, return_trajectory):
  return (x, Trajectory(*ys)) if return_trajectory else x


def _scan(step, x, xs, remat):
  return lax.scan(jax.checkpoint(step) if remat else step, x, xs)


def ddim(model_fn: ModelFn, x_init: jax.Array, cond: Any, alphas_cumprod: jax.Array,
         timesteps: jax.Array, *, eta: float = 0.0, key: jax.Array | None = None,
         prediction_type: str = "epsilon", final_alpha_cumprod: float = 1.0,
         clip_x0: float | None = None, return_trajectory: bool = False,
         remat: bool = False):
  """DDIM generalized steps (Song et al. eq. 12); eta = 0 deterministic, eta = 1 ancestral.

  Args:
    model_fn: `model_fn(x [B, ...], t int32 [B], cond) -> prediction [B, ...]`.
    x_init: float32 [B, ...] x at t_0, usually N(0, I) noise.
    cond: pytree passed to model_fn unchanged.
    alphas_cumprod: float [T].
    timesteps: int [N], decreasing.
    eta: Python float >= 0, the stochasticity.
    key: typed PRNG key; needed when eta > 0.
    prediction_type: "epsilon" | "v" | "x0".
    final_alpha_cumprod: abar after the last step (1.0: return the x_0 prediction).
    clip_x0: clip x_0 predictions to [-clip_x0, clip_x0] (None: no clipping).
    return_trajectory: also return a `Trajectory`.
    remat: `jax.checkpoint` each step (gradients through the sampler).

  Returns:
    x float32 [B, ...], or (x, Trajectory) when return_trajectory.
  """
  _check_grid("timesteps", timesteps)
  sch.check_prediction_type(prediction_type)
  if eta < 0:
    raise ValueError(f"eta must be >= 0; got {eta}")
  a, a_next = _vp_levels(alphas_cumprod, timesteps, final_alpha_cumprod)
  keys = _step_noise(key, a.shape[0], eta > 0, "ddim")

  def step(x, inp):
    t, a_t, a_p, k = inp
    x0, eps = _vp_predict(model_fn, x, t, cond, a_t, prediction_type, clip_x0)
    s = eta * jnp.sqrt((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))
    # max(., 0) guards rounding when eta = 1 makes the direction term vanish exactly.
    x_new = jnp.sqrt(a_p) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_p - s * s, 0.0)) * eps
    if k is not None:
      x_new = x_new + s * _noise(k, x)
    return x_new, (x, t, x0)

  x, ys = _scan(step, x_init, (jnp.asarray(timesteps), a, a_next, keys), remat)
  return _finish(x, ys, return_trajectory)


def ddpm(model_fn: ModelFn, x_init: jax.Array, cond: Any, alphas_cumprod: jax.Array,
         timesteps: jax.Array, *, key: jax.Array, prediction_type: str = "epsilon",
         final_alpha_cumprod: float = 1.0, clip_x0: float | None = None,
         return_trajectory: bool = False, remat: bool = False):
  """DDPM ancestral sampling with the posterior mean and "fixed small" variance.

  Over a strided grid the step uses beta = 1 - abar_t / abar_t' (diffusers' respacing). Args
  and returns as in `ddim` (key is required).
  """
  _check_grid("timesteps", timesteps)
  sch.check_prediction_type(prediction_type)
  a, a_next = _vp_levels(alphas_cumprod, timesteps, final_alpha_cumprod)
  keys = _step_noise(key, a.shape[0], True, "ddpm")

  def step(x, inp):
    t, a_t, a_p, k = inp
    x0, _ = _vp_predict(model_fn, x, t, cond, a_t, prediction_type, clip_x0)
    beta = 1.0 - a_t / a_p
    mean = (jnp.sqrt(a_p) * beta / (1.0 - a_t)) * x0 + (
        jnp.sqrt(1.0 - beta) * (1.0 - a_p) / (1.0 - a_t)) * x
    var = beta * (1.0 - a_p) / (1.0 - a_t)
    return mean + jnp.sqrt(var) * _noise(k, x), (x, t, x0)

  x, ys = _scan(step, x_init, (jnp.asarray(timesteps), a, a_next, keys), remat)
  return _finish(x, ys, return_trajectory)


def dpm_solver_pp_2m(model_fn: ModelFn, x_init: jax.Array, cond: Any,
                     alphas_cumprod: jax.Array, timesteps: jax.Array, *,
                     prediction_type: str = "epsilon", final_alpha_cumprod: float = 1.0,
                     lower_order_final: bool = True, clip_x0: float | None = None,
                     return_trajectory: bool = False, remat: bool = False):
  """DPM-Solver++(2M), deterministic multistep second order in the data prediction.

  Args as in `ddim`; `lower_order_final` makes the last step first order when N < 15
  (diffusers' rule). A last step onto final_alpha_cumprod = 1 (sigma = 0) is always first
  order, where h is infinite.

  Returns:
    x float32 [B, ...], or (x, Trajectory) when return_trajectory.
  """
  _check_grid("timesteps", timesteps)
  sch.check_prediction_type(prediction_type)
  n = timesteps.shape[0]
  a, a_next = _vp_levels(alphas_cumprod, timesteps, final_alpha_cumprod)
  alpha, sig = jnp.sqrt(a), jnp.sqrt(1.0 - a)
  alpha_n, sig_n = jnp.sqrt(a_next), jnp.sqrt(1.0 - a_next)
  # lambda' would be +inf at sigma' = 0; a dummy finite value keeps r (unused there) finite,
  # so gradients through the where() below stay NaN-free.
  zero_end = sig_n <= 0
  lam = jnp.log(alpha / sig)
  lam_n = jnp.where(zero_end, lam + 1.0, jnp.log(alpha_n / jnp.where(zero_end, 1.0, sig_n)))
  h = lam_n - lam
  # e^{-h} = (sigma' alpha) / (alpha' sigma), exact 0 at sigma' = 0.
  emh = sig_n * alpha / (alpha_n * sig)
  second = jnp.arange(n) > 0
  last_first_order = (final_alpha_cumprod >= 1.0) or (lower_order_final and n < 15)
  if last_first_order:
    second = second & (jnp.arange(n) < n - 1)
  h_prev = jnp.concatenate([jnp.ones((1,), h.dtype), h[:-1]])

  def step(carry, inp):
    x, m1 = carry
    t, a_t, ratio, c_alpha, e, hh, hp, use2 = inp
    m0, _ = _vp_predict(model_fn, x, t, cond, a_t, prediction_type, clip_x0)
    d = jnp.where(use2, m0 + (0.5 * hh / hp) * (m0 - m1), m0)
    x_new = ratio * x - c_alpha * (e - 1.0) * d
    return (x_new, m0), (x, t, m0)

  inputs = (jnp.asarray(timesteps), a, sig_n / sig, alpha_n, emh, h, h_prev, second)
  (x, _), ys = _scan(step, (x_init, jnp.zeros_like(x_init)), inputs, remat)
  return _finish(x, ys, return_trajectory)


def ddim_invert(model_fn: ModelFn, x0: jax.Array, cond: Any, alphas_cumprod: jax.Array,
                timesteps: jax.Array, *, prediction_type: str = "epsilon",
                final_alpha_cumprod: float = 1.0, return_trajectory: bool = False,
                remat: bool = False):
  """Deterministic DDIM encoding x_0 -> x_{t_0}, the reverse of `ddim(eta=0)` on the same grid.

  Step j goes from level L_j to L_{j+1} along [final, t_{N-1}, ..., t_0], calling the model at
  the target timestep with the current state (diffusers' DDIMInverseScheduler).

  Args:
    model_fn, cond, alphas_cumprod, prediction_type, return_trajectory, remat: as in `ddim`.
    x0: float32 [B, ...] data.
    timesteps: int [N], decreasing (the sampling grid; it is walked upwards here).
    final_alpha_cumprod: abar of the data level (1.0).

  Returns:
    x_{t_0} float32 [B, ...], or (x, Trajectory) when return_trajectory (t = target steps).
  """
  _check_grid("timesteps", timesteps)
  sch.check_prediction_type(prediction_type)
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  t_up = jnp.asarray(timesteps)[::-1]
  a_to = ac[t_up]
  a_from = jnp.concatenate([jnp.full((1,), final_alpha_cumprod, jnp.float32), a_to[:-1]])

  def step(x, inp):
    t, a_f, a_t = inp
    pred = model_fn(x, _batched(t, x), cond)
    eps = sch.pred_to_eps(pred, x, a_t, prediction_type)
    x0_hat = (x - jnp.sqrt(1.0 - a_f) * eps) / jnp.sqrt(a_f)
    return jnp.sqrt(a_t) * x0_hat + jnp.sqrt(1.0 - a_t) * eps, (x, t, x0_hat)

  x, ys = _scan(step, x0, (t_up, a_from, a_to), remat)
  return _finish(x, ys, return_trajectory)


def _ve_denoise(model_fn, x, sigma, cond, prediction_type):
  """D(x, sigma): the x_0 estimate at VE state x, reading the prediction at abar(sigma)."""
  pred = model_fn(x, _batched(sigma, x), cond)
  abar = sch.sigma_to_alpha_bar(sigma)
  return sch.pred_to_x0(pred, x * jnp.sqrt(abar), abar, prediction_type)


def _edm(model_fn, x_init, cond, sigmas, key, prediction_type, s_churn, s_tmin, s_tmax,
         s_noise, second_order, return_trajectory, remat, who):
  _check_grid("sigmas", sigmas)
  if sigmas.shape[0] < 2:
    raise ValueError(f"{who}: sigmas needs N + 1 >= 2 entries; got {sigmas.shape[0]}")
  sch.check_prediction_type(prediction_type)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  n = sigmas.shape[0] - 1
  keys = _step_noise(key, n, s_churn > 0, who)
  gamma_max = min(s_churn / n, math.sqrt(2.0) - 1.0)

  def step(x, inp):
    s, s_next, k = inp
    if k is None:
      s_hat, x_hat = s, x
    else:
      gamma = jnp.where((s >= s_tmin) & (s <= s_tmax), gamma_max, 0.0)
      s_hat = s * (1.0 + gamma)
      # sqrt(s_hat^2 - s^2) written so that gamma = 0 gives exactly 0: the difference of
      # squares can round (or be fused) to a tiny negative number and give NaN.
      x_hat = x + s * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * _noise(k, x)
    den = _ve_denoise(model_fn, x_hat, s_hat, cond, prediction_type)
    d = (x_hat - den) / s_hat
    x_new = x_hat + (s_next - s_hat) * d
    if second_order:
      def correct(x_e):
        d2 = (x_e - _ve_denoise(model_fn, x_e, s_next, cond, prediction_type)) / s_next
        return x_hat + (s_next - s_hat) * 0.5 * (d + d2)
      # Scalar predicate: the correction is really skipped at sigma' = 0 (not a select).
      x_new = lax.cond(s_next > 0, correct, lambda x_e: x_e, x_new)
    return x_new, (x_hat, s_hat, den)

  x, ys = _scan(step, x_init, (sigmas[:-1], sigmas[1:], keys), remat)
  return _finish(x, ys, return_trajectory)


def euler(model_fn: ModelFn, x_init: jax.Array, cond: Any, sigmas: jax.Array, *,
          key: jax.Array | None = None, prediction_type: str = "x0", s_churn: float = 0.0,
          s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
          return_trajectory: bool = False, remat: bool = False):
  """EDM Euler sampler over sigmas (Karras et al. Alg. 2 without the Heun correction).

  Args:
    model_fn: `model_fn(x [B, ...], sigma float32 [B], cond) -> prediction`, x in VE scale.
    x_init: float32 [B, ...] x at sigma_0, i.e. sigma_0 * N(0, I).
    cond: pytree passed to model_fn.
    sigmas: float [N + 1], decreasing, usually ending at 0 (`schedules.karras_sigmas`).
    key: typed PRNG key; needed when s_churn > 0.
    prediction_type: "x0" (a denoiser D), "epsilon" or "v" (read at abar = 1/(1+sigma^2)).
    s_churn, s_tmin, s_tmax, s_noise: EDM stochasticity (s_churn = 0: deterministic ODE).
    return_trajectory, remat: as in `ddim`.

  Returns:
    x float32 [B, ...], or (x, Trajectory) with t = sigma_hat.
  """
  return _edm(model_fn, x_init, cond, sigmas, key, prediction_type, s_churn, s_tmin, s_tmax,
              s_noise, False, return_trajectory, remat, "euler")


def heun(model_fn: ModelFn, x_init: jax.Array, cond: Any, sigmas: jax.Array, *,
         key: jax.Array | None = None, prediction_type: str = "x0", s_churn: float = 0.0,
         s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
         return_trajectory: bool = False, remat: bool = False):
  """EDM Heun sampler (Karras et al. Alg. 1; Alg. 2 when s_churn > 0). Args as in `euler`."""
  return _edm(model_fn, x_init, cond, sigmas, key, prediction_type, s_churn, s_tmin, s_tmax,
              s_noise, True, return_trajectory, remat, "heun")


def vp_model_to_ve(model_fn: ModelFn, alphas_cumprod: jax.Array) -> ModelFn:
  """Wrap a discrete-time VP model for `euler`/`heun`.

  The wrapper maps (x, sigma) to the VP input x / sqrt(1 + sigma^2) and the fractional
  timestep `schedules.sigma_to_timestep(sigma)` (float32 [B]); the prediction type is
  unchanged, since eps, v and x0 read the same under the abar = 1 / (1 + sigma^2) convention.
  """
  def wrapped(x, sigma, cond):
    scale = jax.lax.rsqrt(1.0 + jnp.square(sigma)).reshape((-1,) + (1,) * (x.ndim - 1))
    return model_fn(x * scale, sch.sigma_to_timestep(sigma, alphas_cumprod), cond)
  return wrapped


def cfg(model_fn: ModelFn, scale: float | jax.Array, null_cond: Any) -> ModelFn:
  """Classifier-free guidance: pred = u + scale (c - u), both halves in one batched call.

  Args:
    model_fn: `model_fn(x, t, cond) -> prediction`.
    scale: guidance weight w (1 gives the conditional model, 0 the unconditional one).
    null_cond: the "empty" condition, a pytree like cond with or without the batch axis
      (broadcast to cond's shapes).

  Returns:
    guided `model_fn(x, t, cond)`; it calls model_fn once on a batch of 2B: [uncond; cond].
  """
  def guided(x, t, cond):
    b = x.shape[0]
    null = jax.tree.map(lambda nc, c: jnp.broadcast_to(nc, c.shape).astype(c.dtype),
                        null_cond, cond)
    both = jax.tree.map(lambda nc, c: jnp.concatenate([nc, c], axis=0), null, cond)
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
    u, c = out[:b], out[b:]
    return u + scale * (c - u)
  return guided
