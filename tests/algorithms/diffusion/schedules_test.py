"""Oracle tests of the continuous-diffusion schedules, forward process and parameterizations.

Oracles: the schedules' closed forms in float64 NumPy (DDPM linear endpoints and product, the
cosine telescoping product f(t + 1) / f(0), SD's sqrt-linear betas, EDM eq. 5); diffusers'
published timestep tables for T = 1000, N = 10; Monte Carlo moments of q(x_t | x_0) with a
4-standard-error tolerance; exact algebraic round trips of the eps / v / x0 parameterizations.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.diffusion import schedules as sch


def test_linear_schedule_closed_form():
  ac = np.asarray(sch.make_alphas_cumprod("linear", 1000), np.float64)
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(ac, np.cumprod(1 - betas), rtol=1e-5)
  np.testing.assert_allclose(ac[0], 1 - 1e-4, rtol=1e-7)
  # DDPM's abar_{T-1} for this schedule is about 4.04e-5 (log-sum of 1 - beta).
  np.testing.assert_allclose(ac[-1], math.exp(np.sum(np.log1p(-betas))), rtol=1e-4)
  assert 3.9e-5 < ac[-1] < 4.2e-5
  assert np.all(np.diff(ac) < 0)
  assert sch.make_alphas_cumprod("linear", 1000).dtype == jnp.float32


def test_cosine_schedule_matches_nichol_dhariwal():
  T, s = 1000, 0.008
  ac = np.asarray(sch.make_alphas_cumprod("cosine", T), np.float64)
  f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
  t = np.arange(T)
  # Telescoping product: abar_t = f(t + 1) / f(0) wherever the 0.999 beta clip is inactive
  # (everywhere but the last step, whose unclipped beta is 1).
  np.testing.assert_allclose(ac[:-1], f(t[:-1] + 1) / f(0), rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(ac[-1], ac[-2] * (1 - 0.999), rtol=1e-4)
  assert np.all(np.diff(ac) < 0) and ac[0] > 0.9999


def test_scaled_linear_schedule():
  betas = sch.scaled_linear_betas(1000)
  root = np.sqrt(betas)
  np.testing.assert_allclose(root[[0, -1]], np.sqrt([0.00085, 0.012]), rtol=1e-12)
  np.testing.assert_allclose(np.diff(root), np.diff(root)[0], rtol=1e-9)
  ac = np.asarray(sch.make_alphas_cumprod("scaled_linear"), np.float64)
  np.testing.assert_allclose(ac, np.cumprod(1 - betas), rtol=1e-5)
  # SD's final abar is about 0.0047 (far from 0: the "flawed schedule" observation).
  assert 0.004 < ac[-1] < 0.0055


def test_karras_sigmas_formula():
  n, smin, smax, rho = 12, 0.002, 80.0, 7.0
  sig = np.asarray(sch.karras_sigmas(n, smin, smax, rho), np.float64)
  assert sig.shape == (n + 1,) and sig[-1] == 0.0
  i = np.arange(n)
  want = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
  np.testing.assert_allclose(sig[:-1], want, rtol=1e-6)
  np.testing.assert_allclose(sig[[0, n - 1]], [smax, smin], rtol=1e-6)
  assert np.all(np.diff(sig) < 0)
  # rho = 1 is a plain linspace.
  np.testing.assert_allclose(np.asarray(sch.karras_sigmas(5, 1.0, 5.0, 1.0)), [5, 4, 3, 2, 1, 0])


@pytest.mark.parametrize("spacing,offset,want", [
    ("leading", 0, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("leading", 1, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
    ("trailing", 0, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("linspace", 0, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
])
def test_timestep_spacing_matches_diffusers_tables(spacing, offset, want):
  ts = sch.make_timesteps(10, 1000, spacing, offset)
  assert ts.dtype == np.int32
  np.testing.assert_array_equal(ts, want)


def test_timestep_spacing_full_grid_and_errors():
  for spacing in sch.SPACINGS:
    np.testing.assert_array_equal(sch.make_timesteps(50, 50, spacing), np.arange(50)[::-1])
  with pytest.raises(ValueError, match="spacing"):
    sch.make_timesteps(10, 1000, "uniform")
  with pytest.raises(ValueError, match="num_steps"):
    sch.make_timesteps(2000, 1000)
  with pytest.raises(ValueError, match="offset"):
    sch.make_timesteps(10, 1000, "leading", offset=100)
  with pytest.raises(ValueError, match="name"):
    sch.make_alphas_cumprod("sigmoid")
  with pytest.raises(ValueError, match="prediction_type"):
    sch.pred_to_x0(jnp.zeros(2), jnp.zeros(2), 0.5, "score")


def test_q_sample_moments_monte_carlo():
  ac = sch.make_alphas_cumprod("linear", 1000)
  t = jnp.array([0, 250, 600, 999])
  x0 = jnp.array([2.0, -1.0, 0.5, 3.0])[:, None] * jnp.ones((4, 20000))
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  xt = np.asarray(jax.jit(sch.q_sample)(x0, t, noise, ac), np.float64)
  abar = np.asarray(ac, np.float64)[np.asarray(t)]
  n = x0.shape[1]
  # Tolerance: 4 standard errors of the mean (sd/sqrt(n)) and of the variance (var
  # sqrt(2/n)) of a Gaussian sample of size n.
  mean_want = np.sqrt(abar) * np.asarray(x0[:, 0])
  var_want = 1 - abar
  assert np.all(np.abs(xt.mean(1) - mean_want) < 4 * np.sqrt(var_want / n))
  assert np.all(np.abs(xt.var(1) - var_want) < 4 * var_want * np.sqrt(2 / n))
  with pytest.raises(ValueError, match="noise shape"):
    sch.q_sample(x0, t, noise[:, :5], ac)


def test_parameterization_round_trips():
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(6, 5))
  eps = rng.normal(size=(6, 5))
  abar = np.array([1e-3, 0.05, 0.3, 0.5, 0.9, 0.999])[:, None]
  a, b = np.sqrt(abar), np.sqrt(1 - abar)
  xt, v = a * x0 + b * eps, a * eps - b * x0
  j = lambda z: jnp.asarray(z, jnp.float32)  # noqa: E731
  xt_j, ab_j = j(xt), j(abar)
  close = lambda got, want: np.testing.assert_allclose(  # noqa: E731
      np.asarray(got), want, rtol=2e-4, atol=2e-4)
  close(sch.eps_to_x0(xt_j, j(eps), ab_j), x0)
  close(sch.x0_to_eps(xt_j, j(x0), ab_j), eps)
  close(sch.v_to_eps(xt_j, j(v), ab_j), eps)
  close(sch.v_to_x0(xt_j, j(v), ab_j), x0)
  close(sch.eps_to_v(xt_j, j(eps), ab_j), v)
  close(sch.x0_to_v(xt_j, j(x0), ab_j), v)
  for ptype, pred in (("epsilon", eps), ("v", v), ("x0", x0)):
    close(sch.pred_to_x0(j(pred), xt_j, ab_j, ptype), x0)
    close(sch.pred_to_eps(j(pred), xt_j, ab_j, ptype), eps)


def test_sigma_alpha_bar_snr_and_timestep_interpolation():
  sig = jnp.array([0.0, 0.01, 1.0, 80.0])
  abar = sch.sigma_to_alpha_bar(sig)
  np.testing.assert_allclose(np.asarray(abar), 1 / (1 + np.asarray(sig, np.float64) ** 2),
                             rtol=1e-6)
  # 1 - abar cancels in float32 at small sigma (abar = 0.9999 keeps ~3 digits of 1 - abar).
  np.testing.assert_allclose(np.asarray(sch.alpha_bar_to_sigma(abar[1:])), sig[1:], rtol=1e-3)
  np.testing.assert_allclose(np.asarray(sch.snr(abar[1:])), 1 / np.asarray(sig[1:]) ** 2,
                             rtol=1e-3)
  ac = sch.make_alphas_cumprod("linear", 1000)
  ts = jnp.array([0, 1, 10, 500, 999])
  sig_t = sch.alpha_bar_to_sigma(ac[ts])
  np.testing.assert_allclose(np.asarray(sch.sigma_to_timestep(sig_t, ac)), ts, atol=2e-3)
  # Halfway in log sigma between two integer timesteps reads as the half step.
  mid = jnp.sqrt(sch.alpha_bar_to_sigma(ac[10]) * sch.alpha_bar_to_sigma(ac[11]))
  np.testing.assert_allclose(float(sch.sigma_to_timestep(mid, ac)), 10.5, atol=2e-3)
  # Outside the table the timestep is clipped to [0, T - 1].
  np.testing.assert_allclose(np.asarray(sch.sigma_to_timestep(jnp.array([1e-4, 1e4]), ac)),
                             [0, 999])
  ds = np.asarray(sch.discrete_sigmas(ac, ts[::-1]))
  assert ds.shape == (6,) and ds[-1] == 0 and np.all(np.diff(ds) < 0)


def test_expand_like_broadcasts_per_example_coefficients():
  x = jnp.ones((3, 4, 5))
  c = sch.expand_like(jnp.array([1.0, 2.0, 3.0]), x)
  assert c.shape == (3, 1, 1)
  np.testing.assert_array_equal(np.asarray((c * x)[:, 2, 3]), [1.0, 2.0, 3.0])
