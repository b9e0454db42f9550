"""Oracle tests of `algorithms.diffusion.mmd_ddm` (spec card `diffusion.md` section 4.5)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.diffusion import mmd_ddm
from jaxrepro.algorithms.diffusion import samplers as smp
from jaxrepro.algorithms.diffusion import schedules as sch
from jaxrepro.configs import mmd_ddm as cfg_lib
from jaxrepro.configs.common import ConfigError, check_choices
from jaxrepro.launch.experiments import mmd_ddm as drv
from jaxrepro.sharding import mesh as mesh_lib

FAST = dict(compiler_options={"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True})


def jit(f, **kw):
  return jax.jit(f, **kw, **FAST)


def toy_apply(params, x, t):
  """A tiny eps-model with a closed form: tanh(x W + b + c t / 1000), x [B, 2]."""
  return jnp.tanh(x @ params["w"] + params["b"] + params["c"] * t[:, None] / 1000.0)


def toy_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(0.3 * rng.standard_normal((2, 2)), jnp.float32),
          "b": jnp.asarray(0.1 * rng.standard_normal(2), jnp.float32),
          "c": jnp.asarray(0.5 * rng.standard_normal(2), jnp.float32)}


def np_toy_apply(params, x, t):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  return np.tanh(x @ p["w"] + p["b"] + p["c"] * np.asarray(t, np.float64)[:, None] / 1000.0)


def brute_mmd2(x, y, k):
  """Double loops over pairs: the textbook unbiased estimator (float64)."""
  m, n = len(x), len(y)
  sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return sxx + syy - 2.0 * sxy


# --------------------------------------------------------------------- the MMD estimator


def test_unbiased_estimator_mean_zero_negative_and_symmetric():
  kernel = mmd_ddm.make_kernel("gaussian", bandwidths=(0.5, 1.0))
  keys = jax.random.split(jax.random.key(0), 400)
  draws = jax.vmap(lambda k: jax.random.normal(k, (2, 40, 2)))(keys)
  vals = np.asarray(jit(jax.vmap(lambda d: mmd_ddm.mmd2_unbiased(d[0], d[1], kernel)))(draws))
  # iid sets: the unbiased estimate averages to 0 (4 standard errors) and is often negative.
  assert abs(vals.mean()) < 4 * vals.std() / np.sqrt(len(vals)), (vals.mean(), vals.std())
  assert (vals < 0).mean() > 0.2
  x, y = draws[0, 0], draws[1, 1] + 0.5
  np.testing.assert_allclose(mmd_ddm.mmd2_unbiased(x, y, kernel),
                             mmd_ddm.mmd2_unbiased(y, x, kernel), rtol=1e-6)
  # Shifted sets are far apart: clearly positive.
  assert float(mmd_ddm.mmd2_unbiased(x, y + 2.0, kernel)) > 10 * vals.std()


def test_linear_kernel_closed_form_and_brute_force():
  rng = np.random.default_rng(1)
  x, y = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.3
  gamma, coef = 0.7, 1.5
  kernel = mmd_ddm.make_kernel("polynomial", degree=1, gamma=gamma, coef0=coef)
  got = float(mmd_ddm.mmd2_unbiased(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                                    kernel))
  brute = brute_mmd2(x, y, lambda a, b: gamma * a @ b + coef)
  # Closed form: the constants cancel; within-set sums are ||sum||^2 - sum of squares.
  m, n = len(x), len(y)
  sx, sy = x.sum(0), y.sum(0)
  closed = gamma * ((sx @ sx - np.sum(x * x)) / (m * (m - 1))
                    + (sy @ sy - np.sum(y * y)) / (n * (n - 1)) - 2 * x.mean(0) @ y.mean(0))
  np.testing.assert_allclose(brute, closed, rtol=1e-10)
  np.testing.assert_allclose(got, closed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, kw, ref", [
    ("polynomial", dict(degree=3), lambda a, b, d: (a @ b / d + 1.0) ** 3),
    ("rbf", dict(gamma=0.4), lambda a, b, d: np.exp(-0.4 * np.sum((a - b) ** 2))),
    ("gaussian", dict(bandwidths=(0.5, 2.0)),
     lambda a, b, d: sum(np.exp(-np.sum((a - b) ** 2) / (2 * s * s)) for s in (0.5, 2.0))),
])
def test_kernels_match_brute_force_and_gram_is_psd(name, kw, ref):
  rng = np.random.default_rng(2)
  x, y = rng.standard_normal((6, 4)), rng.standard_normal((6, 4)) * 1.3
  kernel = mmd_ddm.make_kernel(name, **kw)
  got = float(mmd_ddm.mmd2_unbiased(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                                    kernel))
  np.testing.assert_allclose(got, brute_mmd2(x, y, lambda a, b: ref(a, b, 4)), rtol=2e-4,
                             atol=1e-5)
  z = jnp.asarray(rng.standard_normal((40, 4)), jnp.float32)
  gram = np.asarray(kernel(z, z), np.float64)
  np.testing.assert_allclose(gram, gram.T, rtol=1e-5)
  eig = np.linalg.eigvalsh(gram)
  assert eig.min() > -1e-4 * eig.max(), eig.min()


# ------------------------------------------------------------------------------ the sampler


def np_generalized_steps(params, z, ac, ts, eta, noises):
  """Numpy float64 twin of the official `generalized_steps` loop (abar = 1 after the end)."""
  ac = np.asarray(ac, np.float64)
  x = np.asarray(z, np.float64)
  nxt = list(ts[1:]) + [-1]
  for i, (t, tn) in enumerate(zip(ts, nxt)):
    at, an = ac[t], (ac[tn] if tn >= 0 else 1.0)
    e = np_toy_apply(params, x, np.full(len(x), t))
    x0 = (x - e * np.sqrt(1 - at)) / np.sqrt(at)
    c1 = eta * np.sqrt((1 - at / an) * (1 - an) / (1 - at))
    c2 = np.sqrt(max(1 - an - c1 ** 2, 0.0))
    x = np.sqrt(an) * x0 + c2 * e + (c1 * noises[i] if eta > 0 else 0.0)
  return x


def test_uniform_timesteps_are_the_official_stride():
  np.testing.assert_array_equal(mmd_ddm.uniform_timesteps(5, 1000),
                                list(range(0, 1000, 200))[::-1])
  np.testing.assert_array_equal(mmd_ddm.uniform_timesteps(20, 1000),
                                list(range(0, 1000, 50))[::-1])


def test_eta0_is_deterministic_and_matches_numpy_loop():
  params, ac = toy_params(), sch.make_alphas_cumprod("linear", 1000)
  ts = mmd_ddm.uniform_timesteps(5)
  z = jax.random.normal(jax.random.key(3), (8, 2))
  run = jit(lambda p, z: mmd_ddm.sample(toy_apply, p, z, ac, ts))
  a, b = np.asarray(run(params, z)), np.asarray(run(params, z))
  np.testing.assert_array_equal(a, b)
  ref = np_generalized_steps(params, np.asarray(z), ac, ts, 0.0, None)
  np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-4)


def test_full_grid_eta1_is_ddpm_ancestral():
  # T' = T with eta = 1: DDIM's sigma is DDPM's posterior std, so the samplers coincide
  # for the same per-step noise (and both equal the numpy ancestral loop).
  num_t = 50
  params = toy_params(1)
  ac = sch.make_alphas_cumprod("linear", num_t, beta_start=1e-3, beta_end=0.2)
  ts = mmd_ddm.uniform_timesteps(num_t, num_t)
  z = jax.random.normal(jax.random.key(4), (6, 2))
  key = jax.random.key(5)
  ours = np.asarray(jit(lambda p: mmd_ddm.sample(toy_apply, p, z, ac, ts, eta=1.0,
                                                 key=key))(params))
  model_fn = lambda x, t, c: toy_apply(params, x, t)
  ddpm = np.asarray(jit(lambda: smp.ddpm(model_fn, z, None, ac, jnp.asarray(ts), key=key))())
  np.testing.assert_allclose(ours, ddpm, rtol=1e-4, atol=1e-4)
  noises = [np.asarray(jax.random.normal(k, z.shape), np.float64)
            for k in jax.random.split(key, num_t)]
  ref = np_generalized_steps(params, np.asarray(z), ac, ts, 1.0, noises)
  np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3)


def test_remat_gives_the_same_loss_and_gradient():
  params, ac = toy_params(), sch.make_alphas_cumprod("linear", 1000)
  ts = mmd_ddm.uniform_timesteps(5)
  data = jax.random.normal(jax.random.key(6), (16, 2))
  z = jax.random.normal(jax.random.key(7), (16, 2))
  kernel = mmd_ddm.make_kernel("gaussian", bandwidths=(0.5, 1.0, 2.0))
  out = [jit(jax.value_and_grad(lambda p, r=r: mmd_ddm.mmd_loss(
      toy_apply, p, data, z, ac, ts, kernel, remat=r)))(params) for r in (False, True)]
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(out[1][1])) > 1e-4


_FD_CODE = textwrap.dedent("""
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jaxrepro.algorithms.diffusion import mmd_ddm
    from jaxrepro.algorithms.diffusion import schedules as sch

    def apply(p, x, t):
      return jnp.tanh(x @ p["w"] + p["b"] + p["c"] * t[:, None] / 1000.0)

    rng = np.random.default_rng(0)
    p = {"w": 0.3 * rng.standard_normal((2, 2)), "b": 0.1 * rng.standard_normal(2),
         "c": 0.5 * rng.standard_normal(2)}
    ac = jnp.asarray(np.asarray(sch.make_alphas_cumprod("linear", 1000)), jnp.float64)
    ts = mmd_ddm.uniform_timesteps(2)
    data = rng.standard_normal((12, 2))
    z = rng.standard_normal((12, 2))
    kernel = mmd_ddm.make_kernel("gaussian", bandwidths=(0.5, 1.0, 2.0))
    loss = jax.jit(lambda p: mmd_ddm.mmd_loss(apply, p, data, z, ac, ts, kernel))
    grad = jax.grad(lambda p: mmd_ddm.mmd_loss(apply, p, data, z, ac, ts, kernel))(p)
    assert loss(p).dtype == jnp.float64
    h, worst, largest = 1e-6, 0.0, 0.0
    for name in p:
      for idx in np.ndindex(p[name].shape):
        up = {k: v.copy() for k, v in p.items()}; up[name][idx] += h
        dn = {k: v.copy() for k, v in p.items()}; dn[name][idx] -= h
        fd = (float(loss(up)) - float(loss(dn))) / (2 * h)
        worst = max(worst, abs(fd - float(grad[name][idx])))
        largest = max(largest, abs(fd))
    assert largest > 1e-3, largest
    assert worst < 1e-7 + 1e-6 * largest, (worst, largest)
    print("ok", worst, largest)
""")


def test_gradient_through_two_step_sampler_matches_finite_differences():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-c", _FD_CODE], capture_output=True, text=True,
                          env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("ok")


# -------------------------------------------------------------------------- data parallel


@pytest.mark.parametrize("kernel_name", ["polynomial", "gaussian"])
def test_sharded_loss_and_grad_equal_single_device(kernel_name):
  mesh = mesh_lib.make_mesh((8,), ("data",))
  params, ac = toy_params(2), sch.make_alphas_cumprod("linear", 1000)
  ts = mmd_ddm.uniform_timesteps(3)
  kernel = mmd_ddm.make_kernel(kernel_name, bandwidths=(0.5, 1.0, 2.0))
  # Rank-coded data (row i is shifted by i / 10) so a misordered gather would show.
  data = (jax.random.normal(jax.random.key(8), (16, 2))
          + jnp.arange(16, dtype=jnp.float32)[:, None] / 10)
  z = jax.random.normal(jax.random.key(9), (16, 2))
  single = jit(jax.value_and_grad(
      lambda p: mmd_ddm.mmd_loss(toy_apply, p, data, z, ac, ts, kernel)))(params)
  sharded_loss = mmd_ddm.make_sharded_mmd_loss(toy_apply, ac, ts, kernel, mesh)
  sharded = jit(jax.value_and_grad(lambda p: sharded_loss(p, data, z)))(params)
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(single[1])) > 1e-4
  # The training loss built on the mesh (fresh noise from the key) equals the plain one.
  plain = mmd_ddm.make_loss_fn(toy_apply, ac, ts, kernel)
  on_mesh = mmd_ddm.make_loss_fn(toy_apply, ac, ts, kernel, mesh=mesh)
  key = jax.random.key(11)
  np.testing.assert_allclose(jit(lambda p: on_mesh(p, data, key)[0])(params),
                             jit(lambda p: plain(p, data, key)[0])(params), rtol=1e-5)


# ------------------------------------------------------------------------------ training


def test_fine_tuning_steps_lower_the_loss():
  # A linear eps-model makes the eta = 0 sampler affine in z, so it can reach the Gaussian
  # data exactly; 60 clipped Adam steps on the MMD must at least halve it (measured on
  # fresh noise, not the training draws).
  params, ac = toy_params(3), sch.make_alphas_cumprod("linear", 1000)
  linear = lambda p, x, t: x @ p["w"] + p["b"] + p["c"] * t[:, None] / 1000.0
  ts = mmd_ddm.uniform_timesteps(3)
  # The untrained samples lie ~10 units away: wide bandwidths keep the gradient alive.
  kernel = mmd_ddm.make_kernel("gaussian", bandwidths=(1.0, 2.0, 4.0))
  loss_fn = mmd_ddm.make_loss_fn(linear, ac, ts, kernel)
  tx = mmd_ddm.make_optimizer(3e-2)
  data = 0.2 * jax.random.normal(jax.random.key(10), (64, 2)) + jnp.array([1.0, -0.5])

  @jit
  def run(params):
    def body(carry, i):
      p, o = carry
      p, o, loss = mmd_ddm.train_step(loss_fn, tx, p, o, data, jax.random.key(i))
      return (p, o), loss
    (p, _), losses = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(60))
    return p, losses

  tuned, losses = run(params)
  held = lambda p: loss_fn(p, data, jax.random.key(999))[0]
  assert float(held(tuned)) < 0.5 * float(held(params)), (held(tuned), held(params))
  assert np.all(np.isfinite(np.asarray(losses)))


def test_eps_loss_is_zero_for_the_exact_denoiser_of_a_point_mass():
  # Data = a point mass at 0: x_t = sqrt(1 - abar) eps, so eps = x_t / sqrt(1 - abar_t).
  ac = sch.make_alphas_cumprod("linear", 1000)
  exact = lambda p, x, t: x / jnp.sqrt(1.0 - ac[t])[:, None]
  loss = mmd_ddm.eps_loss(exact, None, jnp.zeros((32, 2)), jax.random.key(0), ac)
  assert float(loss) < 1e-8
  assert float(mmd_ddm.eps_loss(lambda p, x, t: 0 * x, None, jnp.zeros((256, 2)),
                                jax.random.key(0), ac)) == pytest.approx(1.0, abs=0.15)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="kernel name"):
    mmd_ddm.make_kernel("laplace")
  with pytest.raises(ValueError, match="bandwidths"):
    mmd_ddm.make_kernel("gaussian", bandwidths=(0.1, -1.0))
  with pytest.raises(ValueError, match="degree"):
    mmd_ddm.make_kernel("polynomial", degree=0)
  with pytest.raises(ValueError, match="learning_rate"):
    mmd_ddm.make_optimizer(0.0)
  with pytest.raises(ValueError, match="x and y"):
    mmd_ddm.mmd2_unbiased(jnp.zeros((1, 2)), jnp.zeros((4, 2)), mmd_ddm.make_kernel("rbf"))
  if jax.device_count() >= 8:
    mesh = mesh_lib.make_mesh((8,), ("data",))
    kernel = mmd_ddm.make_kernel("rbf")
    ac, ts = sch.make_alphas_cumprod("linear", 1000), mmd_ddm.uniform_timesteps(2)
    with pytest.raises(ValueError, match="axis_name"):
      mmd_ddm.make_sharded_mmd_loss(toy_apply, ac, ts, kernel, mesh, axis_name="clients")
    loss = mmd_ddm.make_sharded_mmd_loss(toy_apply, ac, ts, kernel, mesh)
    with pytest.raises(ValueError, match="multiple"):
      loss(toy_params(), jnp.zeros((12, 2)), jnp.zeros((16, 2)))


# ------------------------------------------------------------------ the driver's config


@pytest.mark.parametrize("variant", ["smoke", "demo", "paper"])
def test_config_variants_are_valid(variant):
  config = cfg_lib.get_config(variant)
  check_choices(config, cfg_lib.CHOICES)
  drv.check_config(config)
  assert config.mmd.num_steps == 5 and config.optim.grad_clip == 0.5


@pytest.mark.parametrize("field, value, match", [
    ("mmd.bandwidths", "0.1,-2", "bandwidths"),
    ("eval.bandwidths", "wide", "bandwidths"),
    ("mmd.eta", -0.5, "eta"),
    ("mmd.num_steps", 2000, "num_timesteps"),
    ("mmd.batch_size", 1, "batch_size"),
    ("mmd.eval_every", 30, "eval_every"),
    ("optim.lr", 0.0, "optim.lr"),
])
def test_bad_config_values_raise_config_error(field, value, match):
  config = cfg_lib.get_config("demo")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=match):
    drv.check_config(config)
