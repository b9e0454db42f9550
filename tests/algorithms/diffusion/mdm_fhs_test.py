"""Oracle tests of the first-hitting sampler, the time-stepped sampler and the race analysis.

Oracles (spec card 8): exact enumeration of random-order any-order-AR decoding at L = 3,
V = 2 with a fixed lookup-table "network"; an exact dynamic programme for the N-step sampler;
the closed-form CDF of the first-hitting time; the closed-form b-bit race frequencies.
"""

import itertools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxrepro.algorithms.diffusion import mdm_fhs
from jaxrepro.algorithms.diffusion.masked import MaskSchedule

L, V, MASK = 3, 2, 2
SCHEDULES = [MaskSchedule("linear"), MaskSchedule("cosine"), MaskSchedule("loglinear", 1e-3)]
OUTCOMES = list(itertools.product(range(V), repeat=L))


def _mask_prob_np(name, t, eps=1e-3):
  """Independent closed forms of 1 - alpha_t."""
  return {"linear": t, "cosine": np.sin(np.pi * t / 2), "loglinear": (1 - eps) * t}[name]


@pytest.fixture(scope="module")
def table():
  """A fixed arbitrary conditional table: [3^L states, L positions, V] logits."""
  rng = np.random.default_rng(7)
  return 1.5 * rng.normal(size=(3 ** L, L, V))


def _state_index(x):
  return int(sum(v * 3 ** i for i, v in enumerate(x)))


def _probs(table, x, pos):
  z = table[_state_index(x), pos]
  e = np.exp(z - z.max())
  return e / e.sum()


def _decode_exact(table, orders):
  """Exact output distribution of AR decoding with orders drawn uniformly from `orders`."""
  dist = np.zeros(len(OUTCOMES))
  for order in orders:
    for n, out in enumerate(OUTCOMES):
      x, p = [MASK] * L, 1.0
      for pos in order:
        p *= _probs(table, x, pos)[out[pos]]
        x[pos] = out[pos]
      dist[n] += p / len(orders)
  return dist


def _stepped_exact(table, num_steps, name):
  """Exact output law of the N-step sampler by dynamic programming over the 3^L states."""
  law = {(MASK,) * L: 1.0}
  for k in range(num_steps):
    t, s = 1 - k / num_steps, 1 - (k + 1) / num_steps
    m_t, m_s = _mask_prob_np(name, t), _mask_prob_np(name, s)
    new = {}
    for x, px in law.items():
      masked = [i for i in range(L) if x[i] == MASK]
      # Every masked position independently: token v w.p. (m_t - m_s)/m_t p(v|x), else stays.
      options = []
      for i in masked:
        probs = _probs(table, list(x), i)
        opts = [(v, (m_t - m_s) / m_t * probs[v]) for v in range(V)] + [(MASK, m_s / m_t)]
        options.append(opts)
      for combo in itertools.product(*options):
        y, p = list(x), px
        for i, (v, pv) in zip(masked, combo):
          y[i] = v
          p *= pv
        new[tuple(y)] = new.get(tuple(y), 0.0) + p
    law = new
  return np.array([law.get(o, 0.0) for o in OUTCOMES])


def _histogram(tokens):
  codes = np.asarray(tokens) @ (V ** np.arange(L)[::-1])
  return np.bincount(codes, minlength=V ** L)


def _chi2_pvalue(counts, probs):
  return stats.chisquare(counts, counts.sum() * probs).pvalue


@pytest.fixture(scope="module")
def exact(table):
  aoarm = _decode_exact(table, list(itertools.permutations(range(L))))
  l2r = _decode_exact(table, [tuple(range(L))])
  return aoarm, l2r


@pytest.fixture(scope="module")
def logits_fn(table):
  tab = jnp.asarray(table, jnp.float32)
  powers = jnp.asarray(3 ** np.arange(L), jnp.int32)
  return lambda x: tab[x @ powers]


def test_oracle_has_power(exact):
  aoarm, l2r = exact
  assert abs(aoarm.sum() - 1) < 1e-12
  # A left-to-right (or otherwise wrong-order) sampler must be distinguishable.
  assert 0.5 * np.abs(aoarm - l2r).sum() > 0.05


@pytest.fixture(scope="module")
def fhs_runs(logits_fn):
  x_init = jnp.full((100_000, L), MASK, jnp.int32)
  runs = {}
  for sched in SCHEDULES:
    f = jax.jit(lambda key, s=sched: mdm_fhs.first_hitting_sample(
        key, logits_fn, x_init, mask_id=MASK, schedule=s))
    runs[sched.name] = f(jax.random.key(0))
  return runs


def test_fhs_matches_any_order_ar_exactly(fhs_runs, exact):
  aoarm, l2r = exact
  for name, out in fhs_runs.items():
    counts = _histogram(out.tokens)
    assert int(out.nfe) == L
    assert _chi2_pvalue(counts, aoarm) > 1e-3, name
    assert _chi2_pvalue(counts, l2r) < 1e-8, name


def test_fhs_tokens_do_not_depend_on_schedule(fhs_runs):
  # Same key: the time draws use their own key stream, so only `times` may differ.
  ref = np.asarray(fhs_runs["linear"].tokens)
  for name in ("cosine", "loglinear"):
    np.testing.assert_array_equal(np.asarray(fhs_runs[name].tokens), ref)
  # (loglinear is a rescaled linear schedule, so its times coincide with linear's.)
  assert np.abs(np.asarray(fhs_runs["cosine"].times - fhs_runs["linear"].times)).max() > 0.05


def test_fhs_unmask_times_follow_the_forward_process(fhs_runs):
  # A token's unmasking time T has P(T <= s) = 1 - alpha_s under the forward process.
  for sched in SCHEDULES:
    times = np.asarray(fhs_runs[sched.name].times[:20_000, 0], np.float64)
    cdf = lambda s, n=sched.name: _mask_prob_np(n, np.clip(s, 0, 1)) / _mask_prob_np(n, 1.0)
    assert stats.kstest(times, cdf).pvalue > 1e-3, sched.name


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("t,n", [(1.0, 1), (1.0, 5), (0.6, 3)])
def test_first_hitting_time_cdf(sched, t, n):
  tau = np.asarray(mdm_fhs.first_hitting_time(
      jax.random.key(1), jnp.full((20_000,), t), n, sched), np.float64)
  assert tau.min() >= 0 and tau.max() <= t
  m_t = _mask_prob_np(sched.name, t)
  cdf = lambda s, n=n: (_mask_prob_np(sched.name, np.clip(s, 0, t)) / m_t) ** n
  assert stats.kstest(tau, cdf).pvalue > 1e-3
  wrong = lambda s, n=n: (_mask_prob_np(sched.name, np.clip(s, 0, t)) / m_t) ** (n + 1)
  assert stats.kstest(tau, wrong).pvalue < 1e-6


def test_fhs_under_vmap_over_keys(logits_fn, exact):
  # The sampler is batched natively, and also composes with vmap (one sequence per key).
  x1 = jnp.full((1, L), MASK, jnp.int32)
  keys = jax.random.split(jax.random.key(8), 30_000)
  out = jax.jit(jax.vmap(lambda k: mdm_fhs.first_hitting_sample(k, logits_fn, x1,
                                                                mask_id=MASK)))(keys)
  assert out.tokens.shape == (30_000, 1, L)
  assert _chi2_pvalue(_histogram(out.tokens[:, 0]), exact[0]) > 1e-3


def test_unmask_probability_and_entropy():
  t, s = jnp.asarray(0.8), jnp.asarray(0.3)
  np.testing.assert_allclose(mdm_fhs.unmask_probability(MaskSchedule("linear"), t, s),
                             0.5 / 0.8, rtol=1e-6)
  cos = np.sin(np.pi * 0.4), np.sin(np.pi * 0.15)
  np.testing.assert_allclose(mdm_fhs.unmask_probability(MaskSchedule("cosine"), t, s),
                             (cos[0] - cos[1]) / cos[0], rtol=1e-5)
  np.testing.assert_allclose(mdm_fhs.entropy(jnp.full((7,), 1 / 7)), np.log(7), rtol=1e-6)
  np.testing.assert_allclose(mdm_fhs.entropy(jnp.asarray([1.0, 0.0])), 0.0, atol=1e-7)


def test_fhs_conditional_infill(logits_fn, table):
  # Position 1 given; the rest decoded in random order: an exact conditional oracle.
  x_init = jnp.tile(jnp.asarray([[MASK, 1, MASK]], jnp.int32), (60_000, 1))
  out = jax.jit(lambda k: mdm_fhs.first_hitting_sample(k, logits_fn, x_init, mask_id=MASK))(
      jax.random.key(3))
  assert int(out.nfe) == 2
  assert np.all(np.asarray(out.tokens[:, 1]) == 1)
  dist = np.zeros(len(OUTCOMES))
  for order in [(0, 2), (2, 0)]:
    for n, o in enumerate(OUTCOMES):
      if o[1] != 1:
        continue
      x, p = [MASK, 1, MASK], 0.5
      for pos in order:
        p *= _probs(table, x, pos)[o[pos]]
        x[pos] = o[pos]
      dist[n] += p
  counts = _histogram(out.tokens)
  keep = dist > 0
  assert counts[~keep].sum() == 0
  assert _chi2_pvalue(counts[keep], dist[keep]) > 1e-3


def test_stepped_few_steps_matches_its_dynamic_programme(logits_fn, table, exact):
  x_init = jnp.full((100_000, L), MASK, jnp.int32)
  out = jax.jit(lambda k: mdm_fhs.time_stepped_sample(
      k, logits_fn, x_init, num_steps=2, mask_id=MASK))(jax.random.key(4))
  assert int(out.nfe) == 2
  law = _stepped_exact(table, 2, "linear")
  counts = _histogram(out.tokens)
  assert _chi2_pvalue(counts, law) > 1e-3
  # With two steps, tokens unmasked together are conditionally independent: not AO-ARM.
  assert 0.5 * np.abs(law - exact[0]).sum() > 0.02
  assert _chi2_pvalue(counts, exact[0]) < 1e-8


def test_stepped_many_steps_converges_to_fhs_law(logits_fn, table, exact):
  aoarm = exact[0]
  # The exact N-step law approaches the AO-ARM law as N grows (the FHS limit).
  tvs = [0.5 * np.abs(_stepped_exact(table, n, "cosine") - aoarm).sum() for n in (4, 32, 256)]
  assert tvs[0] > tvs[1] > tvs[2] and tvs[2] < 2e-3
  x_init = jnp.full((60_000, L), MASK, jnp.int32)
  out = jax.jit(lambda k: mdm_fhs.time_stepped_sample(
      k, logits_fn, x_init, num_steps=256, mask_id=MASK, schedule=MaskSchedule("cosine")))(
          jax.random.key(5))
  assert _chi2_pvalue(_histogram(out.tokens), aoarm) > 1e-3


RACE_RATIOS = (2.0 ** -8, 2.0 ** -10, 2.0 ** -12)
GROUP = 32


def _race_p():
  """Dominant "stay" option plus GROUP options at each ratio r; normalised."""
  p = np.concatenate([[1.0]] + [np.full(GROUP, r) for r in RACE_RATIOS])
  return p / p.sum()


def _group_sums(v):
  return [float(np.sum(v[1 + g * GROUP:1 + (g + 1) * GROUP])) for g in range(len(RACE_RATIOS))]


def test_truncation_factor_limits():
  c = jnp.asarray([0.0, 1e-6, 1.0, 4.0, 1e3, np.inf])
  m = np.asarray(mdm_fhs.truncation_factor(c))
  expected = [1.0, 1.0, 1 / (np.e - 1), 4 / (np.e ** 4 - 1), 0.0, 0.0]
  np.testing.assert_allclose(m, expected, rtol=1e-5, atol=1e-30)


def test_effective_probabilities_closed_form():
  p = _race_p()
  q = np.asarray(mdm_fhs.effective_race_probabilities(jnp.asarray(p, jnp.float32), 12))
  np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-6)
  # Hand-evaluated: the r = 2^-12 options keep a fraction m(1) = 1/(e - 1) of their mass.
  np.testing.assert_allclose(q[-1] / p[-1], 1 / (np.e - 1), rtol=1e-3)
  assert q[0] > p[0]
  q52 = np.asarray(mdm_fhs.effective_race_probabilities(jnp.asarray(p, jnp.float32), 52))
  np.testing.assert_allclose(q52, p, rtol=1e-6)


def test_race_monte_carlo_matches_formula_at_12_bits():
  p = _race_p()
  n = 1 << 20
  counts = np.asarray(jax.jit(lambda k: mdm_fhs.race_sample_counts(
      k, jnp.asarray(p, jnp.float32), 12, n))(jax.random.key(6)))
  assert counts.sum() == n
  measured = np.array(_group_sums(counts)) / n
  formula = np.array(_group_sums(np.asarray(
      mdm_fhs.effective_race_probabilities(jnp.asarray(p, jnp.float32), 12), np.float64)))
  truth = np.array(_group_sums(p))
  np.testing.assert_allclose(measured, formula, rtol=0.10)
  # The bias is real at r = 2^-12: an unbiased sampler would fail the line above.
  assert measured[-1] < 0.7 * truth[-1]


def test_float64_requires_x64():
  with pytest.raises(ValueError, match="jax_enable_x64"):
    mdm_fhs.categorical(jax.random.key(0), jnp.zeros((3,)), dtype=jnp.float64)
  with pytest.raises(ValueError, match="bits"):
    mdm_fhs.race_sample_counts(jax.random.key(0), jnp.ones((3,)), 53, 8, chunk_size=8)


def test_bad_arguments_raise(logits_fn):
  x = jnp.full((2, L), MASK, jnp.int32)
  with pytest.raises(ValueError, match="num_steps"):
    mdm_fhs.time_stepped_sample(jax.random.key(0), logits_fn, x, num_steps=0, mask_id=MASK)
  with pytest.raises(ValueError, match="x_init"):
    mdm_fhs.first_hitting_sample(jax.random.key(0), logits_fn, x[0], mask_id=MASK)
  with pytest.raises(ValueError, match="dtype"):
    mdm_fhs.categorical(jax.random.key(0), jnp.zeros((3,)), dtype=jnp.float16)
  with pytest.raises(ValueError, match="logits_fn"):
    mdm_fhs.first_hitting_sample(jax.random.key(0), lambda t: jnp.zeros((2, V)), x,
                                 mask_id=MASK)


_X64_CODE = textwrap.dedent("""
    import itertools
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from scipy import stats
    from jaxrepro.algorithms.diffusion import mdm_fhs

    # (1) the 53-bit race is unbiased where the 12-bit one loses ~40% of the mass.
    ratios, group = (2.0 ** -8, 2.0 ** -10, 2.0 ** -12), 32
    p = np.concatenate([[1.0]] + [np.full(group, r) for r in ratios]); p /= p.sum()
    n = 1 << 20
    counts = np.asarray(jax.jit(lambda k: mdm_fhs.race_sample_counts(k, jnp.asarray(p), 53, n))(
        jax.random.key(0)))
    for g in range(3):
      sl = slice(1 + g * group, 1 + (g + 1) * group)
      mean, sd = n * p[sl].sum(), np.sqrt(n * p[sl].sum())
      assert abs(counts[sl].sum() - mean) < 5 * sd, (g, counts[sl].sum(), mean)

    # (2) float64 Gumbel noise reaches past the float32 cap -log(-log(1 - 2^-23)) ~ 15.94,
    # which float32 noise never exceeds (expected 2^26 * 2^-23 = 8 exceedances).
    cap = -np.log(-np.log1p(-2.0 ** -23))
    def exceed(dtype):
      def body(i, c):
        g = mdm_fhs.gumbel_noise(jax.random.fold_in(jax.random.key(1), i), (1 << 22,), dtype)
        return c + jnp.sum(g > cap + 1e-3)
      return int(jax.jit(lambda: jax.lax.fori_loop(0, 16, body, 0))())
    assert exceed(jnp.float32) == 0
    assert exceed(jnp.float64) >= 1

    # (3) the float64 categorical passes a chi-square test.
    probs = np.array([0.7, 0.2, 0.09, 0.009, 0.001])
    draws = mdm_fhs.categorical(jax.random.key(2), jnp.log(jnp.asarray(probs))[None]
                                * jnp.ones((400_000, 1)), dtype=jnp.float64)
    obs = np.bincount(np.asarray(draws), minlength=5)
    assert stats.chisquare(obs, obs.sum() * probs).pvalue > 1e-3

    # (4) the float64 time-stepped sampler matches its exact law (independent product form).
    rng = np.random.default_rng(3)
    q = rng.dirichlet(np.ones(3), size=2)
    logits_fn = lambda x: jnp.broadcast_to(jnp.log(jnp.asarray(q)), x.shape + (3,))
    out = mdm_fhs.time_stepped_sample(jax.random.key(4), logits_fn,
                                      jnp.full((100_000, 2), 3, jnp.int32), num_steps=8,
                                      mask_id=3, dtype=jnp.float64)
    codes = np.asarray(out.tokens) @ np.array([3, 1])
    law = np.outer(q[0], q[1]).ravel()
    obs = np.bincount(codes, minlength=9)
    assert stats.chisquare(obs, obs.sum() * law).pvalue > 1e-3

    # (5) so does the float64 first-hitting sampler.
    out = mdm_fhs.first_hitting_sample(jax.random.key(5), logits_fn,
                                       jnp.full((100_000, 2), 3, jnp.int32), mask_id=3,
                                       dtype=jnp.float64)
    obs = np.bincount(np.asarray(out.tokens) @ np.array([3, 1]), minlength=9)
    assert out.times.dtype == jnp.float32
    assert stats.chisquare(obs, obs.sum() * law).pvalue > 1e-3
    print("ok")
""")


def test_float64_sampling_is_unbiased_in_subprocess():
  res = subprocess.run([sys.executable, "-c", _X64_CODE], capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.strip().endswith("ok")
