"""Oracle tests of PTQ4DM's calibration sets and quantized UNet (spec card section 15.5).

Oracles: the exact clamped-normal probabilities of NDTC (SciPy's normal CDF, including the
point mass at 0); direct, shorter sampler runs for the trajectory capture (correct and legacy
labels); the closed-form forward process; a Python loop for the trajectory eps-MSE.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jaxrepro.algorithms.diffusion import fake_quant as fq
from jaxrepro.algorithms.diffusion import ptq4dm, samplers
from jaxrepro.algorithms.diffusion import schedules as sch
from jaxrepro.models import unet

N_STEPS = 10


def _toy_model(x, t, cond):
  """An arbitrary smooth eps-model that depends on x, t and cond."""
  return jnp.tanh(x) * (t[:, None, None, None] / 1000.0) + 0.1 * cond[:, :1, None, None]


def test_ndtc_histogram_matches_clamped_normal():
  n, steps = 200_000, 20
  j = np.asarray(ptq4dm.generate_t(jax.random.key(0), n, steps, "normal"))
  freq = np.bincount(j, minlength=steps) / n
  # j = 0 collects z N < 1 (truncation towards zero, then the clamp), j = N - 1 the tail.
  edges = np.arange(1, steps) / steps
  pmf = np.diff(np.concatenate([[0.0], stats.norm.cdf(edges, 0.4, 0.4), [1.0]]))
  # The point mass at 0: all of z < 0 (about 16%) plus z in [0, 1/N).
  assert pmf[0] > stats.norm.cdf(0.0, 0.4, 0.4) > 0.15
  np.testing.assert_allclose(freq, pmf, atol=4e-3)
  uni = np.asarray(ptq4dm.generate_t(jax.random.key(0), 21, steps, "uniform"))
  np.testing.assert_array_equal(uni, np.clip(np.round(np.linspace(0, steps, 21)), 0, 19))
  single = ptq4dm.generate_t(jax.random.key(0), 5, steps, "single")
  np.testing.assert_array_equal(single, np.full(5, steps // 2))


@pytest.fixture(scope="module")
def trajectory_setup():
  ac = sch.make_alphas_cumprod("linear", 1000)
  ts = sch.make_timesteps(N_STEPS, 1000)
  n = 6
  x_init = jax.random.normal(jax.random.key(1), (n, 4, 4, 3))
  cond = jax.random.normal(jax.random.key(2), (n, 2))
  t_index = jnp.array([0, 3, 9, 5, 0, 8], jnp.int32)
  return ac, ts, x_init, cond, t_index


@pytest.mark.parametrize("legacy", [False, True])
def test_trajectory_capture_matches_direct_runs(trajectory_setup, legacy):
  ac, ts, x_init, cond, t_index = trajectory_setup
  calib = jax.jit(lambda x: ptq4dm.backward_calibration(
      _toy_model, x, cond, ac, ts, t_index, legacy_index=legacy))(x_init)
  ts_inc = ts[::-1]
  for i, j in enumerate(np.asarray(t_index)):
    # Correct labels: the state the model sees at grid time ts_inc[j] = ts[N - 1 - j], i.e.
    # after N - 1 - j steps. Legacy: the state after j + 1 steps, still labelled ts_inc[j].
    k = j + 1 if legacy else N_STEPS - 1 - j
    x = x_init[i:i + 1]
    if k > 0:
      # A direct run of the first k steps, ending at abar of the next grid point.
      final = float(ac[ts[k]]) if k < N_STEPS else 1.0
      x = samplers.ddim(_toy_model, x, cond[i:i + 1], ac, jnp.asarray(ts[:k]),
                        final_alpha_cumprod=final)
    np.testing.assert_allclose(calib.x[i], x[0], atol=1e-5)
    assert int(calib.t[i]) == int(ts_inc[j])
    if not legacy:
      assert int(calib.t[i]) == int(ts[k])


def test_forward_calibration_is_the_closed_form(trajectory_setup):
  ac, ts, x0, cond, t_index = trajectory_setup
  key = jax.random.key(3)
  calib = ptq4dm.forward_calibration(key, x0, t_index, ts, ac, cond)
  noise = np.asarray(jax.random.normal(key, x0.shape))
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # the linear schedule
  abar = np.cumprod(1 - betas)
  t = np.asarray(ts[::-1])[np.asarray(t_index)]
  np.testing.assert_array_equal(calib.t, t)
  a = abar[t][:, None, None, None]
  np.testing.assert_allclose(calib.x, np.sqrt(a) * np.asarray(x0) + np.sqrt(1 - a) * noise,
                             atol=1e-5)
  raw = ptq4dm.forward_calibration(key, x0, t_index, ts, ac, cond, add_noise=False)
  np.testing.assert_array_equal(raw.x, x0)


def test_quantize_unet_head_stem_bits_and_close_to_float():
  cfg = unet.UNetConfig(channels=16, channel_mult=(1,), vocab_size=16, max_prompt_len=4)
  graphdef, params = unet.random_unet(cfg, 0)
  key = jax.random.key(4)
  n = 8
  calib = ptq4dm.CalibSet(jax.random.normal(key, (n, 16, 16, 3)),
                          jnp.linspace(0, 999, n).astype(jnp.int32),
                          jax.random.randint(key, (n, 4), 0, 16))
  qg, qs = ptq4dm.quantize_unet(graphdef, params, calib, w_bits=8, a_bits=6, batch_size=4,
                                num_candidates=20, step=0.04)
  model = nnx.merge(qg, qs)
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, fq.ActQuant)]
  assert len(layers) == len(fq.kernel_paths(params))
  assert model.conv_in.bits == 8 and model.conv_out.bits == 8
  assert sorted({m.bits for m in layers}) == [6, 8]
  assert all(m.mode == "quant" and float(m.scale[...]) > 0 for m in layers)
  fp = unet.make_model_fn(graphdef, params)
  q = unet.make_model_fn(qg, qs)
  # The eps-MSE along a trajectory equals a Python loop over its steps.
  traj_x = jnp.stack([calib.x[:4], calib.x[4:]])
  traj_t = jnp.array([900, 100], jnp.int32)
  per_step = jax.jit(lambda x: ptq4dm.trajectory_eps_mse(q, fp, x, traj_t, calib.cond[:4]))(
      traj_x)
  both = jax.jit(lambda x, t: (q(x, t, calib.cond[:4]), fp(x, t, calib.cond[:4])))
  for s in range(2):
    eq, ef = both(traj_x[s], jnp.full((4,), traj_t[s]))
    np.testing.assert_allclose(per_step[s], jnp.mean((eq - ef) ** 2), rtol=1e-4)
  y = both(traj_x[0], jnp.full((4,), 900))[1]
  rel = float(per_step[0] / jnp.mean(y ** 2))
  assert 0 < rel < 0.05  # W8A6 on random weights: close, but not exact


def test_bad_inputs_raise(trajectory_setup):
  ac, ts, x0, cond, t_index = trajectory_setup
  with pytest.raises(ValueError, match="mode"):
    ptq4dm.generate_t(jax.random.key(0), 4, 10, "lognormal")
  with pytest.raises(ValueError, match="single_index"):
    ptq4dm.generate_t(jax.random.key(0), 4, 10, "single", single_index=10)
  with pytest.raises(ValueError, match="t_index"):
    ptq4dm.forward_calibration(jax.random.key(0), x0, t_index[:2], ts, ac, cond)
  with pytest.raises(ValueError, match="batch_size"):
    ptq4dm.calib_batches(ptq4dm.CalibSet(x0, t_index, cond), 7)
