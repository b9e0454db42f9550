"""Oracle tests of the absorbing process: schedules, masking, and the time-agnostic bound.

Oracles: independent numpy closed forms of the schedules and finite differences; binomial
masking rates; the lambda-DCE expectation sum_i H(p_i) for a product-form p_0 and a perfect
model (RADD card); the NLL bound by exact enumeration of masks, equal under quadrature of the
continuous-time ELBO for the linear and cosine schedules (paper card 8).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from jaxrepro.algorithms.diffusion import masked
from jaxrepro.algorithms.diffusion.masked import MaskSchedule

EPS = 1e-3
CLOSED_FORMS = {
    "linear": lambda t: 1 - t,
    "cosine": lambda t: 1 - np.sin(np.pi * t / 2),
    "loglinear": lambda t: np.exp(np.log1p(-(1 - EPS) * t)),  # e^{-sigma(t)}
}


@pytest.mark.parametrize("name", masked.SCHEDULES)
def test_schedule_closed_form_inverse_and_derivative(name):
  sched = MaskSchedule(name, EPS)
  t = np.linspace(0.0, 1.0, 101)
  alpha = np.asarray(sched.alpha(jnp.asarray(t)), np.float64)
  np.testing.assert_allclose(alpha, CLOSED_FORMS[name](t), atol=2e-6)
  assert alpha[0] == 1.0 and np.all(np.diff(alpha) < 0)
  np.testing.assert_allclose(alpha[-1], EPS if name == "loglinear" else 0.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sched.alpha_inv(jnp.asarray(alpha))), t, atol=2e-3)
  t_in = np.linspace(0.05, 0.95, 19)
  # alpha_inv is smooth away from the cosine's flat end; check it tightly there.
  np.testing.assert_allclose(
      np.asarray(sched.alpha_inv(sched.alpha(jnp.asarray(t_in)))), t_in, atol=1e-5)
  h = 1e-4
  fd = (CLOSED_FORMS[name](t_in + h) - CLOSED_FORMS[name](t_in - h)) / (2 * h)
  np.testing.assert_allclose(np.asarray(sched.alpha_prime(jnp.asarray(t_in))), fd, rtol=1e-4)
  w = -fd / (1 - CLOSED_FORMS[name](t_in))
  np.testing.assert_allclose(np.asarray(sched.elbo_weight(jnp.asarray(t_in))), w, rtol=1e-4)


def test_schedule_validation():
  with pytest.raises(ValueError, match="name"):
    MaskSchedule("quadratic")
  with pytest.raises(ValueError, match="eps"):
    MaskSchedule("loglinear", 1.0)


def test_mask_tokens_rate_and_values():
  key = jax.random.key(0)
  x0 = jax.random.randint(key, (4, 4096), 0, 7)
  lam = jnp.asarray([0.0, 0.1, 0.5, 1.0])
  xt, is_masked = jax.jit(lambda k: masked.mask_tokens(k, x0, lam, 7))(jax.random.key(1))
  rate = np.asarray(is_masked).mean(1)
  sd = np.sqrt(np.asarray(lam) * (1 - np.asarray(lam)) / 4096) + 1e-9
  assert np.all(np.abs(rate - np.asarray(lam)) < 5 * sd)
  np.testing.assert_array_equal(np.asarray(xt), np.where(is_masked, 7, np.asarray(x0)))
  with pytest.raises(ValueError, match="mask_prob"):
    masked.mask_tokens(key, x0, jnp.ones((3,)), 7)
  with pytest.raises(ValueError, match="mask_id"):
    masked.mask_tokens(key, x0, lam, -1)


def test_mask_k_tokens_exact_count_and_uniform_positions():
  x0 = jnp.zeros((20_000, 6), jnp.int32)
  k = jnp.arange(20_000) % 7
  _, is_masked = masked.mask_k_tokens(jax.random.key(2), x0, k, 9)
  is_masked = np.asarray(is_masked)
  np.testing.assert_array_equal(is_masked.sum(1), np.asarray(k))
  # Each position is masked with probability k / L.
  freq = is_masked.mean(0)
  np.testing.assert_allclose(freq, np.mean(np.asarray(k)) / 6, atol=0.01)


def test_sample_mask_prob_stratified():
  lam = np.asarray(masked.sample_mask_prob(jax.random.key(3), 64))
  assert lam.min() > 0 and lam.max() <= 1
  np.testing.assert_array_equal(np.sort(np.floor(lam * 64 - 1e-6)), np.arange(64))


@pytest.fixture(scope="module")
def product_model():
  """A product-form p_0 over L = 8 positions, V = 5, and its perfect (time-free) model."""
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.full(5, 0.7), size=8)
  entropy_sum = float(-(p * np.log(p)).sum())
  return p, entropy_sum


def test_losses_on_perfect_product_model_equal_entropy(product_model):
  p, entropy_sum = product_model
  batch = 16_384
  logp = jnp.log(jnp.asarray(p, jnp.float32))
  key_x, key_l, key_m, key_k, key_t = jax.random.split(jax.random.key(4), 5)
  x0 = jax.random.categorical(key_x, logp, shape=(batch, 8))
  logits = jnp.broadcast_to(logp, (batch, 8, 5))

  lam = masked.sample_mask_prob(key_l, batch)
  _, m = masked.mask_tokens(key_m, x0, lam, 5)
  losses = {"lambda": masked.lambda_dce_loss(logits, x0, m, lam)}
  k = jax.random.randint(key_k, (batch,), 1, 9)
  _, m = masked.mask_k_tokens(key_m, x0, k, 5)
  losses["k"] = masked.k_dce_loss(logits, x0, m)
  for name in ("linear", "cosine"):
    sched = MaskSchedule(name)
    t = masked.sample_mask_prob(key_t, batch)  # stratified t in (0, 1]
    _, m = masked.mask_tokens(key_m, x0, sched.mask_prob(t), 5)
    losses[name] = masked.time_weighted_loss(logits, x0, m, t, sched)
  for name, loss in losses.items():
    loss = np.asarray(loss, np.float64)
    se = loss.std() / np.sqrt(batch)
    assert abs(loss.mean() - entropy_sum) < 5 * se + 1e-3, (name, loss.mean(), entropy_sum, se)


@pytest.fixture(scope="module")
def tiny_joint():
  """A non-product joint over V^L (L = 3, V = 3) and an arbitrary time-free network."""
  rng = np.random.default_rng(1)
  joint = rng.dirichlet(np.full(27, 0.5)).reshape(3, 3, 3)
  table = rng.normal(size=(4 ** 3, 3, 3))  # logits per (partially masked state, position)
  return joint, table


def _state_index(x):
  return int(sum(v * 4 ** i for i, v in enumerate(x)))


def _nll_table(table, x0, mask_set):
  """sum_{i in M} -log softmax(table[x_M])[x0_i] for one mask set M."""
  xt = [3 if i in mask_set else x0[i] for i in range(3)]
  z = table[_state_index(xt)]
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -sum(logp[i, x0[i]] for i in mask_set)


def _bound_k_sum(table, x0):
  """sum_k (1/k) mean_{|M|=k} sum_{i in M} nll_i(M), by enumeration of all masks."""
  total = 0.0
  for k in range(1, 4):
    sets = list(itertools.combinations(range(3), k))
    total += np.mean([_nll_table(table, x0, set(s)) for s in sets]) / k
  return total


def test_elbo_is_schedule_free_by_quadrature(tiny_joint):
  _, table = tiny_joint
  x0 = (2, 0, 1)

  def expected_masked_nll(lam):
    # E over independent masks with probability lam of the masked NLL sum (2^L terms).
    total = 0.0
    for bits in itertools.product([0, 1], repeat=3):
      mask_set = {i for i in range(3) if bits[i]}
      total += lam ** len(mask_set) * (1 - lam) ** (3 - len(mask_set)) * _nll_table(
          table, x0, mask_set)
    return total

  exact = _bound_k_sum(table, x0)
  for name in ("linear", "cosine"):
    sched = MaskSchedule(name)
    integrand = lambda t, s=sched: float(s.elbo_weight(t)) * expected_masked_nll(
        float(s.mask_prob(t)))
    value, _ = integrate.quad(integrand, 1e-9, 1.0, limit=200)
    np.testing.assert_allclose(value, exact, rtol=1e-5)


def test_any_order_nll_bound_expectation(tiny_joint):
  joint, table = tiny_joint
  x0 = (2, 0, 1)
  batch = 40_000
  x = jnp.tile(jnp.asarray([x0], jnp.int32), (batch, 1))
  powers = jnp.asarray(4 ** np.arange(3), jnp.int32)

  # (a) an arbitrary network: the estimate is unbiased for the enumerated k-sum.
  tab = jnp.asarray(table, jnp.float32)
  est = np.asarray(masked.any_order_nll_bound(jax.random.key(5), lambda t: tab[t @ powers], x, 3))
  se = est.std() / np.sqrt(batch)
  assert abs(est.mean() - _bound_k_sum(table, x0)) < 5 * se + 1e-4

  # (b) the exact conditionals of the joint: every order's chain rule gives -log p(x0).
  cond = np.zeros((4 ** 3, 3, 3))
  for xt in itertools.product(range(4), repeat=3):
    for i in (j for j in range(3) if xt[j] == 3):
      # p(x_i = v | unmasked part of xt) by summing the joint over the masked positions.
      w = np.zeros(3)
      for full in itertools.product(range(3), repeat=3):
        if all(xt[j] == 3 or xt[j] == full[j] for j in range(3)):
          w[full[i]] += joint[full]
      cond[_state_index(xt), i] = np.log(w / w.sum())
  ctab = jnp.asarray(cond, jnp.float32)
  est = np.asarray(masked.any_order_nll_bound(jax.random.key(6), lambda t: ctab[t @ powers],
                                              x[:2000], 3))
  se = est.std() / np.sqrt(2000)
  assert abs(est.mean() + np.log(joint[x0])) < 5 * se + 1e-4


def test_token_nll_shape_check():
  with pytest.raises(ValueError, match="logits"):
    masked.token_nll(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
