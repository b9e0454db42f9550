"""Tests of the n-gram table LMs: exact lookups through the cached calling convention."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.decoding import sampling
from jaxrepro.algorithms.decoding import table_lm as tl

V, ORDER = 4, 3
TABLE = tl.random_table(jax.random.key(0), V, ORDER)
LM = tl.table_lm(V, ORDER)
_apply = jax.jit(LM.apply)


def _lookup(seq, t):
  """numpy: log p(. | seq[:t+1]) from the table, START (= V) before the sequence."""
  ctx = [seq[t - lag] if t - lag >= 0 else V for lag in range(ORDER - 1)]
  return np.asarray(TABLE)[tuple(reversed(ctx))]


def test_tables_are_normalised_and_the_draft_mixture_bounds_acceptance():
  np.testing.assert_allclose(np.exp(TABLE).sum(-1), 1, atol=1e-5)
  for mix in (0.0, 0.3, 1.0):
    q = tl.mixed_draft(jax.random.key(1), TABLE, mix)
    alpha = np.minimum(np.exp(TABLE), np.exp(q)).sum(-1)
    assert alpha.min() >= 1 - mix - 1e-5
  np.testing.assert_allclose(tl.mixed_draft(jax.random.key(1), TABLE, 0.0), TABLE, atol=1e-5)


def test_cached_calls_equal_table_lookups():
  seq = np.array([2, 0, 3, 3, 1, 0, 2, 1])
  cache = LM.init_cache(1, 10)
  got = []
  for lo, hi in ((0, 3), (3, 4), (4, 8)):  # prefill, one step, a chunk
    out = _apply(TABLE, cache, jnp.asarray(seq[lo:hi])[None], None, None)
    got.append(np.asarray(out.logits[0]))
    cache = out.cache
  got = np.concatenate(got)
  for t in range(len(seq)):
    np.testing.assert_allclose(got[t], _lookup(seq, t), atol=0)
  # Rollback: drop the last 3 tokens and feed different ones.
  cache = cache._replace(lengths=jnp.array([5], jnp.int32))
  new = np.array([3, 3, 3])
  out = _apply(TABLE, cache, jnp.asarray(new)[None], None, None)
  seq2 = np.concatenate([seq[:5], new])
  for i in range(3):
    np.testing.assert_allclose(out.logits[0, i], _lookup(seq2, 5 + i), atol=0)


def test_tree_mask_reads_each_nodes_own_path():
  prefix = np.array([1, 2])
  # Tree: 0 -> {1, 2}, 1 -> 3; nodes at depths 0, 1, 1, 2.
  parents = [-1, 0, 0, 1]
  tokens = np.array([3, 0, 1, 2])
  depth = np.array([0, 1, 1, 2])
  mask = np.zeros((4, 4), bool)
  for i in range(4):
    j = i
    while j >= 0:
      mask[i, j] = True
      j = parents[j]
  cache = _apply(TABLE, LM.init_cache(1, 8), jnp.asarray(prefix)[None], None, None).cache
  out = _apply(TABLE, cache, jnp.asarray(tokens)[None], jnp.asarray(2 + depth)[None],
               jnp.asarray(mask)[None])
  for i in range(4):
    path = [j for j in range(4) if mask[i, j]]
    seq = np.concatenate([prefix, tokens[path]])
    np.testing.assert_allclose(out.logits[0, i], _lookup(seq, len(seq) - 1), atol=0)


@pytest.mark.parametrize("config", [sampling.SamplingConfig(), sampling.GREEDY,
                                    sampling.SamplingConfig(0.7, 0, 0.8)])
def test_continuation_probs_is_the_product_of_warped_steps(config):
  probs = tl.continuation_probs(TABLE, [1, 2], 3, config)
  assert probs.shape == (V,) * 3
  np.testing.assert_allclose(probs.sum(), 1, atol=1e-6)
  for cont in itertools.islice(itertools.product(range(V), repeat=3), 0, None, 7):
    seq = np.array([1, 2, *cont])
    expected = 1.0
    for t in range(2, 5):
      step = np.asarray(sampling.probs(jnp.asarray(_lookup(seq, t - 1)), config))
      expected *= step[seq[t]]
    np.testing.assert_allclose(probs[cont], expected, rtol=1e-5, atol=1e-12)


def test_argument_errors():
  with pytest.raises(ValueError, match="order"):
    tl.table_lm(V, 0)
  with pytest.raises(ValueError, match="mix"):
    tl.mixed_draft(jax.random.key(0), TABLE, 1.5)
  with pytest.raises(ValueError, match="shape"):
    LM.apply(TABLE[0], LM.init_cache(1, 4), jnp.zeros((1, 2), jnp.int32))
