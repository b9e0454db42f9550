"""Optimal acceptance of multi-draft speculative decoding, and the verifiers it bounds.

Paper: Hu, Zheng, Viswanathan, Chen, Rossi, Wu, Manocha, Huang, "Towards Optimal
Multi-draft Speculative Decoding", ICLR 2025, arXiv:2502.18779.

Setting. At one position the draft model proposes n tokens x = (x_1, ..., x_n) with a joint
law Q built from its next-token distribution q (the *draft scheme*); the target model's
distribution is p. A verifier outputs one token y, and must be lossless: y ~ p exactly. Every
lossless verifier is a coupling pi(x, y) with marginals Q and p, its acceptance rate is
P(y in x), and the best one solves an optimal-transport LP with |V|^n * |V| variables:

  alpha*(p, Q) = max_pi  sum_{x, y} pi(x, y) 1[y in x].

Dual (max-flow = min-cut on the bipartite graph "x -> y if y in x"; the paper's subset
selection form):

  alpha* = min_{H subset V} [ p(H) + Q(x not subset H) ]
         = 1 - max_{H subset V} [ Q(x subset H) - p(H) ].                            (1)

n = 1 gives 1 - TV(p, q) = sum_x min(p(x), q(x)), single-draft speculative sampling.

Draft schemes (`SCHEMES`):
* "iid" (with replacement): x_i i.i.d. ~ q, so Q(x subset H) = q(H)^n.
* "norepl" (without replacement): x_1 ~ q, then x_i ~ q restricted to the tokens not yet
  drawn and renormalised (successive sampling; Gumbel-top-n draws exactly this).
* "greedy" (the paper's greedy draft construction): x_1..x_{n-1} = the n-1 most likely tokens
  of q (a set D, deterministic), x_n ~ q' = q restricted to V \\ D and renormalised. Then (1)
  has the closed form

    alpha*_greedy = p(D) + sum_{x not in D} min(p(x), q'(x)),                          (2)

  attained by the verifier: accept x_n w.p. min(1, p(x_n) / q'(x_n)), else draw y from
  the residual ~ p 1_D + max(p - q', 0) 1_{V \\ D} (a y in D counts as accepted).

Computing (1) fast. Sort the tokens by increasing p(x)/q(x) and search H only among the
|V| + 1 prefixes H_k of that order, O(|V| log |V|) for "iid": g(s) = s^n is convex, so an
exchange argument shows some optimal H holds every token whose ratio is at most g'(q(H)) and
none above it. For "norepl" the probability that all n successive draws land in H is
computed exactly as an integral. Successive sampling ~ q is the ringing order of
independent exponential clocks with rates q_x, so the n draws are all in H iff n clocks of
H ring before the first clock of V \\ H, which rings at an Exp(r) time, r = q(V \\ H):

  P(x subset H) = E[exp(-r S_n)] = int_R r e^s exp(-r e^s) P(N_H(e^s) >= n) ds,         (3)

where S_n is the n-th ringing time among H's clocks and N_H(t) is Poisson-binomial with
success probabilities 1 - exp(-q_x t) (t = e^s). The integrand is analytic and decays
double-exponentially on the right and exponentially on the left, so the trapezoidal rule on
a fixed s grid converges geometrically (step 0.25: error ~1e-7 in float32, ~1e-15 in float64,
against exact enumeration). On the fixed t grid the Poisson-binomial DP (counts 0..n-1 and
">= n") grows one token at a time, so all |V| + 1 prefixes cost one pass, O(|V| M n) with
M = 421 nodes.

Recursive rejection sampling (RRS), the verifier the paper measures against the bound.
Start with p_1 = p and q_1 = q; for i = 1..n accept x_i w.p. min(1, p_i(x_i) / q_i(x_i));
on rejection p_{i+1} = norm(max(p_i - q_i, 0)) and, without replacement, q_{i+1} = q_i with
x_i removed and renormalised (with replacement q_{i+1} = q). If every draft is rejected,
y ~ p_{n+1}. Exact acceptance: with replacement 1 - prod_i (1 - beta_i), beta_i =
sum_x min(p_i(x), q(x)); without replacement the residual depends on which tokens were
drawn, so the rejection probability sums over the ordered rejected prefixes, O(|V|^n).

Differences from the paper and choices made here:
* The paper's text could not be read from this workspace (no official code exists either);
  equations (1) and (2) and the verifier of (2) were derived here from the optimal-transport
  statement in its abstract and the spec card, and are checked against scipy's LP and brute
  force over all subsets in the tests. The sorted-prefix search for "norepl" is unproven
  (card 6.1 marks the paper's own procedure for this case "verify"); it matched the
  brute-force optimum on every random case tried (thousands, V <= 7, n <= 4, Dirichlet
  concentrations 0.1-3). `optimal_acceptance_subsets` is the exhaustive fallback.
* The "all in H" probability for "norepl" uses the exponential-clock integral (3) (the
  card's suggestion) with a fixed trapezoidal grid in log time instead of the paper's own
  procedure, which we could not read.
* Without replacement needs at least n tokens with q > 0 (true for softmax outputs); with
  fewer, the n distinct drafts are not defined and the results are meaningless. In (3) the
  rate r of V \\ H is floored at 1e-30 so that the grid covers the integrand.
* "greedy" breaks ties among equally likely draft tokens by lower index (`lax.top_k`); when
  q puts no mass outside D, q' is uniform on V \\ D.

The public functions are jitted with `n` and `scheme` static; the acceptance functions take
leading context axes ([..., V] -> [...]), the samplers and verifiers one context (vmap
them). The residual is the shared S3 `verify.residual`.
"""

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrepro.algorithms.decoding import verify

SCHEMES = ("iid", "norepl", "greedy")
RRS_SCHEMES = ("iid", "norepl")

# Trapezoidal grid in s = log t for the "all in H" integral (3). Left of -30 the integrand
# is below r e^-30 ~ 1e-13; its bump sits at s = -log r, so 75 covers r down to the 1e-30
# floor with e^6 to spare; step 0.25 is where float32 round-off, not the rule, dominates.
_LOG_T_MIN, _LOG_T_MAX, _LOG_T_STEP = -30.0, 75.0, 0.25
_RATE_FLOOR = 1e-30

# Largest exhaustive problems: 2^V subsets times the draft law's support.
_MAX_SUBSET_VOCAB = 16
_MAX_SUBSET_WORK = 1 << 26


class Verified(NamedTuple):
  """Result of one multi-draft verification.

  Attributes:
    token: int32 scalar, the output token, distributed exactly as p.
    accepted: bool scalar, whether the output is one of the drafts (y in x).
  """
  token: jax.Array
  accepted: jax.Array


# ------------------------------------------------------------------------------ validation


def _check_scheme(scheme: str, allowed=SCHEMES) -> None:
  if scheme not in allowed:
    raise ValueError(f"scheme must be one of {allowed}; got {scheme!r}")


def _check_n(n, vocab: int, scheme: str) -> None:
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
    raise ValueError(f"n (the number of drafts) must be a Python int >= 1; got {n!r}")
  if scheme != "iid" and n > vocab:
    raise ValueError(f"n={n} drafts of distinct tokens need n <= V={vocab} for "
                     f"scheme={scheme!r}")


def _as_probs(x, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f"{name} must be probabilities [..., V] with V >= 1; got shape "
                     f"{list(x.shape)}")
  return x


def _check_pair(p, q):
  p, q = _as_probs(p, "p"), _as_probs(q, "q")
  if p.shape[-1] != q.shape[-1]:
    raise ValueError(f"p and q must share the vocabulary axis; got shapes {list(p.shape)} "
                     f"and {list(q.shape)}")
  dtype = jnp.promote_types(p.dtype, q.dtype)
  return p.astype(dtype), q.astype(dtype)


# ----------------------------------------------------------------------------- small pieces


def _normalize(x: jax.Array, fallback: jax.Array) -> jax.Array:
  """x / sum(x) over the last axis, or `fallback` where the sum is zero."""
  total = jnp.sum(x, axis=-1, keepdims=True)
  return jnp.where(total > 0, x / jnp.where(total > 0, total, 1.0), fallback)


def _sort_by_ratio(p: jax.Array, q: jax.Array):
  """Tokens in increasing p/q order (q = 0 last: adding them to H never helps)."""
  ratio = jnp.where(q > 0, p / jnp.where(q > 0, q, 1.0), jnp.inf)
  order = jnp.argsort(ratio, stable=True)
  return order, p[order], q[order]


def _greedy_parts(q: jax.Array, n: int):
  """The deterministic drafts D (top n-1 of q) as a mask [V], and q' on V \\ D."""
  vocab = q.shape[-1]
  in_d = jnp.zeros((vocab,), bool)
  if n > 1:
    in_d = in_d.at[lax.top_k(q, n - 1)[1]].set(True)
  return in_d, _rest_distribution(q, in_d)


def _rest_distribution(q: jax.Array, in_d: jax.Array) -> jax.Array:
  """q restricted to the tokens outside `in_d`, renormalised (uniform there if empty)."""
  outside = (~in_d).astype(q.dtype)
  return _normalize(jnp.where(in_d, 0.0, q), outside / jnp.sum(outside))


# ------------------------------------------------------------ "all drafts in H" probabilities


def _log_time_grid(dtype) -> tuple[jax.Array, float]:
  num = int(round((_LOG_T_MAX - _LOG_T_MIN) / _LOG_T_STEP)) + 1
  return jnp.linspace(_LOG_T_MIN, _LOG_T_MAX, num, dtype=dtype), _LOG_T_STEP


def _count_dp_step(dp: jax.Array, success: jax.Array) -> jax.Array:
  """Adds one Bernoulli(success) to count distributions dp [M, n+1] (last bucket: >= n)."""
  move = dp * success[:, None]
  new = dp - move
  new = new.at[:, 1:].add(move[:, :-1])
  return new.at[:, -1].add(move[:, -1])


def _clock_weights(rest: jax.Array, log_t: jax.Array, step: float) -> jax.Array:
  """Trapezoid weights of (3): step * r e^s exp(-r e^s) on the grid, for rates r [...]."""
  z = jnp.log(jnp.maximum(rest, _RATE_FLOOR))[..., None] + log_t
  return step * jnp.exp(z - jnp.exp(z))


@functools.partial(jax.jit, static_argnames=("n",))
def norepl_all_in_probability(q: jax.Array, in_set: jax.Array, n: int) -> jax.Array:
  """P(all n drafts drawn without replacement from q lie in H), by the integral (3).

  Args:
    q: [V] draft probabilities (normalised here), at least n of them positive.
    in_set: [V] bool membership mask of H.
    n: the number of drafts, a Python int in 1..V.

  Returns:
    float scalar in [0, 1]; exactly 1 when H = V.
  """
  q = _as_probs(q, "q")
  if q.ndim != 1 or jnp.shape(in_set) != q.shape:
    raise ValueError(f"q must be [V] and in_set a [V] mask; got shapes {list(q.shape)} and "
                     f"{list(jnp.shape(in_set))}")
  _check_n(n, q.shape[-1], "norepl")
  q = q / jnp.sum(q)
  in_set = jnp.asarray(in_set, bool)
  log_t, step = _log_time_grid(q.dtype)
  t = jnp.exp(log_t)
  dp0 = jnp.zeros((t.shape[0], n + 1), q.dtype).at[:, 0].set(1.0)

  def body(dp, rate):
    return _count_dp_step(dp, -jnp.expm1(-rate * t)), None

  dp, _ = lax.scan(body, dp0, jnp.where(in_set, q, 0.0))
  rest = jnp.sum(jnp.where(in_set, 0.0, q))
  value = jnp.sum(_clock_weights(rest, log_t, step) * dp[:, n])
  return jnp.where(jnp.all(in_set), 1.0, jnp.clip(value, 0.0, 1.0))


def _norepl_prefix_all_in(q_sorted: jax.Array, n: int) -> jax.Array:
  """P(all n successive draws lie in the first k tokens), k = 0..V: [V + 1]."""
  log_t, step = _log_time_grid(q_sorted.dtype)
  t = jnp.exp(log_t)
  dp0 = jnp.zeros((t.shape[0], n + 1), q_sorted.dtype).at[:, 0].set(1.0)

  def body(dp, rate):
    dp = _count_dp_step(dp, -jnp.expm1(-rate * t))
    return dp, dp[:, n]

  _, at_least_n = lax.scan(body, dp0, q_sorted)  # [V, M]: P(N_{H_k}(t) >= n), k = 1..V
  # Mass outside H_k as a suffix sum (not 1 - cumsum), accurate when it is tiny.
  rest = jnp.flip(jnp.cumsum(jnp.flip(q_sorted)))[1:]  # k = 1..V-1
  inner = jnp.clip(jnp.sum(_clock_weights(rest, log_t, step) * at_least_n[:-1], axis=-1),
                   0.0, 1.0)
  one = jnp.ones((1,), q_sorted.dtype)
  return jnp.concatenate([0.0 * one, inner, one])


def _prefix_gains(p: jax.Array, q: jax.Array, n: int, scheme: str):
  """Q(x subset H_k) - p(H_k) for the V + 1 sorted prefixes H_k, and the sort order."""
  p, q = p / jnp.sum(p), q / jnp.sum(q)
  order, p_sorted, q_sorted = _sort_by_ratio(p, q)
  zero = jnp.zeros((1,), p.dtype)
  p_prefix = jnp.concatenate([zero, jnp.cumsum(p_sorted)])
  if scheme == "iid":
    all_in = jnp.concatenate([zero, jnp.clip(jnp.cumsum(q_sorted), 0.0, 1.0)]) ** n
  else:
    all_in = _norepl_prefix_all_in(q_sorted, n)
  return all_in - p_prefix, order


# ------------------------------------------------------------------------ optimal acceptance


def _optimal_one(p, q, *, n: int, scheme: str):
  if scheme == "greedy":
    p = p / jnp.sum(p)
    in_d, q_rest = _greedy_parts(q / jnp.sum(q), n)
    return jnp.sum(jnp.where(in_d, p, jnp.minimum(p, q_rest)))
  gains, _ = _prefix_gains(p, q, n, scheme)
  return jnp.clip(1.0 - jnp.max(gains), 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("n", "scheme"))
def optimal_acceptance(p: jax.Array, q: jax.Array, n: int, scheme: str = "iid"
                       ) -> jax.Array:
  """The optimal acceptance rate alpha*(p, Q) of n drafts, by the subset formula (1).

  "iid" and "norepl" search the |V| + 1 prefixes of the tokens sorted by p/q ("norepl"
  with the integral (3)); "greedy" is the closed form (2). Jit-friendly; leading axes are
  contexts (vectorised).

  Args:
    p: [..., V] target probabilities (normalised here).
    q: [..., V] draft probabilities (normalised here).
    n: number of drafts, a Python int >= 1 (<= V unless "iid").
    scheme: "iid" (with replacement), "norepl" (without) or "greedy".

  Returns:
    [...] float acceptance rates in [0, 1].
  """
  p, q = _check_pair(p, q)
  _check_scheme(scheme)
  _check_n(n, p.shape[-1], scheme)
  fn = functools.partial(_optimal_one, n=int(n), scheme=scheme)
  return jnp.vectorize(fn, signature="(v),(v)->()")(p, q)


def _subset_one(p, q, *, n: int, scheme: str):
  if scheme == "greedy":
    p, q = p / jnp.sum(p), q / jnp.sum(q)
    in_d, q_rest = _greedy_parts(q, n)
    # The cut of (2): all of D plus the tokens where q' exceeds p.
    return in_d | (q_rest > p)
  gains, order = _prefix_gains(p, q, n, scheme)
  size = jnp.argmax(gains)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  return rank < size


@functools.partial(jax.jit, static_argnames=("n", "scheme"))
def optimal_subset(p: jax.Array, q: jax.Array, n: int, scheme: str = "iid") -> jax.Array:
  """A minimising set H of (1) (a sorted prefix, or D plus {q' > p} for "greedy").

  Args:
    p, q, n, scheme: as in `optimal_acceptance`.

  Returns:
    [..., V] bool membership masks.
  """
  p, q = _check_pair(p, q)
  _check_scheme(scheme)
  _check_n(n, p.shape[-1], scheme)
  fn = functools.partial(_subset_one, n=int(n), scheme=scheme)
  return jnp.vectorize(fn, signature="(v),(v)->(v)")(p, q)


# --------------------------------------------------------------- exhaustive (tiny V) fallback


def _tuples(vocab: int, n: int, scheme: str) -> np.ndarray:
  if scheme == "iid":
    return np.array(list(itertools.product(range(vocab), repeat=n)), np.int32)
  return np.array(list(itertools.permutations(range(vocab), n)), np.int32)


def _law_size(vocab: int, n: int, scheme: str) -> int:
  if scheme == "iid":
    return vocab ** n
  if scheme == "norepl":
    return math.perm(vocab, n)
  return vocab


@functools.partial(jax.jit, static_argnames=("n", "scheme"))
def draft_law(q: jax.Array, n: int, scheme: str) -> tuple[jax.Array, jax.Array]:
  """The joint law Q of the n drafts, enumerated (for exhaustive checks at tiny V).

  Args:
    q: [V] draft probabilities (normalised here).
    n: number of drafts, a Python int >= 1.
    scheme: "iid", "norepl" or "greedy".

  Returns:
    (tuples [T, n] int32, probs [T] float): every ordered draft tuple the scheme can
    produce (T = V^n, V!/(V-n)! or V) and its probability; probs sum to 1.
  """
  q = _as_probs(q, "q")
  _check_scheme(scheme)
  if q.ndim != 1:
    raise ValueError(f"q must be [V]; got shape {list(q.shape)}")
  _check_n(n, q.shape[0], scheme)
  tuples, probs = _draft_law(q, n, scheme)
  return jnp.asarray(tuples), probs


def _draft_law(q: jax.Array, n: int, scheme: str):
  """`draft_law` without checks; the tuples stay numpy (static) unless "greedy"."""
  vocab = q.shape[0]
  q = q / jnp.sum(q)
  if scheme == "greedy":
    in_d, q_rest = _greedy_parts(q, n)
    top = lax.top_k(q, n - 1)[1] if n > 1 else jnp.zeros((0,), jnp.int32)
    last = jnp.arange(vocab, dtype=jnp.int32)
    tuples = jnp.concatenate(
        [jnp.broadcast_to(top.astype(jnp.int32), (vocab, n - 1)), last[:, None]], axis=1)
    return tuples, jnp.where(in_d, 0.0, q_rest)
  tuples = _tuples(vocab, n, scheme)
  if scheme == "iid":
    return tuples, jnp.prod(q[tuples], axis=-1)
  # Successive sampling: step i draws from the mass not yet drawn, summed explicitly
  # (1 - cumsum loses the small remainders when one token holds almost all the mass).
  onehot = np.eye(vocab, dtype=bool)[tuples]  # [T, n, V]
  before = np.cumsum(onehot, axis=1) - onehot  # drawn strictly before step i
  remaining = jnp.sum(jnp.where(before > 0, 0.0, q), axis=-1)  # [T, n]
  ratio = jnp.where(remaining > 0, q[tuples] / jnp.where(remaining > 0, remaining, 1.0), 0.0)
  return tuples, jnp.prod(ratio, axis=-1)


def _subsets_one(p, q, *, n: int, scheme: str, masks: np.ndarray):
  p = p / jnp.sum(p)
  tuples, probs = _draft_law(q, n, scheme)
  # [2^V, T]: tuple inside H. A numpy constant when the tuples are static (XLA would
  # otherwise spend seconds constant-folding it).
  if isinstance(tuples, np.ndarray):
    inside = np.all(masks[:, tuples], axis=-1)
  else:
    inside = jnp.all(jnp.asarray(masks)[:, tuples], axis=-1)
  gains = inside.astype(p.dtype) @ probs - jnp.asarray(masks, p.dtype) @ p
  return jnp.clip(1.0 - jnp.max(gains), 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("n", "scheme"))
def optimal_acceptance_subsets(p: jax.Array, q: jax.Array, n: int, scheme: str = "iid"
                               ) -> jax.Array:
  """alpha* by brute force: (1) over all 2^V subsets with the enumerated draft law.

  Independent of the sorted-prefix search and of the integral (3); for tiny V only.

  Args:
    p, q, n, scheme: as in `optimal_acceptance`; V <= 16 and 2^V * T * n <= 2^26.

  Returns:
    [...] float acceptance rates.
  """
  p, q = _check_pair(p, q)
  _check_scheme(scheme)
  vocab = p.shape[-1]
  _check_n(n, vocab, scheme)
  work = (1 << vocab) * _law_size(vocab, n, scheme) * n
  if vocab > _MAX_SUBSET_VOCAB or work > _MAX_SUBSET_WORK:
    raise ValueError(f"optimal_acceptance_subsets enumerates 2^V subsets x the draft law; "
                     f"V={vocab}, n={n} is too large (V <= {_MAX_SUBSET_VOCAB} and "
                     f"2^V * T * n <= {_MAX_SUBSET_WORK}); use optimal_acceptance")
  masks = ((np.arange(1 << vocab)[:, None] >> np.arange(vocab)) & 1).astype(bool)
  fn = functools.partial(_subsets_one, n=int(n), scheme=scheme, masks=masks)
  return jnp.vectorize(fn, signature="(v),(v)->()")(p, q)


# ------------------------------------------------------------- recursive rejection sampling


def _rrs_iid_one(p, q, *, n: int):
  p, q = p / jnp.sum(p), q / jnp.sum(q)
  res, reject = p, jnp.ones((), p.dtype)
  for _ in range(n):
    # P(reject | reached) = sum max(q - p_i, 0) = 1 - beta_i (both sum to 1).
    reject = reject * jnp.sum(jnp.maximum(q - res, 0.0))
    res = verify.residual(res, q)
  return 1.0 - reject


def _rrs_norepl_one(p, q, *, n: int):
  p, q = p / jnp.sum(p), q / jnp.sum(q)
  vocab = p.shape[-1]
  eye = jnp.eye(vocab, dtype=bool)
  # One node per ordered prefix of rejected drafts (V^i of them after i rejections;
  # repeated tokens carry weight 0): its probability, residual p_{i+1} and drawn set.
  weight = jnp.ones((1,), p.dtype)
  res = p[None]
  drawn = jnp.zeros((1, vocab), bool)
  for i in range(n):
    q_i = _normalize(jnp.where(drawn, 0.0, q), 0.0 * q)  # q_i: drawn tokens removed
    rejected = jnp.maximum(q_i - res, 0.0)  # P(draw x, reject x | node), [N, V]
    if i == n - 1:
      return 1.0 - jnp.sum(weight * jnp.sum(rejected, axis=-1))
    # p_{i+2} depends on the node, not on which token was just rejected.
    nxt = verify.residual(res, q_i)
    weight = (weight[:, None] * rejected).reshape(-1)
    res = jnp.repeat(nxt, vocab, axis=0)
    drawn = (drawn[:, None, :] | eye[None]).reshape(-1, vocab)
  raise AssertionError("unreachable")


@functools.partial(jax.jit, static_argnames=("n", "scheme"))
def rrs_acceptance(p: jax.Array, q: jax.Array, n: int, scheme: str = "iid") -> jax.Array:
  """Exact acceptance rate of recursive rejection sampling with n drafts.

  "iid": 1 - prod_i (1 - beta_i), O(n V). "norepl": sums over every ordered prefix of
  rejected drafts, O(V^n) time and memory per context; vmap or `lax.map` over contexts.

  Args:
    p: [..., V] target probabilities (normalised here).
    q: [..., V] draft probabilities (normalised here).
    n: number of drafts, a Python int >= 1 (<= V for "norepl").
    scheme: "iid" (drafts with replacement) or "norepl" (without).

  Returns:
    [...] float acceptance rates P(y in x).
  """
  p, q = _check_pair(p, q)
  _check_scheme(scheme, RRS_SCHEMES)
  _check_n(n, p.shape[-1], scheme)
  one = _rrs_iid_one if scheme == "iid" else _rrs_norepl_one
  return jnp.vectorize(functools.partial(one, n=int(n)), signature="(v),(v)->()")(p, q)


# ------------------------------------------------------------------- samplers and verifiers


def _log(x: jax.Array) -> jax.Array:
  return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("n", "scheme"))
def sample_drafts(key: jax.Array, q: jax.Array, n: int, scheme: str = "iid") -> jax.Array:
  """Draws the n drafts of one position.

  "iid": n independent draws from q. "norepl": Gumbel-top-n, whose order is exactly
  successive sampling without replacement. "greedy": the n - 1 most likely tokens of q
  (in decreasing order) followed by one draw from q' (q outside them, renormalised).

  Args:
    key: a typed PRNG key.
    q: [V] draft probabilities.
    n: number of drafts, a Python int >= 1 (<= V unless "iid").
    scheme: "iid", "norepl" or "greedy".

  Returns:
    [n] int32 draft tokens (vmap over keys and contexts for batches).
  """
  q = _as_probs(q, "q")
  _check_scheme(scheme)
  if q.ndim != 1:
    raise ValueError(f"q must be [V]; got shape {list(q.shape)}")
  _check_n(n, q.shape[0], scheme)
  q = q / jnp.sum(q)
  if scheme == "iid":
    return jax.random.categorical(key, _log(q), shape=(n,)).astype(jnp.int32)
  if scheme == "norepl":
    noisy = _log(q) + jax.random.gumbel(key, q.shape, q.dtype)
    return lax.top_k(noisy, n)[1].astype(jnp.int32)
  in_d, q_rest = _greedy_parts(q, n)
  last = jax.random.categorical(key, _log(q_rest))
  top = lax.top_k(q, n - 1)[1] if n > 1 else jnp.zeros((0,), jnp.int32)
  return jnp.concatenate([top, last[None]]).astype(jnp.int32)


def _check_verify(p, q, drafts):
  p, q = _check_pair(p, q)
  drafts = jnp.asarray(drafts)
  if p.ndim != 1 or drafts.ndim != 1 or drafts.shape[0] < 1:
    raise ValueError(f"p, q must be [V] and drafts [n] with n >= 1; got shapes "
                     f"{list(p.shape)}, {list(q.shape)}, {list(drafts.shape)}")
  if not jnp.issubdtype(drafts.dtype, jnp.integer):
    raise ValueError(f"drafts must be integer token ids; got {drafts.dtype}")
  return p / jnp.sum(p), q / jnp.sum(q), drafts.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("scheme",))
def verify_rrs(key: jax.Array, p: jax.Array, q: jax.Array, drafts: jax.Array,
               scheme: str = "iid") -> Verified:
  """Recursive rejection sampling over the drafts, in order (lossless: token ~ p).

  Args:
    key: a typed PRNG key.
    p: [V] target probabilities.
    q: [V] draft probabilities the drafts were drawn from.
    drafts: [n] int drafts from `sample_drafts(..., scheme)`.
    scheme: "iid" (q is used unchanged at every step) or "norepl" (each rejected draft is
      removed from q, which is renormalised).

  Returns:
    Verified(token int32, accepted bool).
  """
  _check_scheme(scheme, RRS_SCHEMES)
  p, q, drafts = _check_verify(p, q, drafts)
  key_u, key_final = jax.random.split(key)
  u = jax.random.uniform(key_u, drafts.shape, p.dtype)

  def step(carry, inputs):
    res, q_i, done, token = carry
    x, u_x = inputs
    # u < min(1, p_i(x)/q_i(x)) without dividing; x was drawn from q_i, so q_i(x) > 0.
    accept = ~done & (u_x * q_i[x] < res[x])
    token = jnp.where(accept, x, token)
    done = done | accept
    res = jnp.where(done, res, verify.residual(res, q_i))
    if scheme == "norepl":
      q_i = _normalize(q_i.at[x].set(0.0), q_i)
    return (res, q_i, done, token), None

  init = (p, q, jnp.zeros((), bool), jnp.zeros((), jnp.int32))
  (res, _, done, token), _ = lax.scan(step, init, (drafts, u))
  fallback = jax.random.categorical(key_final, _log(res)).astype(jnp.int32)
  token = jnp.where(done, token, fallback)
  return Verified(token=token, accepted=jnp.any(drafts == token))


@jax.jit
def verify_greedy(key: jax.Array, p: jax.Array, q: jax.Array, drafts: jax.Array
                  ) -> Verified:
  """The verifier of the greedy draft scheme, attaining its bound (2) (lossless).

  Accept the random last draft x_n w.p. min(1, p(x_n)/q'(x_n)); otherwise draw the output
  from ~ p on D = {x_1..x_{n-1}} and max(p - q', 0) elsewhere, so any output in D is also
  an accepted draft.

  Args:
    key: a typed PRNG key.
    p: [V] target probabilities.
    q: [V] draft probabilities.
    drafts: [n] int drafts from `sample_drafts(..., "greedy")` (first n-1 deterministic).

  Returns:
    Verified(token int32, accepted bool).
  """
  p, q, drafts = _check_verify(p, q, drafts)
  in_d = jnp.zeros(p.shape, bool).at[drafts[:-1]].set(True)
  q_rest = _rest_distribution(q, in_d)
  key_u, key_final = jax.random.split(key)
  last = drafts[-1]
  accept = jax.random.uniform(key_u, (), p.dtype) * q_rest[last] < p[last]
  left = _normalize(jnp.where(in_d, p, jnp.maximum(p - q_rest, 0.0)), p)
  fallback = jax.random.categorical(key_final, _log(left)).astype(jnp.int32)
  token = jnp.where(accept, last, fallback)
  return Verified(token=token, accepted=jnp.any(drafts == token))


__all__ = [
    "SCHEMES", "RRS_SCHEMES", "Verified", "norepl_all_in_probability",
    "optimal_acceptance", "optimal_subset", "draft_law", "optimal_acceptance_subsets",
    "rrs_acceptance", "sample_drafts", "verify_rrs", "verify_greedy",
]
