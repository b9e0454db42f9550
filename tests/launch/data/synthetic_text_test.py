"""Tests of the S5a Markov language against brute-force numpy enumeration of V^L sequences."""

import itertools

import numpy as np
import pytest
from scipy import stats

from jaxrepro.launch.data import synthetic_text as st

V, L = 3, 4
ALL = np.array(list(itertools.product(range(V), repeat=L)), np.int32)


def _brute_log_prob(lang, x):
  """log p(x) by an explicit loop over positions, in float64."""
  lp = np.log(lang.initial[x[0]])
  for i in range(1, len(x)):
    if lang.order == 1:
      lp += np.log(lang.transition[x[i - 1], x[i]])
    elif i == 1:
      lp += np.log(lang.first[x[0], x[1]])
    else:
      lp += np.log(lang.transition[x[i - 2], x[i - 1], x[i]])
  return lp


@pytest.fixture(scope="module", params=[1, 2], ids=["order1", "order2"])
def lang(request):
  return st.make_markov_language(3, vocab_size=V, length=L, order=request.param, support=2,
                                 concentration=0.5, floor=0.05)


@pytest.fixture(scope="module")
def brute(lang):
  return np.exp(np.array([_brute_log_prob(lang, x) for x in ALL]))


def test_log_prob_is_exact_and_normalised(lang, brute):
  lp = np.asarray(lang.log_prob(ALL), np.float64)
  np.testing.assert_allclose(lp, np.log(brute), atol=2e-5)
  np.testing.assert_allclose(brute.sum(), 1.0, atol=1e-12)
  np.testing.assert_allclose(np.exp(lp).sum(), 1.0, atol=1e-5)


def test_tables_and_entropy_match_enumeration(lang, brute):
  uni = np.stack([np.bincount(ALL[:, i], weights=brute, minlength=V) for i in range(L)])
  np.testing.assert_allclose(lang.unigram(), uni, atol=1e-12)
  bi = np.stack([np.bincount(ALL[:, i] * V + ALL[:, i + 1], weights=brute, minlength=V * V)
                 for i in range(L - 1)]).reshape(L - 1, V, V)
  np.testing.assert_allclose(lang.bigram(), bi, atol=1e-12)
  np.testing.assert_allclose(lang.entropy(), -(brute * np.log(brute)).sum(), atol=1e-10)


def test_samples_follow_the_sequence_law(lang, brute):
  x = np.asarray(lang.sample(0, 50_000))
  assert x.shape == (50_000, L) and x.dtype == np.int32
  codes = x @ (V ** np.arange(L)[::-1])
  counts = np.bincount(codes, minlength=V ** L)
  # Cells expecting fewer than 5 draws are pooled into one, as the chi-square test needs.
  expected = counts.sum() * brute
  rare = expected < 5
  obs = np.append(counts[~rare], counts[rare].sum())
  exp = np.append(expected[~rare], expected[rare].sum())
  assert stats.chisquare(obs, exp).pvalue > 1e-3
  # The TV helpers see only sampling noise on the true law...
  assert lang.unigram_tv(x) < 0.01 and lang.bigram_tv(x) < 0.01
  # ...and a clear gap on uniform noise.
  noise = np.random.default_rng(0).integers(0, V, size=(50_000, L))
  assert lang.unigram_tv(noise) > 0.05
  np.testing.assert_allclose(lang.nll_per_token(x), lang.entropy() / L, rtol=0.02)


def test_deterministic_in_seed():
  a = st.make_markov_language(5, vocab_size=16, length=8)
  b = st.make_markov_language(5, vocab_size=16, length=8)
  c = st.make_markov_language(6, vocab_size=16, length=8)
  np.testing.assert_array_equal(a.transition, b.transition)
  assert not np.array_equal(a.transition, c.transition)
  np.testing.assert_array_equal(np.asarray(a.sample(1, 10)), np.asarray(b.sample(1, 10)))
  # Sparse support plus floor: each row has `support` large entries and floor/V elsewhere.
  small = np.isclose(a.transition, 1e-3 / 16)
  assert np.all(small.sum(1) >= 16 - 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(order=3), "order"),
    (dict(support=0), "support"),
    (dict(floor=1.0), "floor"),
    (dict(vocab_size=1), "vocab_size"),
    (dict(length=1), "length"),
])
def test_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    st.make_markov_language(0, **kwargs)


def test_log_prob_shape_check(lang):
  with pytest.raises(ValueError, match="x must be"):
    lang.log_prob(np.zeros((2, L + 1), np.int32))
