"""Graph structure attacks with a fixed budget of edge flips (for robustness papers).

* `random_edge_injection`: add `budget` edges between uniformly random non-adjacent pairs
  (the "random attack" of STABLE and Pro-GNN).
* `heterophilous_edge_injection`: add `budget` random edges that each join two nodes of
  different classes (the STABLE card's calibrated attack; DICE's "connect externally"
  half without its "delete internally" half).
* `metattack`: the Meta-Self variant of Metattack (Zügner & Günnemann, "Adversarial
  Attacks on Graph Neural Networks via Meta Learning", ICLR 2019, arXiv:1902.08412), as in
  DeepRobust's `Metattack` (`deeprobust/graph/global_attack/mettack.py`), the attack STABLE
  (`likuanppd/STABLE: generate_attack.py`) uses. The surrogate is the linearised 2-layer GCN
  `Z = Â Â X W1 W2` with `Â = D^-1/2 (A + I) D^-1/2`. For each greedy step the weights are
  re-initialised and trained for `train_iters` steps of SGD with momentum on the labelled
  nodes; the attack loss is the cross-entropy of the trained surrogate on the unlabelled
  nodes against self-training labels, and its meta-gradient through the unrolled training
  gives the flip score `S_ij = (dL/dA_ij + dL/dA_ji) (1 - 2 A_ij)`. The best-scoring pair
  is flipped (edge added or removed), excluding removals that would leave a node with no
  edge, until `budget` pairs have been flipped.

Every attack is a pure function of its `seed` (typed `jax.random.key` inside) and returns a
`Perturbation` with exactly `budget` flips of distinct pairs.

Differences from DeepRobust's Metattack: `Â Â X` is computed once per greedy step and the
inner training runs on it (the same arithmetic, reassociated, so the unrolled loop costs
`O(N F)` instead of `O(N^2)` per step); the self-training labels come from the same
surrogate trained on the clean graph with the same inner loop (DeepRobust trains a
separate surrogate with Adam); the log-likelihood degree constraint is not implemented
(as with DeepRobust's `ll_constraint=False`); a pair is never flipped twice; with
`flips_per_step > 1` the top pairs of one meta-gradient are flipped together (faster,
slightly weaker), and the no-singleton rule is checked against the degrees at the start
of the step.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Perturbation:
  """A perturbed undirected graph and its flips.

  Attributes:
    edges: `[M', 2]` int32 perturbed edges, `i < j`, sorted, unique.
    added: `[A, 2]` int32 pairs that were added, `i < j`, sorted.
    removed: `[R, 2]` int32 pairs that were removed, `i < j`, sorted; `A + R = budget`.
  """
  edges: np.ndarray
  added: np.ndarray
  removed: np.ndarray


def _check_edges(edges, n_nodes: int) -> np.ndarray:
  """`[M, 2]` pairs -> sorted unique int64 codes `i * N + j` with `i < j`."""
  edges = np.asarray(edges)
  if edges.size == 0:
    edges = edges.reshape(0, 2)
  if edges.ndim != 2 or edges.shape[1] != 2:
    raise ValueError(f"edges must have shape [M, 2], got {edges.shape}")
  if edges.size and (edges.min() < 0 or edges.max() >= n_nodes):
    raise ValueError(f"edges hold node ids outside [0, n_nodes={n_nodes})")
  lo = np.minimum(edges[:, 0], edges[:, 1]).astype(np.int64)
  hi = np.maximum(edges[:, 0], edges[:, 1]).astype(np.int64)
  return np.unique(lo[lo != hi] * n_nodes + hi[lo != hi])


def _pairs(codes: np.ndarray, n_nodes: int) -> np.ndarray:
  codes = np.sort(np.asarray(codes, np.int64))
  return np.stack([codes // n_nodes, codes % n_nodes], axis=1).astype(np.int32).reshape(-1, 2)


def budget_from_rate(n_edges: int, rate: float) -> int:
  """Number of flips for a perturbation rate, `round(rate * n_edges)` (e.g. 0.2 for 20%)."""
  if n_edges < 0 or rate < 0:
    raise ValueError(f"n_edges={n_edges} and rate={rate} must be >= 0")
  return int(round(rate * n_edges))


def dense_adjacency(edges, n_nodes: int) -> np.ndarray:
  """Symmetric `[N, N]` float32 0/1 adjacency of an undirected edge list (no self-loops)."""
  codes = _check_edges(edges, n_nodes)
  a = np.zeros((n_nodes, n_nodes), np.float32)
  i, j = codes // n_nodes, codes % n_nodes
  a[i, j] = a[j, i] = 1.0
  return a


def _inject(rng: np.random.Generator, existing: np.ndarray, n_nodes: int, budget: int,
            accept) -> np.ndarray:
  """`budget` distinct uniform new pairs `i < j` (codes) for which `accept(i, j)` holds."""
  got = np.zeros(0, np.int64)
  for _ in range(10_000):
    if got.size >= budget:
      return got[:budget]
    i = rng.integers(n_nodes, size=2 * (budget - got.size) + 16)
    j = rng.integers(n_nodes, size=i.size)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    ok = (lo != hi) & accept(lo, hi)
    codes = (lo * n_nodes + hi)[ok]
    codes = codes[~np.isin(codes, existing)]
    # Keep the first occurrence of each pair in draw order (a uniform subset).
    stream = np.concatenate([got, codes])
    _, first = np.unique(stream, return_index=True)
    got = stream[np.sort(first)]
  raise ValueError(f"could not find budget={budget} admissible new edges")


def random_edge_injection(seed: int, edges, n_nodes: int, budget: int) -> Perturbation:
  """Adds `budget` uniformly random new undirected edges.

  Args:
    seed: integer seed; the same seed gives the same edges.
    edges: `[M, 2]` int undirected edges (any orientation; duplicates ignored).
    n_nodes: number of nodes `N`.
    budget: number of edges to add, `0 <= budget <=` the number of non-edges.

  Returns:
    A `Perturbation` with `budget` added pairs and nothing removed.
  """
  existing = _check_edges(edges, n_nodes)
  if not 0 <= budget <= n_nodes * (n_nodes - 1) // 2 - existing.size:
    raise ValueError(f"budget={budget}; must be in [0, number of non-edges]")
  added = _inject(np.random.default_rng(seed), existing, n_nodes, budget,
                  lambda i, j: np.ones(i.shape, bool))
  return Perturbation(edges=_pairs(np.concatenate([existing, added]), n_nodes),
                      added=_pairs(added, n_nodes), removed=np.zeros((0, 2), np.int32))


def heterophilous_edge_injection(seed: int, edges, labels, budget: int) -> Perturbation:
  """Adds `budget` random new edges, each joining two nodes of different classes.

  Args:
    seed: integer seed.
    edges: `[M, 2]` int undirected edges.
    labels: `[N]` int classes (all nodes, including test nodes: the attacker's view).
    budget: number of edges to add, >= 0.

  Returns:
    A `Perturbation` whose `added` pairs all have `labels[i] != labels[j]`, uniform among
    the cross-class non-edges.
  """
  labels = np.asarray(labels)
  n_nodes = labels.shape[0]
  existing = _check_edges(edges, n_nodes)
  counts = np.bincount(labels - labels.min()) if n_nodes else np.zeros(0)
  cross = (n_nodes ** 2 - int(np.sum(counts.astype(np.int64) ** 2))) // 2
  if not 0 <= budget <= cross - existing.size:
    raise ValueError(f"budget={budget}; must be in [0, number of cross-class non-edges]")
  added = _inject(np.random.default_rng(seed), existing, n_nodes, budget,
                  lambda i, j: labels[i] != labels[j])
  return Perturbation(edges=_pairs(np.concatenate([existing, added]), n_nodes),
                      added=_pairs(added, n_nodes), removed=np.zeros((0, 2), np.int32))


# ----------------------------------------------------------------------------------------
# Metattack (Meta-Self) on a linearised GCN surrogate.


def _normalize(a: jax.Array) -> jax.Array:
  """`D^-1/2 (A + I) D^-1/2` of a dense adjacency."""
  a = a + jnp.eye(a.shape[0], dtype=a.dtype)
  inv_sqrt = jax.lax.rsqrt(jnp.sum(a, axis=1))
  return a * inv_sqrt[:, None] * inv_sqrt[None, :]


def _cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  log_p = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_p, labels[:, None], axis=1)[:, 0]
  return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _glorot(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  return jax.nn.initializers.glorot_uniform()(key, shape, jnp.float32)


def _train_surrogate(g: jax.Array, labels: jax.Array, train_mask: jax.Array, key: jax.Array,
                     hidden: int, n_classes: int, iters: int, lr: float,
                     momentum: float) -> tuple[jax.Array, jax.Array]:
  """`iters` steps of SGD with momentum on `CE(g W1 W2)`; differentiable w.r.t. `g`."""
  k1, k2 = jax.random.split(key)
  weights = (_glorot(k1, (g.shape[1], hidden)), _glorot(k2, (hidden, n_classes)))

  def loss(w):
    return _cross_entropy(g @ w[0] @ w[1], labels, train_mask)

  def step(carry, _):
    w, v = carry
    grad = jax.grad(loss)(w)
    v = jax.tree.map(lambda v_, g_: momentum * v_ + g_, v, grad)
    w = jax.tree.map(lambda w_, v_: w_ - lr * v_, w, v)
    return (w, v), None

  zeros = jax.tree.map(jnp.zeros_like, weights)
  (weights, _), _ = jax.lax.scan(step, (weights, zeros), length=iters)
  return weights


@functools.partial(jax.jit, static_argnames=("budget", "flips_per_step", "hidden",
                                             "n_classes", "iters"))
def _metattack(adj, x, labels, train_mask, key, *, budget, flips_per_step, hidden, n_classes,
               iters, lr, momentum):
  """Greedy meta-gradient flips on a dense adjacency; returns the flipped `[N, N]` mask."""
  n = adj.shape[0]
  upper = jnp.triu(jnp.ones((n, n), bool), k=1)

  def fit(a, k):
    g = _normalize(a) @ (_normalize(a) @ x)
    return g, _train_surrogate(g, labels, train_mask, k, hidden, n_classes, iters, lr,
                               momentum)

  # Self-training labels: the clean-graph surrogate's predictions off the training set.
  key_clean, key_steps = jax.random.split(key)
  g0, w0 = fit(adj, key_clean)
  pseudo = jnp.where(train_mask, labels, jnp.argmax(g0 @ w0[0] @ w0[1], axis=-1))
  unlabelled = ~train_mask

  def attack_loss(a, k):
    g, w = fit(a, k)
    return _cross_entropy(g @ w[0] @ w[1], pseudo, unlabelled)

  n_steps = -(-budget // flips_per_step)

  def greedy_step(i, carry):
    a, flipped = carry
    grad = jax.grad(attack_loss)(a, jax.random.fold_in(key_steps, i))
    score = (grad + grad.T) * (1.0 - 2.0 * a)
    degree = jnp.sum(a, axis=1)
    # Removing an edge at a degree-1 node would leave it isolated (a singleton).
    singleton = (a > 0) & ((degree[:, None] <= 1) | (degree[None, :] <= 1))
    allowed = upper & ~flipped & ~singleton
    score = jnp.where(allowed, score, -jnp.inf).reshape(-1)
    best, top = jax.lax.top_k(score, flips_per_step)
    # The last step may flip fewer pairs so that exactly `budget` are flipped; -inf means
    # no admissible pair is left (only possible on nearly complete graphs).
    take = (jnp.arange(flips_per_step) < budget - i * flips_per_step) & jnp.isfinite(best)
    rows, cols = top // n, top % n
    hit = jnp.zeros((n, n), bool).at[rows, cols].set(take)
    hit = hit | hit.T
    return jnp.where(hit, 1.0 - a, a), flipped | hit

  _, flipped = jax.lax.fori_loop(0, n_steps, greedy_step, (adj, jnp.zeros((n, n), bool)))
  return flipped


def metattack(seed: int, edges, features, labels, train_mask, budget: int, *,
              hidden: int = 16, train_iters: int = 100, lr: float = 0.1,
              momentum: float = 0.9, flips_per_step: int = 1) -> Perturbation:
  """Metattack (Meta-Self) on a dense adjacency: `budget` greedy meta-gradient flips.

  Cost per greedy step: two `[N, N] @ [N, F]` products and their gradients plus an
  `O(train_iters N F hidden)` unrolled training; memory `O(N^2)` (dense), so keep `N` to a
  few thousand nodes.

  Args:
    seed: integer seed (weight initialisations); the same seed gives the same flips.
    edges: `[M, 2]` int undirected edges of the clean graph.
    features: `[N, F]` float node features.
    labels: `[N]` int classes; only `train_mask` nodes' labels are used.
    train_mask: `[N]` bool labelled nodes (the attacker's training set).
    budget: number of pairs to flip, `>= 0`.
    hidden: surrogate hidden width (DeepRobust: 16).
    train_iters: inner training steps (DeepRobust: 100).
    lr: inner learning rate (DeepRobust: 0.1).
    momentum: inner momentum (DeepRobust: 0.9).
    flips_per_step: pairs flipped per meta-gradient (1 is the paper's greedy attack).

  Returns:
    A `Perturbation` with exactly `budget` flipped pairs (`added` + `removed`).

  Raises:
    ValueError: on inconsistent shapes or a budget / step size out of range.
  """
  x = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  train_mask = np.asarray(train_mask, bool)
  n = x.shape[0]
  if x.ndim != 2 or labels.shape != (n,) or train_mask.shape != (n,):
    raise ValueError(f"need features [N, F], labels [N], train_mask [N]; got {x.shape}, "
                     f"{labels.shape}, {train_mask.shape}")
  if not train_mask.any():
    raise ValueError("train_mask selects no node; the surrogate needs labelled nodes")
  if not 0 <= budget <= n * (n - 1) // 2:
    raise ValueError(f"budget={budget}; must be in [0, N (N - 1) / 2]")
  if flips_per_step < 1 or hidden < 1 or train_iters < 1:
    raise ValueError(f"flips_per_step={flips_per_step}, hidden={hidden} and "
                     f"train_iters={train_iters} must be >= 1")
  existing = _check_edges(edges, n)
  if budget == 0:
    return Perturbation(edges=_pairs(existing, n), added=np.zeros((0, 2), np.int32),
                        removed=np.zeros((0, 2), np.int32))
  adj = dense_adjacency(_pairs(existing, n), n)
  n_classes = max(int(labels.max()) + 1, 1)
  flipped = _metattack(
      jnp.asarray(adj), jnp.asarray(x), jnp.asarray(np.maximum(labels, 0), jnp.int32),
      jnp.asarray(train_mask), jax.random.key(seed), budget=int(budget),
      flips_per_step=int(min(flips_per_step, budget)), hidden=int(hidden),
      n_classes=n_classes, iters=int(train_iters), lr=float(lr), momentum=float(momentum))
  flipped = np.triu(np.asarray(flipped), k=1)
  i, j = np.nonzero(flipped)
  codes = i.astype(np.int64) * n + j
  was_edge = adj[i, j] > 0
  new = np.concatenate([np.setdiff1d(existing, codes[was_edge]), codes[~was_edge]])
  return Perturbation(edges=_pairs(new, n), added=_pairs(codes[~was_edge], n),
                      removed=_pairs(codes[was_edge], n))
