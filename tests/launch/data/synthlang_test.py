"""Tests of SynthLang against brute-force enumeration over hidden paths and strings."""

import itertools

import jax
import numpy as np
import pytest

from jaxrepro.launch.data import synthlang as sl

T = 3
TINY = sl.make_synthlang(3, vocab_size=8, num_domains=2, states_per_domain=4, max_run=2,
                         identifier_support=3, floor=0.05, domain_switch=0.1)
STRINGS = np.array(list(itertools.product(range(8), repeat=T)), np.int32)


def _brute(lang, emission, transition, initial):
  """p(x) for every string of length T by summing over all S^T hidden paths."""
  s = lang.num_states
  probs = np.zeros(len(STRINGS))
  for path in itertools.product(range(s), repeat=T):
    w = initial[path[0]] * np.prod([transition[path[i - 1], path[i]] for i in range(1, T)])
    if w == 0:
      continue
    probs += w * np.prod([emission[path[i], STRINGS[:, i]] for i in range(T)], axis=0)
  return probs


BRUTE = _brute(TINY, TINY.emission, TINY.transition, TINY.initial)


def test_forward_algorithm_equals_path_enumeration():
  np.testing.assert_allclose(BRUTE.sum(), 1.0, atol=1e-12)
  np.testing.assert_allclose(np.exp(TINY.log_prob(STRINGS)), BRUTE, rtol=1e-10, atol=1e-15)
  # Per-position conditionals and the predictive rows, from prefix marginals.
  pred = TINY.predictive(STRINGS)
  tok_lp = TINY.token_log_probs(STRINGS)
  for t in range(T + 1):
    prefix = STRINGS[:, :t]
    codes = (prefix * 8 ** np.arange(t)[::-1]).sum(1) if t else np.zeros(len(STRINGS), int)
    marg = np.bincount(codes, weights=BRUTE, minlength=8 ** t)  # p(x_<t)
    if t < T:
      full = (STRINGS[:, :t + 1] * 8 ** np.arange(t + 1)[::-1]).sum(1)
      joint = np.bincount(full, weights=BRUTE, minlength=8 ** (t + 1))
      expected = joint[full] / marg[codes]
      np.testing.assert_allclose(np.exp(tok_lp[:, t]), expected, rtol=1e-10)
      np.testing.assert_allclose(pred[np.arange(len(STRINGS)), t, STRINGS[:, t]], expected,
                                 rtol=1e-10)
  np.testing.assert_allclose(pred.sum(-1), 1.0, atol=1e-12)
  np.testing.assert_allclose(TINY.next_token_probs(STRINGS[:, :2]), pred[:, 2], atol=1e-14)
  np.testing.assert_allclose(TINY.next_token_probs(STRINGS[:1, :0])[0], pred[0, 0], atol=1e-14)


def test_validity_equals_enumeration_of_the_skeleton():
  skeleton = _brute(TINY, TINY.support.astype(float), (TINY.transition > 0).astype(float),
                    (TINY.initial > 0).astype(float))
  valid = TINY.is_valid(STRINGS)
  np.testing.assert_array_equal(valid, skeleton > 0)
  assert 0 < valid.mean() < 1


def _tv_bound(exact, n):
  """Twice the expected TV distance of an n-sample empirical law (see the decoding tests)."""
  return float(np.sum(np.sqrt(2 * exact * (1 - exact) / (np.pi * n))))


def test_numpy_and_jax_samplers_match_the_exact_law():
  n = 100_000
  codes = lambda x: (np.asarray(x) * 8 ** np.arange(T)[::-1]).sum(1)
  for x in (TINY.sample(0, n, T), TINY.sample_jax(jax.random.key(0), n, T)):
    emp = np.bincount(codes(x), minlength=8 ** T) / n
    assert 0.5 * np.abs(emp - BRUTE).sum() < _tv_bound(BRUTE, n)
  tokens, states = TINY.sample(1, 5, 6, return_states=True)
  assert tokens.shape == states.shape == (5, 6) and tokens.dtype == np.int32
  np.testing.assert_array_equal(TINY.sample(7, 4, 5), TINY.sample(7, 4, 5))


@pytest.fixture(scope="module")
def default():
  return sl.make_synthlang(0)


def test_default_structure_and_position_varying_predictability(default):
  successors = (default.transition > 0).sum(-1)
  assert successors.min() >= 1 and successors.max() <= 3
  assert default.vocab_size == 96 and default.num_states == 4 * 48
  peak = default.emission.max(-1)
  assert np.all(peak[default.is_keyword] > 0.85) and np.all(peak[~default.is_keyword] < 0.85)
  x, s = default.sample(0, 200, 128, return_states=True)
  nll = -default.token_log_probs(x)
  kw = default.is_keyword[s]
  # Easy keyword runs and hard identifier slots alternate along every sequence.
  assert nll[kw].mean() < 0.8 and nll[~kw].mean() > 1.8
  runs = np.diff(kw.astype(int), axis=1) != 0
  assert runs.sum(1).min() > 10
  # Domains are sticky but switch sometimes.
  switches = (np.diff(default.state_domain[s], axis=1) != 0).sum(1)
  assert 0 < switches.mean() < 5
  mean, stderr = default.entropy_per_token(128, num_samples=200, seed=0)
  np.testing.assert_allclose(mean, nll.mean(), rtol=1e-12)  # same samples (seed 0)
  assert 0 < stderr < 0.02
  # With the floor, a few samples leave the skeleton; without it, none do.
  assert default.is_valid(x).mean() > 0.95
  strict = sl.make_synthlang(0, floor=0.0)
  assert strict.is_valid(strict.sample(0, 50, 64)).all()


def test_invalid_strings_and_arguments(default):
  x = default.sample(2, 1, 10)
  variants = np.repeat(x, 96, axis=0)
  variants[:, 5] = np.arange(96)  # every token at position 5
  valid = default.is_valid(variants)
  assert valid[x[0, 5]] and 0 < valid.sum() < 40
  # Off-skeleton tokens are only reachable through the floor (1e-4 / V each), far below a
  # typical valid token (rare identifier tokens can still be as unlikely).
  lp = default.log_prob(variants)
  assert lp[~valid].max() < np.median(lp[valid]) - 5
  with pytest.raises(ValueError, match="vocab_size"):
    sl.make_synthlang(0, vocab_size=4)
  with pytest.raises(ValueError, match="domain_switch"):
    sl.make_synthlang(0, domain_switch=1.0)
  with pytest.raises(ValueError, match="x must be"):
    default.log_prob(np.array([[0, 96]]))
