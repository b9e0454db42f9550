"""Task-agnostic graph valuation by blind message passing.

Falahati & Mohammadi Amiri, "Disentangled Structural and Featural Representation for
Task-Agnostic Graph Valuation", 2024, arXiv:2408.12659.

A buyer holds a graph `G_b = (A_b, X_b)` and is offered a seller's `G_s = (A_s, X_s)`.
Neither party may see the other's data; only summaries cross. The paper values the seller's
graph for the buyer along two disentangled axes:

* Structure, by *blind message passing*. The parties agree on a shared node order without
  exchanging their graphs (graph matching by a local, label-free key: the degree rank, or
  the rank in the leading eigenvector of `A + I`), then each propagates the same
  data-independent random signal `R` `[N, r]` over its own structure:
  `S = Â^K R[π]`, `Â = D^-1/2 (A + I) D^-1/2`, where row `i` of `R[π]` is `R`'s row at node
  `i`'s position `π(i)` in the shared order. `S` depends on the structure only, never on `X`.
  The *structural disparity* is the Wasserstein-1 distance between the empirical
  distributions of the rows of `S_b` and `S_s` (the graph Wasserstein distance of
  Togninalli et al., NeurIPS 2019, on blind signals instead of features).
* Features, by *relevance and diversity* (Amiri et al.'s task-agnostic data valuation).
  With the buyer's covariance `Σ_b = U diag(λ) U^T` and the seller's variance along the
  buyer's directions `λ̂_i = u_i^T Σ_s u_i`:
  `Rel = prod_i (min(λ_i, λ̂_i) / max(λ_i, λ̂_i))^(1/d)`,
  `Div = prod_i (|λ_i - λ̂_i| / max(λ_i, λ̂_i))^(1/d)`.
  Only the eigen-statistics (`U`, `λ`, `λ̂`) are exchanged.

What was followed. Only the abstract of the paper was reachable from this environment and
no code is public, so the method follows the spec card's reconstruction (graph.md section
9), which matches the abstract's components (shared permutation from graph matching, graph
Wasserstein distance, relevance, diversity): `S = Â^K R` with `K` hops of GCN propagation
(the card), W1 with Euclidean ground cost, computed exactly by an assignment for graphs of
equal size (scipy's `linear_sum_assignment`) or as the sliced W1 (exact 1-D W1 of random
projections, any sizes, jitted). Degenerate covariance directions (`λ = λ̂ = 0`) count as
identical. The card's Sinkhorn/FAQ matching is not implemented: degree and eigenvector
ranks are cheap, local and need no exchange.

Padding: graphs are padded `GraphsTuple`s; `node_mask` `[N]` marks real nodes. Padding
nodes get no signal, are excluded from covariances and carry no mass in the distances.
"""

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import scipy.optimize

from jaxrepro.models.graph import layers

MATCHINGS = ("degree", "eigenvector")


def _degrees(graph: jraph.GraphsTuple, n: int) -> jax.Array:
  return jax.ops.segment_sum(jnp.ones_like(graph.senders, jnp.float32), graph.receivers, n)


def eigenvector_centrality(graph: jraph.GraphsTuple, node_mask: jax.Array,
                           iterations: int = 100) -> jax.Array:
  """`[N]` leading eigenvector of `A + I` (power iteration; positive by Perron-Frobenius).

  The `+ I` shift makes the iteration converge on bipartite components too.
  """
  mask = node_mask.astype(jnp.float32)
  n = mask.shape[0]

  def step(_, v):
    v = (jax.ops.segment_sum(v[graph.senders], graph.receivers, n) + v) * mask
    return v / jnp.linalg.norm(v)
  return jax.lax.fori_loop(0, iterations, step, mask / jnp.sqrt(jnp.sum(mask)))


def shared_order(graph: jraph.GraphsTuple, node_mask: jax.Array, matching: str = "degree"
                 ) -> jax.Array:
  """`[N]` int32 position `π(i)` of each node in the party's side of the shared order.

  Nodes are ranked by a label-free structural key (degree or eigenvector centrality,
  descending; ties by node id), so two parties with isomorphic graphs agree on the order
  up to ties without exchanging anything. Padding nodes come last.
  """
  if matching not in MATCHINGS:
    raise ValueError(f"matching={matching!r}; must be one of {MATCHINGS}")
  n = node_mask.shape[0]
  key = (_degrees(graph, n) if matching == "degree"
         else eigenvector_centrality(graph, node_mask))
  key = jnp.where(node_mask, -key, jnp.inf)
  order = jnp.argsort(key, stable=True)  # node ids, best first
  return jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))


def blind_message_passing(graph: jraph.GraphsTuple, position: jax.Array, common: jax.Array,
                          node_mask: jax.Array, k_hops: int) -> jax.Array:
  """`S = Â^K R[π]`: the shared random signal propagated over one party's structure.

  Args:
    graph: the party's (padded) graph.
    position: `[N]` int positions in the shared order (`shared_order`).
    common: `[N_max, r]` float32 signal both parties generate from a shared seed; `N_max`
      at least the number of real nodes.
    node_mask: `[N]` bool real nodes.
    k_hops: `K >= 0` propagation steps.

  Returns:
    `[N, r]` float32; padding rows are 0.
  """
  if k_hops < 0:
    raise ValueError(f"k_hops={k_hops}; must be >= 0")
  mask = node_mask[:, None]
  s = jnp.where(mask, common[jnp.minimum(position, common.shape[0] - 1)], 0.0)
  for _ in range(k_hops):  # K is small and static: unrolled
    s = jnp.where(mask, layers.gcn_propagate(s, graph), 0.0)
  return s


def wasserstein_1d(u: jax.Array, v: jax.Array, u_mask: jax.Array, v_mask: jax.Array
                   ) -> jax.Array:
  """Exact W1 between two 1-D empirical distributions of any sizes (masked, jittable).

  `W1 = ∫_0^1 |F_u^-1(t) - F_v^-1(t)| dt`; both quantile functions are step functions, so
  the integral is a sum over the merged breakpoints `i / n_u` and `j / n_v`.
  """
  n_u, n_v = jnp.sum(u_mask), jnp.sum(v_mask)
  su = jnp.sort(jnp.where(u_mask, u, jnp.inf))
  sv = jnp.sort(jnp.where(v_mask, v, jnp.inf))
  # Breakpoints of padding entries sit at 1 and make zero-width intervals.
  bu = jnp.minimum(jnp.arange(1, u.shape[0] + 1) / n_u, 1.0)
  bv = jnp.minimum(jnp.arange(1, v.shape[0] + 1) / n_v, 1.0)
  t = jnp.sort(jnp.concatenate([jnp.zeros(1), bu, bv]))
  width, mid = jnp.diff(t), (t[1:] + t[:-1]) / 2
  iu = jnp.minimum(jnp.floor(mid * n_u).astype(jnp.int32), n_u.astype(jnp.int32) - 1)
  iv = jnp.minimum(jnp.floor(mid * n_v).astype(jnp.int32), n_v.astype(jnp.int32) - 1)
  gap = jnp.where(width > 0, jnp.abs(su[iu] - sv[iv]), 0.0)
  return jnp.sum(width * gap)


def sliced_wasserstein(key: jax.Array, a: jax.Array, b: jax.Array, a_mask: jax.Array,
                       b_mask: jax.Array, n_projections: int = 64) -> jax.Array:
  """Sliced W1: mean exact 1-D W1 of the rows of `a` `[Na, d]` and `b` `[Nb, d]` projected on
  `n_projections` random unit directions. A metric on distributions, any sizes."""
  directions = jax.random.normal(key, (n_projections, a.shape[1]))
  directions /= jnp.linalg.norm(directions, axis=1, keepdims=True)
  per_direction = jax.vmap(lambda w: wasserstein_1d(a @ w, b @ w, a_mask, b_mask))
  return jnp.mean(per_direction(directions))


def wasserstein_exact(a: np.ndarray, b: np.ndarray) -> float:
  """Exact W1 (Euclidean ground cost) between the uniform distributions on the rows of `a`
  and `b`, `[n, d]` each: an optimal assignment (host, scipy)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"a.shape={a.shape}, b.shape={b.shape}: need equal [n, d] shapes for "
                     "the exact assignment (use sliced_wasserstein for unequal sizes)")
  cost = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
  rows, cols = scipy.optimize.linear_sum_assignment(cost)
  return float(cost[rows, cols].mean())


def masked_covariance(x: jax.Array, node_mask: jax.Array) -> jax.Array:
  """`[d, d]` covariance of the real rows of `x` `[N, d]` (unbiased, n - 1)."""
  w = node_mask.astype(x.dtype)[:, None]
  n = jnp.sum(w)
  mean = jnp.sum(x * w, axis=0) / n
  centred = (x - mean) * w
  return centred.T @ centred / (n - 1)


def eigen_statistics(cov_buyer: jax.Array, cov_seller: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """`(λ, λ̂)` `[d]`: the buyer's eigenvalues and the seller's variance along their vectors.

  In the protocol the buyer sends its eigenvectors `U` and the seller answers `λ̂`.
  """
  lam, u = jnp.linalg.eigh(cov_buyer)
  lam_hat = jnp.einsum("di,de,ei->i", u, cov_seller, u)
  return lam, lam_hat


def relevance_diversity(lam: jax.Array, lam_hat: jax.Array, eps: float = 1e-12
                        ) -> tuple[jax.Array, jax.Array]:
  """Relevance and diversity from the eigen-statistics: geometric means over the `d`
  directions of `min/max` and `|λ - λ̂| / max`. Both lie in `[0, 1]`; identical
  statistics give exactly `(1, 0)`. Directions where both variances are ~0 count as equal.
  """
  lam, lam_hat = jnp.maximum(lam, 0.0), jnp.maximum(lam_hat, 0.0)  # eigh round-off
  hi, lo = jnp.maximum(lam, lam_hat), jnp.minimum(lam, lam_hat)
  degenerate = hi <= eps
  ratio = jnp.where(degenerate, 1.0, lo / jnp.where(degenerate, 1.0, hi))
  spread = jnp.where(degenerate, 0.0, (hi - lo) / jnp.where(degenerate, 1.0, hi))
  # exp(mean(log)) is the geometric mean; log(0) = -inf gives exactly 0.
  relevance = jnp.exp(jnp.mean(jnp.log(ratio)))
  diversity = jnp.exp(jnp.mean(jnp.log(spread)))
  return relevance, diversity


def featural_value(x_buyer: jax.Array, mask_buyer: jax.Array, x_seller: jax.Array,
                   mask_seller: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Relevance and diversity of the seller's features `[Ns, d]` for the buyer's `[Nb, d]`."""
  lam, lam_hat = eigen_statistics(masked_covariance(x_buyer, mask_buyer),
                                  masked_covariance(x_seller, mask_seller))
  return relevance_diversity(lam, lam_hat)


def blind_signals(key: jax.Array, buyer: jraph.GraphsTuple, buyer_mask: jax.Array,
                  seller: jraph.GraphsTuple, seller_mask: jax.Array, *, k_hops: int,
                  signal_dim: int, matching: str = "degree") -> tuple[jax.Array, jax.Array]:
  """Both parties' blind signals `(S_b [Nb, r], S_s [Ns, r])` from one shared `key`."""
  n_max = max(buyer_mask.shape[0], seller_mask.shape[0])
  common = jax.random.normal(key, (n_max, signal_dim))
  signals = []
  for graph, mask in ((buyer, buyer_mask), (seller, seller_mask)):
    position = shared_order(graph, mask, matching)
    signals.append(blind_message_passing(graph, position, common, mask, k_hops))
  return signals[0], signals[1]
