"""Oracle tests of the optimal multi-draft acceptance, RRS and the greedy-draft verifier.

Oracles (spec card 6.5): scipy's LP on the bipartite coupling (independent of the subset
formula); brute force over all subsets with an independently enumerated draft law; n = 1
gives sum min(p, q); p = q gives 1; P_norepl(all in H) <= q(H)^n against exact enumeration;
RRS acceptance against an independent path recursion; every verifier's Monte-Carlo output
law against p with a TV bound that a plausibly buggy verifier exceeds.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, sparse

from jaxrepro.algorithms.decoding import multidraft_sd as mdsd

SCHEMES = mdsd.SCHEMES


def _pairs(seed, num, vocab, concentration=1.0):
  """Random (p, q) context pairs, float32 [num, V]; a third are related (q mixes in p)."""
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(vocab, concentration), num)
  q = rng.dirichlet(np.full(vocab, concentration), num)
  mix = np.where(np.arange(num)[:, None] % 3 == 0, 0.6, 0.0)
  q = (1 - mix) * q + mix * p
  return p.astype(np.float32), q.astype(np.float32)


def _mixed_pairs(seed, vocab, per_concentration=12):
  """Peaked, flat and spread pairs in one batch (one shape: compiled functions are reused)."""
  pairs = [_pairs(seed + i, per_concentration, vocab, c)
           for i, c in enumerate([0.1, 0.5, 1.0, 3.0])]
  return tuple(np.concatenate(x) for x in zip(*pairs))


# The shared batch of the V = 6 tests: 48 contexts, the first one with p = q (alpha* = 1).
V6 = _mixed_pairs(0, 6)
V6[0][0] = V6[1][0]


# ----------------------------------------------------------------- independent references


def _law(q, n, scheme):
  """The drafts' joint law {ordered tuple: probability}, enumerated in float64."""
  q = np.asarray(q, np.float64) / np.sum(q)
  vocab = len(q)
  if scheme == "iid":
    return {t: float(np.prod(q[list(t)])) for t in itertools.product(range(vocab), repeat=n)}
  if scheme == "norepl":
    law = {}
    for t in itertools.permutations(range(vocab), n):
      prob, used = 1.0, []
      for x in t:
        rest = q[[y for y in range(vocab) if y not in used]].sum()
        prob *= q[x] / rest
        used.append(x)
      law[t] = prob
    return law
  top = tuple(int(i) for i in np.argsort(-q, kind="stable")[:n - 1])
  rest = np.where(np.isin(np.arange(vocab), top), 0.0, q)
  rest /= rest.sum()
  return {top + (x,): float(rest[x]) for x in range(vocab) if x not in top}


def _lp_acceptance(p, q, n, scheme):
  """max-flow LP: maximise sum pi(x, y) over edges y in x; row sums <= Q(x), column <= p."""
  law = _law(q, n, scheme)
  rows, cols, b = [], [], []
  for i, t in enumerate(law):
    for y in sorted(set(t)):
      rows += [i, len(law) + y]
      cols += [len(cols) // 2] * 2
  num_edges = len(cols) // 2
  a_ub = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)),
                           shape=(len(law) + len(p), num_edges))
  b = np.concatenate([list(law.values()), np.asarray(p, np.float64) / np.sum(p)])
  res = optimize.linprog(-np.ones(num_edges), A_ub=a_ub, b_ub=b, bounds=(0, None),
                         method="highs")
  assert res.status == 0, res.message
  return -res.fun


def _rrs_recursion(p, q, n, scheme):
  """RRS rejection probability by explicit recursion over the drafted token, float64."""
  def reject(res, q_i, steps):
    if steps == 0:
      return 1.0
    total = 0.0
    for x in range(len(res)):
      if q_i[x] <= res[x]:
        continue  # drawn x is always accepted
      nxt = np.maximum(res - q_i, 0)
      nxt = nxt / nxt.sum()
      q_next = q_i
      if scheme == "norepl":
        q_next = q_i.copy()
        q_next[x] = 0
        q_next = q_next / q_next.sum()
      total += (q_i[x] - res[x]) * reject(nxt, q_next, steps - 1)
    return total

  p = np.asarray(p, np.float64) / np.sum(p)
  q = np.asarray(q, np.float64) / np.sum(q)
  return 1.0 - reject(p, q, n)


# ------------------------------------------------------------------------------ the bound


def test_single_draft_is_the_overlap():
  p, q = V6
  overlap = np.minimum(p, q).sum(-1)
  for scheme in SCHEMES:
    np.testing.assert_allclose(mdsd.optimal_acceptance(p, q, 1, scheme), overlap, atol=1e-6)
  for scheme in mdsd.RRS_SCHEMES:
    np.testing.assert_allclose(mdsd.rrs_acceptance(p, q, 1, scheme), overlap, atol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_lp_equals_subset_formula_and_prefix_search(scheme, n):
  p, q = V6
  fast = np.asarray(mdsd.optimal_acceptance(p, q, n, scheme))
  brute = np.asarray(mdsd.optimal_acceptance_subsets(p, q, n, scheme))
  np.testing.assert_allclose(fast, brute, atol=2e-6)
  # The LP on every fourth context: all four concentrations, and p = q first.
  lp = np.array([_lp_acceptance(p[i], q[i], n, scheme) for i in range(0, len(p), 4)])
  np.testing.assert_allclose(brute[::4], lp, atol=2e-6)
  np.testing.assert_allclose(fast[::4], lp, atol=2e-6)
  assert abs(fast[0] - 1) < 1e-6


@pytest.mark.parametrize("vocab", [4, 7])
def test_sorted_prefix_search_matches_every_subset(vocab):
  # The unproven part for "norepl": some optimal H is a prefix in p/q order (V = 6 is
  # covered above). Peaked, flat and related pairs, n up to 4.
  p, q = _mixed_pairs(vocab, vocab)
  for scheme in ("iid", "norepl"):
    for n in range(1, min(vocab, 4) + 1):
      fast = mdsd.optimal_acceptance(p, q, n, scheme)
      brute = mdsd.optimal_acceptance_subsets(p, q, n, scheme)
      np.testing.assert_allclose(fast, brute, atol=2e-6, err_msg=f"{scheme} n={n}")


def test_optimal_subset_attains_the_value():
  p, q = V6
  for n in (2, 3):
    for scheme in SCHEMES:
      h = np.asarray(mdsd.optimal_subset(p, q, n, scheme))
      alpha = np.asarray(mdsd.optimal_acceptance(p, q, n, scheme))
      for i in range(len(p)):
        law = _law(q[i], n, scheme)
        all_in = sum(v for t, v in law.items() if h[i][list(t)].all())
        assert abs(p[i][h[i]].sum() + 1 - all_in - alpha[i]) < 2e-6


def test_equal_distributions_accept_always():
  p, _ = V6
  for n in (1, 2, 3):
    for scheme in SCHEMES:
      np.testing.assert_allclose(mdsd.optimal_acceptance(p, p, n, scheme), 1.0, atol=1e-6)
    for scheme in mdsd.RRS_SCHEMES:
      np.testing.assert_allclose(mdsd.rrs_acceptance(p, p, n, scheme), 1.0, atol=1e-6)


def test_norepl_all_in_probability_against_enumeration():
  rng = np.random.default_rng(5)
  vocab = 6
  all_in = jax.vmap(mdsd.norepl_all_in_probability, in_axes=(0, 0, None))
  for n in (1, 2, 3, 4):
    q = np.stack([rng.dirichlet(np.full(vocab, c)) for c in [0.1, 0.5, 2.0] * 5])
    q = q.astype(np.float32)
    h = rng.random(q.shape) < 0.6
    got = np.asarray(all_in(q, h, n))
    for qi, hi, g in zip(q, h, got):
      exact = sum(v for t, v in _law(qi, n, "norepl").items() if hi[list(t)].all())
      assert abs(g - exact) < 1e-6, (qi, hi, n)
      # Drawing without replacement depletes H: never more likely than i.i.d. draws.
      assert g <= float(qi[hi].sum(dtype=np.float64)) ** n + 1e-6


def test_orderings_and_monotonicity_in_n():
  p, q = V6
  alpha = {(s, n): np.asarray(mdsd.optimal_acceptance(p, q, n, s))
           for s in ("iid", "norepl") for n in (1, 2, 3, 4)}
  rrs = {(s, n): np.asarray(mdsd.rrs_acceptance(p, q, n, s))
         for s in ("iid", "norepl") for n in (1, 2, 3)}
  for n in (1, 2, 3):
    assert np.all(alpha["norepl", n] >= alpha["iid", n] - 1e-6)
    assert np.all(alpha["iid", n] >= rrs["iid", n] - 1e-6)
    assert np.all(alpha["norepl", n] >= rrs["norepl", n] - 1e-6)
    for s in ("iid", "norepl"):
      assert np.all(alpha[s, n + 1] >= alpha[s, n] - 1e-6)
  # The gaps are real, not rounding: the card's "RRS falls short of the bound".
  assert np.mean(alpha["iid", 2] - rrs["iid", 2]) > 0.02
  assert np.mean(alpha["norepl", 2] - rrs["norepl", 2]) > 0.02
  assert np.mean(alpha["norepl", 3] - alpha["iid", 3]) > 0.02


@pytest.mark.parametrize("scheme", mdsd.RRS_SCHEMES)
def test_rrs_acceptance_against_path_recursion(scheme):
  p, q = V6
  for n in (2, 3):
    got = np.asarray(mdsd.rrs_acceptance(p, q, n, scheme))[::3]
    want = [_rrs_recursion(pi, qi, n, scheme) for pi, qi in zip(p[::3], q[::3])]
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_draft_law_matches_enumeration():
  _, q = V6
  for scheme in SCHEMES:
    tuples, probs = mdsd.draft_law(q[1], 3, scheme)
    law = _law(q[1], 3, scheme)
    got = {tuple(int(x) for x in t): float(v) for t, v in zip(tuples, probs) if v > 0}
    assert set(got) == {t for t, v in law.items() if v > 0}
    for t, v in got.items():
      assert abs(v - law[t]) < 1e-6


# ------------------------------------------------------------------- samplers, Monte Carlo

NUM_MC = 200_000
# Sampling noise of the TV at NUM_MC draws over 6 tokens is ~0.002; a lossy verifier
# (the check below) sits at ~0.05.
TV_BOUND = 0.01
P_MC = np.array([0.30, 0.05, 0.25, 0.02, 0.28, 0.10], np.float32)
Q_MC = np.array([0.05, 0.35, 0.10, 0.25, 0.05, 0.20], np.float32)


def _run(scheme, verifier, n=3):
  keys = jax.random.split(jax.random.key(11), NUM_MC)

  def one(key):
    k_draft, k_verify = jax.random.split(key)
    drafts = mdsd.sample_drafts(k_draft, Q_MC, n, scheme)
    return drafts, verifier(k_verify, P_MC, Q_MC, drafts)

  return jax.jit(jax.vmap(one))(keys)


def _tv(tokens):
  freq = np.bincount(np.asarray(tokens), minlength=len(P_MC)) / NUM_MC
  return 0.5 * np.abs(freq - P_MC).sum()


@pytest.mark.parametrize("scheme,verifier,exact", [
    ("iid", lambda k, p, q, d: mdsd.verify_rrs(k, p, q, d, "iid"),
     lambda n: mdsd.rrs_acceptance(P_MC, Q_MC, n, "iid")),
    ("norepl", lambda k, p, q, d: mdsd.verify_rrs(k, p, q, d, "norepl"),
     lambda n: mdsd.rrs_acceptance(P_MC, Q_MC, n, "norepl")),
    ("greedy", mdsd.verify_greedy,
     lambda n: mdsd.optimal_acceptance(P_MC, Q_MC, n, "greedy")),
], ids=["rrs_iid", "rrs_norepl", "greedy"])
def test_verifier_is_lossless_and_accepts_at_its_exact_rate(scheme, verifier, exact):
  n = 3
  _, out = _run(scheme, verifier, n)
  assert _tv(out.token) < TV_BOUND
  rate = float(np.mean(out.accepted))
  sigma = np.sqrt(rate * (1 - rate) / NUM_MC)
  assert abs(rate - float(exact(n))) < 4.5 * sigma
  # No lossless verifier beats the bound of its draft scheme.
  assert rate <= float(mdsd.optimal_acceptance(P_MC, Q_MC, n, scheme)) + 4.5 * sigma


def test_monte_carlo_detects_a_lossy_verifier():
  # A plausible bug: drafts drawn without replacement but verified as if i.i.d. (q never
  # renormalised). Its output law is off by more than the bound the others meet.
  _, out = _run("norepl", lambda k, p, q, d: mdsd.verify_rrs(k, p, q, d, "iid"))
  assert _tv(out.token) > 3 * TV_BOUND


@pytest.mark.parametrize("scheme", SCHEMES)
def test_draft_samplers_follow_the_draft_law(scheme):
  n = 3
  drafts, _ = _run(scheme, mdsd.verify_greedy, n)
  tuples, probs = mdsd.draft_law(Q_MC, n, scheme)
  codes = np.asarray(drafts) @ (6 ** np.arange(n))
  freq = np.bincount(codes, minlength=6 ** n) / NUM_MC
  want = np.zeros(6 ** n)
  want[np.asarray(tuples) @ (6 ** np.arange(n))] = np.asarray(probs)
  assert 0.5 * np.abs(freq - want).sum() < 0.02  # noise ~0.01 over up to 216 tuples


# ----------------------------------------------------------------------- API behaviour


def test_batched_jitted_calls_match_per_context_calls():
  p, q = _pairs(9, 6, 5)
  p, q = p.reshape(2, 3, 5), q.reshape(2, 3, 5)
  for scheme in SCHEMES:
    batched = mdsd.optimal_acceptance(p, q, 2, scheme)
    assert batched.shape == (2, 3)
    single = [[float(mdsd.optimal_acceptance(p[i, j], q[i, j], 2, scheme))
               for j in range(3)] for i in range(2)]
    np.testing.assert_allclose(batched, single, atol=1e-7)
  assert mdsd.optimal_subset(p, q, 2, "norepl").shape == (2, 3, 5)
  assert mdsd.rrs_acceptance(p, q, 2, "norepl").shape == (2, 3)


def test_bad_inputs_raise():
  p, q = _pairs(0, 1, 4)
  with pytest.raises(ValueError, match="scheme"):
    mdsd.optimal_acceptance(p, q, 2, "tree")
  with pytest.raises(ValueError, match="scheme"):
    mdsd.rrs_acceptance(p, q, 2, "greedy")
  with pytest.raises(ValueError, match="n"):
    mdsd.optimal_acceptance(p, q, 0)
  with pytest.raises(ValueError, match="n <= V"):
    mdsd.optimal_acceptance(p, q, 5, "norepl")
  with pytest.raises(ValueError, match="vocabulary"):
    mdsd.optimal_acceptance(p, q[:, :3], 2)
  with pytest.raises(ValueError, match="too large"):
    mdsd.optimal_acceptance_subsets(np.ones(20), np.ones(20), 2)
  with pytest.raises(ValueError, match="drafts"):
    mdsd.verify_rrs(jax.random.key(0), p[0], q[0], jnp.zeros((2,), jnp.float32))
  # n > V is fine with replacement.
  assert float(mdsd.optimal_acceptance(p[0], q[0], 6, "iid")) <= 1.0
