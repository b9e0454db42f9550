"""Masked evaluation metrics and losses for node classification and link prediction.

All functions are jittable, take static-shape arrays and a validity mask (padding nodes,
padding edges, nodes outside a split), and never use data-dependent boolean indexing.

* `masked_accuracy`, `masked_cross_entropy`: node / graph classification over the
  entries where `mask` is True.
* `masked_binary_cross_entropy`: link-prediction BCE on logits.
* `hits_at_k`, `mrr`: the OGB link-prediction protocol (Hu et al., "Open Graph Benchmark",
  NeurIPS 2020, arXiv:2005.00687; `ogb/linkproppred/evaluate.py`). With negatives shared
  by all positives (ogbl-collab, ogbl-ddi, ogbl-ppa), Hits@K is the share of positives
  scoring *strictly* above the K-th highest negative (1 when there are fewer than K
  negatives). With per-positive negatives (ogbl-citation2), a positive's rank is
  `1 + (#neg > pos + #neg >= pos) / 2` (ties count half) and Hits@K = mean(rank <= K),
  MRR = mean(1 / rank).
* `roc_auc`: the Mann-Whitney statistic, `P(s_pos > s_neg) + P(s_pos = s_neg) / 2`, which
  equals the trapezoidal ROC AUC with ties (scikit-learn's `roc_auc_score`).
* Recall@K and NDCG@K for recommendation live in `ranking.py` (`topk_metrics`,
  `evaluate_in_batches`, `pad_item_lists`) and are re-exported here unchanged.

Masked-out entries never count; an empty selection gives 0 for accuracy and the losses
(a `jnp.maximum(count, 1)` denominator) and NaN for AUC, which is undefined there.
"""

import jax
import jax.numpy as jnp

from jaxrepro.algorithms.graph.ranking import evaluate_in_batches, pad_item_lists, topk_metrics

__all__ = ["evaluate_in_batches", "hits_at_k", "masked_accuracy",
           "masked_binary_cross_entropy", "masked_cross_entropy", "mrr", "pad_item_lists",
           "roc_auc", "topk_metrics"]


def _mask(mask, shape) -> jax.Array:
  """`mask` as bool of `shape` (all True when None)."""
  if mask is None:
    return jnp.ones(shape, bool)
  mask = jnp.asarray(mask)
  if mask.shape != tuple(shape):
    raise ValueError(f"mask must have shape {tuple(shape)}, got {mask.shape}")
  return mask.astype(bool)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  count = jnp.sum(mask, dtype=jnp.float32)
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(count, 1.0)


def masked_accuracy(logits: jax.Array, labels: jax.Array, mask=None) -> jax.Array:
  """Share of masked entries whose argmax (or given prediction) equals the label.

  Args:
    logits: `[N, C]` float scores, or `[N]` int predicted classes.
    labels: `[N]` int true classes.
    mask: optional `[N]` bool; only True entries count.

  Returns:
    Scalar float32 in [0, 1] (0 when the mask is empty).
  """
  pred = jnp.argmax(logits, axis=-1) if logits.ndim == labels.ndim + 1 else logits
  if pred.shape != labels.shape:
    raise ValueError(f"logits {logits.shape} do not match labels {labels.shape}")
  return _masked_mean((pred == labels).astype(jnp.float32), _mask(mask, labels.shape))


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask=None) -> jax.Array:
  """Mean softmax cross-entropy over the masked entries.

  Args:
    logits: `[N, C]` float.
    labels: `[N]` int in `[0, C)`; entries outside the mask may hold anything (e.g. -1).
    mask: optional `[N]` bool.

  Returns:
    Scalar float32; 0 when the mask is empty.
  """
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"need logits [N, C] and labels [N], got {logits.shape}, {labels.shape}")
  mask = _mask(mask, labels.shape)
  # Clip labels of masked-out rows (e.g. -1 for unlabelled) so the gather stays in range.
  safe = jnp.clip(labels, 0, logits.shape[1] - 1)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_p, safe[:, None], axis=1)[:, 0]
  return _masked_mean(nll, mask)


def masked_binary_cross_entropy(logits: jax.Array, targets: jax.Array, mask=None) -> jax.Array:
  """Mean sigmoid BCE `-t log s(z) - (1 - t) log(1 - s(z))` over the masked entries."""
  if logits.shape != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} must match")
  z = logits.astype(jnp.float32)
  # softplus(z) - t z is the numerically stable form of the BCE on logits.
  loss = jax.nn.softplus(z) - targets.astype(jnp.float32) * z
  return _masked_mean(loss, _mask(mask, logits.shape))


def _check_link_scores(pos_scores: jax.Array, neg_scores: jax.Array) -> None:
  """Positives `[P]`; negatives shared `[K]` or per positive `[P, K]`."""
  if pos_scores.ndim != 1 or neg_scores.ndim not in (1, 2) or (
      neg_scores.ndim == 2 and neg_scores.shape[0] != pos_scores.shape[0]):
    raise ValueError(f"need pos_scores [P] and neg_scores [K] or [P, K], got "
                     f"{pos_scores.shape}, {neg_scores.shape}")


def _ranks(pos: jax.Array, neg: jax.Array, neg_mask: jax.Array) -> jax.Array:
  """OGB's tie-averaged rank of each positive among its valid negatives, `[P]` float32."""
  above = jnp.sum((neg > pos[:, None]) & neg_mask, axis=1)
  at_or_above = jnp.sum((neg >= pos[:, None]) & neg_mask, axis=1)
  return 1.0 + 0.5 * (above + at_or_above).astype(jnp.float32)


def hits_at_k(pos_scores: jax.Array, neg_scores: jax.Array, k: int, *, pos_mask=None,
              neg_mask=None) -> jax.Array:
  """OGB Hits@K.

  Args:
    pos_scores: `[P]` float scores of positive pairs.
    neg_scores: `[K_neg]` negatives shared by every positive (ogbl-collab style) or
      `[P, K_neg]` per-positive negatives (ogbl-citation2 style).
    k: cut-off `K >= 1` (static).
    pos_mask: optional `[P]` bool; False positives are ignored.
    neg_mask: optional bool of `neg_scores`' shape; False negatives are ignored.

  Returns:
    Scalar float32: the share of valid positives that hit (0 if there are none).
  """
  if k < 1:
    raise ValueError(f"k={k}; must be >= 1")
  _check_link_scores(pos_scores, neg_scores)
  pos_mask = _mask(pos_mask, pos_scores.shape)
  neg_mask = _mask(neg_mask, neg_scores.shape)
  if neg_scores.ndim == 1:
    n_neg = neg_scores.shape[0]
    if k > n_neg:
      # OGB: fewer negatives than K means every positive hits.
      return _masked_mean(jnp.ones(pos_scores.shape, jnp.float32), pos_mask)
    masked = jnp.where(neg_mask, neg_scores, -jnp.inf)
    kth = jax.lax.top_k(masked, k)[0][k - 1]
    # Masked-out negatives are -inf, so fewer than K valid ones also make kth = -inf.
    hit = pos_scores > kth
  else:
    hit = _ranks(pos_scores, neg_scores, neg_mask) <= k
  return _masked_mean(hit.astype(jnp.float32), pos_mask)


def mrr(pos_scores: jax.Array, neg_scores: jax.Array, *, pos_mask=None,
        neg_mask=None) -> jax.Array:
  """Mean reciprocal rank with OGB's tie-averaged rank.

  Args:
    pos_scores: `[P]` float.
    neg_scores: `[P, K_neg]` per-positive negatives, or `[K_neg]` shared by all positives.
    pos_mask: optional `[P]` bool.
    neg_mask: optional bool of `neg_scores`' shape.

  Returns:
    Scalar float32 mean of `1 / rank` over valid positives (0 if none).
  """
  _check_link_scores(pos_scores, neg_scores)
  pos_mask = _mask(pos_mask, pos_scores.shape)
  neg_mask = _mask(neg_mask, neg_scores.shape)
  if neg_scores.ndim == 1:
    neg_scores = jnp.broadcast_to(neg_scores, pos_scores.shape + neg_scores.shape)
    neg_mask = jnp.broadcast_to(neg_mask, neg_scores.shape)
  return _masked_mean(1.0 / _ranks(pos_scores, neg_scores, neg_mask), pos_mask)


def roc_auc(scores: jax.Array, labels: jax.Array, mask=None) -> jax.Array:
  """Area under the ROC curve as the Mann-Whitney U statistic (ties count half).

  `O(n log n)`: negatives are sorted once and each positive counts the negatives below and
  equal to it by binary search.

  Args:
    scores: `[n]` float scores (finite).
    labels: `[n]` bool or 0/1 ints; True / 1 is the positive class.
    mask: optional `[n]` bool; False entries are ignored.

  Returns:
    Scalar float32 in [0, 1]; NaN if the valid entries lack positives or negatives.
  """
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(f"need scores [n] and labels [n], got {scores.shape}, {labels.shape}")
  mask = _mask(mask, scores.shape)
  positive = labels.astype(bool) & mask
  negative = ~labels.astype(bool) & mask
  # Non-negatives sort to +inf, beyond every finite positive score.
  neg_sorted = jnp.sort(jnp.where(negative, scores, jnp.inf))
  below = jnp.searchsorted(neg_sorted, scores, side="left")
  at_or_below = jnp.searchsorted(neg_sorted, scores, side="right")
  wins = jnp.where(positive, (below + at_or_below).astype(jnp.float32) * 0.5, 0.0)
  n_pos = jnp.sum(positive, dtype=jnp.float32)
  n_neg = jnp.sum(negative, dtype=jnp.float32)
  return jnp.sum(wins) / (n_pos * n_neg)
