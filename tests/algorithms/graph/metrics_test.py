"""Masked classification metrics, OGB Hits@K / MRR and Mann-Whitney AUC on hand-computed cases."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.graph import metrics, ranking


def test_masked_accuracy_by_hand():
  logits = jnp.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [1.0, 4.0]])
  labels = jnp.array([0, 0, 0, -1])
  assert float(metrics.masked_accuracy(logits, labels)) == 0.5
  mask = jnp.array([True, False, True, False])
  assert float(jax.jit(metrics.masked_accuracy)(logits, labels, mask)) == 1.0
  assert float(metrics.masked_accuracy(logits, labels, jnp.array([False, True, False, True]))) \
      == 0.0
  assert float(metrics.masked_accuracy(logits, labels, jnp.zeros(4, bool))) == 0.0
  # Given predictions instead of logits.
  assert float(metrics.masked_accuracy(jnp.array([1, 0, 2]), jnp.array([1, 1, 2]))) == \
      pytest.approx(2 / 3)


def test_masked_cross_entropy_and_bce_by_hand():
  logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0], [9.0, -9.0]])
  labels = jnp.array([1, 0, -1])  # The unlabelled row is masked out (and must not crash).
  mask = jnp.array([True, True, False])
  expected = (np.log(2.0) + np.log(4.0 / 3.0)) / 2
  assert float(metrics.masked_cross_entropy(logits, labels, mask)) == pytest.approx(expected,
                                                                                    rel=1e-6)
  assert float(metrics.masked_cross_entropy(logits, labels, jnp.zeros(3, bool))) == 0.0
  z = jnp.array([0.0, 2.0, -3.0, 50.0])
  t = jnp.array([1.0, 0.0, 1.0, 1.0])
  bce = np.array([np.log(2.0), np.log1p(np.exp(2.0)), np.log1p(np.exp(3.0)),
                  np.log1p(np.exp(-50.0))])
  got = metrics.masked_binary_cross_entropy(z, t, jnp.array([True, True, True, False]))
  assert float(got) == pytest.approx(bce[:3].mean(), rel=1e-6)


def test_hits_at_k_shared_negatives_by_hand():
  pos = jnp.array([0.9, 0.5, 0.3, 0.7])
  neg = jnp.array([0.8, 0.6, 0.4, 0.2, 0.7])
  hits = jax.jit(metrics.hits_at_k, static_argnums=2)
  # K-th highest negative: 0.8, 0.7, 0.6, 0.2; a tie with it is a miss (strict >).
  for k, expected in ((1, 0.25), (2, 0.25), (3, 0.5), (5, 1.0), (6, 1.0)):
    assert float(hits(pos, neg, k)) == pytest.approx(expected), k
  neg_mask = jnp.array([False, True, True, True, True])   # Drops 0.8.
  assert float(metrics.hits_at_k(pos, neg, 1, neg_mask=neg_mask)) == 0.25
  assert float(metrics.hits_at_k(pos, neg, 2, neg_mask=neg_mask)) == 0.5
  # Fewer valid negatives than K: everything hits, as in OGB.
  assert float(metrics.hits_at_k(pos, neg, 5, neg_mask=neg_mask)) == 1.0
  pos_mask = jnp.array([False, True, True, True])         # Drops 0.9.
  assert float(metrics.hits_at_k(pos, neg, 3, pos_mask=pos_mask)) == pytest.approx(1 / 3)


def test_mrr_and_per_positive_hits_by_hand():
  pos = jnp.array([0.5, 0.2])
  neg = jnp.array([[0.6, 0.5, 0.1], [0.1, 0.0, 0.3]])
  # Row 0: one negative above, one tied -> rank 1 + (1 + 2) / 2 = 2.5. Row 1: rank 2.
  assert float(jax.jit(metrics.mrr)(pos, neg)) == pytest.approx((0.4 + 0.5) / 2)
  assert float(metrics.hits_at_k(pos, neg, 2)) == 0.5
  assert float(metrics.hits_at_k(pos, neg, 3)) == 1.0
  neg_mask = jnp.array([[True, False, True], [True, True, True]])  # Hide the tie.
  assert float(metrics.mrr(pos, neg, neg_mask=neg_mask)) == pytest.approx((0.5 + 0.5) / 2)
  assert float(metrics.mrr(pos, neg, pos_mask=jnp.array([True, False]))) == pytest.approx(0.4)
  # Shared negatives broadcast to every positive.
  shared = jnp.array([0.6, 0.5, 0.1])
  assert float(metrics.mrr(pos, shared)) == pytest.approx((1 / 2.5 + 1 / 3) / 2)


def _ogb_reference(pos, neg, k):
  """OGB's evaluator formulas in numpy."""
  if neg.ndim == 1:
    kth = np.sort(neg)[::-1][k - 1] if len(neg) >= k else -np.inf
    return np.mean(pos > kth), None
  rank = 0.5 * ((neg > pos[:, None]).sum(1) + (neg >= pos[:, None]).sum(1)) + 1
  return np.mean(rank <= k), np.mean(1.0 / rank)


@pytest.mark.parametrize("seed", [0, 1])
def test_hits_and_mrr_match_ogb_formulas_with_ties(seed):
  rng = np.random.default_rng(seed)
  pos = rng.integers(0, 6, 40).astype(np.float32)     # Small integers: many ties.
  neg_shared = rng.integers(0, 6, 30).astype(np.float32)
  neg_rows = rng.integers(0, 6, (40, 12)).astype(np.float32)
  for k in (1, 3, 10, 50):
    assert float(metrics.hits_at_k(pos, neg_shared, k)) == pytest.approx(
        _ogb_reference(pos, neg_shared, k)[0])
    hits, mrr = _ogb_reference(pos, neg_rows, k)
    assert float(metrics.hits_at_k(pos, neg_rows, k)) == pytest.approx(hits)
  assert float(metrics.mrr(pos, neg_rows)) == pytest.approx(mrr, rel=1e-6)


def test_auc_with_ties_by_hand():
  scores = jnp.array([0.1, 0.4, 0.35, 0.8, 0.4])
  labels = jnp.array([0, 0, 1, 1, 1])
  # Positive-negative pairs: (.35,.1)=1 (.35,.4)=0 (.8,.1)=1 (.8,.4)=1 (.4,.1)=1 (.4,.4)=.5
  assert float(jax.jit(metrics.roc_auc)(scores, labels)) == pytest.approx(4.5 / 6)
  mask = jnp.array([True, False, True, True, True])       # Drop the negative 0.4.
  assert float(metrics.roc_auc(scores, labels, mask)) == 1.0
  assert float(metrics.roc_auc(jnp.zeros(4), jnp.array([0, 1, 0, 1]))) == 0.5
  assert float(metrics.roc_auc(-scores, labels)) == pytest.approx(1.5 / 6)
  assert np.isnan(float(metrics.roc_auc(scores, jnp.ones(5, int))))


def test_auc_matches_pairwise_mann_whitney():
  rng = np.random.default_rng(3)
  scores = rng.integers(0, 8, 60).astype(np.float32)
  labels = rng.random(60) < 0.4
  mask = rng.random(60) < 0.8
  pos, neg = scores[labels & mask], scores[~labels & mask]
  pairs = [1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg)]
  assert float(metrics.roc_auc(scores, labels, mask)) == pytest.approx(np.mean(pairs))


def test_ranking_metrics_are_reexported_not_duplicated():
  assert metrics.topk_metrics is ranking.topk_metrics
  assert metrics.evaluate_in_batches is ranking.evaluate_in_batches
  assert metrics.pad_item_lists is ranking.pad_item_lists


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="k="):
    metrics.hits_at_k(jnp.zeros(3), jnp.zeros(4), 0)
  with pytest.raises(ValueError, match="neg_scores"):
    metrics.hits_at_k(jnp.zeros(3), jnp.zeros((2, 4)), 1)
  with pytest.raises(ValueError, match="mask"):
    metrics.masked_accuracy(jnp.zeros((3, 2)), jnp.zeros(3, int), jnp.ones(4, bool))
  with pytest.raises(ValueError, match="labels"):
    metrics.masked_cross_entropy(jnp.zeros((3, 2)), jnp.zeros(2, int))
  with pytest.raises(ValueError, match="scores"):
    metrics.roc_auc(jnp.zeros(3), jnp.zeros(2))
