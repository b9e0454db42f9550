"""Hand-computed Recall@K / NDCG@K cases and a brute-force check of batched evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.graph import ranking

_metrics = jax.jit(ranking.topk_metrics, static_argnames="k")
_LOG2_3 = np.log2(3.0)


def _lists(rows, width):
  out = np.full((len(rows), width), -1, np.int32)
  for r, items in enumerate(rows):
    out[r, :len(items)] = items
  return out


def test_hand_computed_cases():
  scores = np.array([
      [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],   # item 0 is training: top-3 = 1, 2, 3.
      [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],   # all tied: lower id first, item 1 excluded.
      [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # no test items: invalid.
      [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],   # 5 test items > K: recall denominator is 5.
      [0.0, 0.3, 0.2, 0.9, 0.8, 0.1],   # 3, 4 are training: top-3 = 1, 2, 5, no hit.
  ], np.float32)
  train = _lists([[0], [1], [], [], [3, 4]], 2)
  test = _lists([[2, 5], [3, 4], [], [0, 1, 2, 3, 4], [0]], 5)
  out = _metrics(scores, train, test, k=3)

  recall = [1 / 2, 1 / 2, 0.0, 3 / 5, 0.0]
  ndcg = [(1 / _LOG2_3) / (1 + 1 / _LOG2_3),     # hit at rank 2 of 3, two relevant.
          (1 / 2) / (1 + 1 / _LOG2_3),           # tie order 0, 2, 3: hit at rank 3.
          0.0,
          1.0,                                   # three hits, ideal is three hits.
          0.0]
  np.testing.assert_allclose(out["recall"], recall, rtol=1e-6)
  np.testing.assert_allclose(out["ndcg"], ndcg, rtol=1e-6)
  np.testing.assert_array_equal(out["valid"], [True, True, False, True, True])


def test_training_items_are_never_ranked():
  # User's best-scored items are its training items; a test item shares their score.
  scores = np.array([[5.0, 5.0, 5.0, 1.0]], np.float32)
  out = _metrics(scores, _lists([[0, 1]], 2), _lists([[2]], 1), k=1)
  np.testing.assert_allclose(out["recall"], [1.0])
  np.testing.assert_allclose(out["ndcg"], [1.0])


def _brute_force(scores, train, test, k):
  """Independent per-user loop: stable argsort on -score after dropping train items."""
  recalls, ndcgs = [], []
  for s, tr, te in zip(scores, train, test):
    tr, te = set(tr[tr >= 0].tolist()), set(te[te >= 0].tolist())
    if not te:
      continue
    ranked = [i for i in np.argsort(-s, kind="stable") if i not in tr][:k]
    hits = [1.0 if i in te else 0.0 for i in ranked]
    dcg = sum(h / np.log2(r + 2) for r, h in enumerate(hits))
    idcg = sum(1 / np.log2(r + 2) for r in range(min(k, len(te))))
    recalls.append(sum(hits) / len(te))
    ndcgs.append(dcg / idcg)
  return np.mean(recalls), np.mean(ndcgs), len(recalls)


_TRACES = []


def _score_fn(params, users):
  _TRACES.append(users.shape)  # Runs only while tracing.
  return params["user"][users] @ params["item"].T


def test_evaluate_in_batches_matches_brute_force_without_retracing():
  rng = np.random.default_rng(0)
  n_users, n_items, k = 11, 9, 3
  # Rounded scores produce ties, which both sides must break towards the lower id.
  params = {"user": np.round(rng.normal(size=(n_users, 2)), 1).astype(np.float32),
            "item": np.round(rng.normal(size=(n_items, 2)), 1).astype(np.float32)}
  pairs = np.argwhere(rng.random((n_users, n_items)) < 0.35)
  is_test = rng.random(len(pairs)) < 0.4
  is_test[pairs[:, 0] == 4] = False      # user 4 has no test items.
  train = ranking.pad_item_lists(pairs[~is_test], n_users)
  test = ranking.pad_item_lists(pairs[is_test], n_users)

  _TRACES.clear()
  out = ranking.evaluate_in_batches(_score_fn, params, train, test, k=k, batch_size=4)
  recall, ndcg, n_valid = _brute_force(params["user"] @ params["item"].T, train, test, k)
  np.testing.assert_allclose(out["recall"], recall, rtol=1e-5)
  np.testing.assert_allclose(out["ndcg"], ndcg, rtol=1e-5)
  assert int(out["n_valid"]) == n_valid and not bool(out["valid"][4])
  assert out["recall_per_user"].shape == (n_users,)

  shifted = jax.tree.map(lambda x: x + 1.0, params)
  ranking.evaluate_in_batches(_score_fn, shifted, train, test, k=k, batch_size=4)
  assert len(_TRACES) == 1


def test_pad_item_lists():
  lists = ranking.pad_item_lists(np.array([[2, 7], [0, 5], [2, 1]]), 4)
  np.testing.assert_array_equal(lists, [[5, -1], [-1, -1], [7, 1], [-1, -1]])
  assert ranking.pad_item_lists(np.zeros((0, 2), np.int32), 2, max_len=3).shape == (2, 3)
  with pytest.raises(ValueError, match="max_len"):
    ranking.pad_item_lists(np.array([[0, 1], [0, 2]]), 1, max_len=1)


def test_bad_arguments_raise():
  scores = jnp.zeros((2, 4))
  lists = jnp.full((2, 1), -1, jnp.int32)
  with pytest.raises(ValueError, match="k=5"):
    ranking.topk_metrics(scores, lists, lists, 5)
  with pytest.raises(ValueError, match="train_items"):
    ranking.topk_metrics(scores, lists[:1], lists, 2)
