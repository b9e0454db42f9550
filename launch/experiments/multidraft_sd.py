"""Experiment driver for `multidraft_sd` (library: `jaxrepro.algorithms.decoding.multidraft_sd`).

The paper is a theory paper: language models only supply next-token distributions, so the
experiment is a sweep over (target p, draft q) context pairs. For every vocabulary size V,
temperature T and number of drafts n it computes, on each context:

* alpha*_iid, alpha*_norepl: the optimal acceptance of n drafts drawn with / without
  replacement (the subset formula searched over sorted prefixes);
* alpha*_greedy: the bound of the greedy draft scheme, which its verifier attains;
* rrs_iid, rrs_norepl: the exact acceptance of recursive rejection sampling, the verifier
  the paper measures against the bound.

At the headline setting it also validates the fast formula: scipy's LP on the coupling,
brute force over all 2^V subsets, and a Monte-Carlo run of every verifier (output law and
acceptance rate). The sweep's pairs are independent Dirichlet draws; the scale layer takes
them from the shipped SynthLang target and draft (`launch.pretrained_lms`), whose
distributions are close, so the gaps there are smaller.
"""

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import optimize, sparse

from jaxrepro.algorithms.decoding import multidraft_sd as mdsd
from jaxrepro.configs import common
from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import benchmarking, decoding_benchmark, experiment, metric_writers, plotting

PAPER = "multidraft_sd"
QUANTITIES = ("alpha_norepl", "alpha_iid", "alpha_greedy", "rrs_norepl", "rrs_iid")
# Float32 round-off allowed in the "on every context" claims (the values are exact
# otherwise; the norepl integral is accurate to ~1e-7).
TOL = 1e-6
LP_MAX_N = 3

CLAIMS = (
    experiment.Claim(
        "norepl_bound_at_least_iid_bound",
        "Drafting without replacement has an optimal acceptance at least that of drafting "
        "with replacement on every context (min of alpha*_norepl - alpha*_iid over all "
        "settings and contexts)", "min_gap/norepl_minus_iid", -TOL,
        note="Every setting of the sweep (V = 6 and 32, T = 1 and 0.5, n = 1..4) on "
        "independent Dirichlet(1) pairs; the threshold is float32 round-off."),
    experiment.Claim(
        "iid_bound_at_least_rrs",
        "The optimal acceptance with replacement is at least RRS's with replacement on "
        "every context", "min_gap/iid_minus_rrs_iid", -TOL),
    experiment.Claim(
        "norepl_bound_at_least_rrs",
        "The optimal acceptance without replacement is at least RRS's without replacement "
        "on every context", "min_gap/norepl_minus_rrs_norepl", -TOL),
    experiment.Claim(
        "rrs_falls_short_with_replacement",
        "RRS with replacement is on average at least 0.02 below alpha*_iid on Dirichlet(1) "
        "pairs at V = 6, n = 2", "headline/mean_gap_iid_minus_rrs_iid", 0.02,
        note="The card's restatement of 'existing verifiers do not reach the bound' (its "
        "prototype measured 0.05). The paper measures the gap on LLM distributions at "
        "vocabularies in the thousands, which are not available offline."),
    experiment.Claim(
        "rrs_falls_short_without_replacement",
        "RRS without replacement is on average at least 0.02 below alpha*_norepl on "
        "Dirichlet(1) pairs at V = 6, n = 2", "headline/mean_gap_norepl_minus_rrs_norepl",
        0.02),
    experiment.Claim(
        "norepl_beats_iid_on_average",
        "The draft scheme matters: without replacement raises the optimal acceptance by at "
        "least 0.01 on average at V = 6, n = 2", "headline/mean_gap_norepl_minus_iid", 0.01,
        note="Our restatement of the abstract's 'sampling without replacement "
        "outperforming sampling with replacement'; the margin is ours, not the paper's."),
    experiment.Claim(
        "bound_nondecreasing_in_n",
        "One more draft never lowers the optimal acceptance (min over contexts of "
        "alpha*(n+1) - alpha*(n), both schemes, every setting)", "min_increment_in_n", -TOL),
    experiment.Claim(
        "formula_matches_lp",
        "The sorted-prefix subset formula equals scipy's LP optimum of the coupling "
        "(max abs difference, V = 6, n = 1..3, all three schemes)",
        "lp_max_abs_error", 1e-5, "<="),
    experiment.Claim(
        "prefix_search_is_optimal",
        "Searching H only among prefixes sorted by p/q finds the minimum over all 2^V "
        "subsets (max abs difference over every headline-V context, n and scheme)",
        "subsets_max_abs_error", 1e-5, "<=",
        note="Proved for drafting with replacement (convexity of s^n); for without "
        "replacement it is unproven here (the paper's own procedure for that case could "
        "not be read), so it is checked exhaustively on every headline context."),
    experiment.Claim(
        "verifiers_are_lossless",
        "RRS (both schemes) and the greedy-draft verifier output p-distributed tokens: "
        "max total-variation distance of the Monte-Carlo output law from p",
        "mc_max_tv", 0.01, "<=",
        note="200k verifications per verifier and context; the sampling noise of the TV "
        "is about 0.002 at V = 6."),
    experiment.Claim(
        "greedy_verifier_attains_its_bound",
        "The greedy-draft verifier's Monte-Carlo acceptance equals its bound "
        "p(D) + sum_{x not in D} min(p, q') (max abs difference)",
        "mc_greedy_max_abs_error", 0.005, "<=",
        note="The verifier and the closed form are our derivation (card 6.1), not read from "
        "the paper; 0.005 is about 4.5 standard errors at 200k draws."),
    experiment.Claim(
        "lm_bounds_ordered",
        "On the shipped SynthLang target/draft's next-token distributions (V = 96), "
        "alpha*_norepl >= alpha*_iid on every context", "lm/min_gap/norepl_minus_iid", -TOL),
    experiment.Claim(
        "lm_rrs_below_bound",
        "On the trained models' distributions RRS (with replacement) falls short of "
        "alpha*_iid by at least 0.001 on average (and never exceeds it)",
        "lm/mean_gap/iid_minus_rrs_iid", 0.001,
        note="Card 6.4's scale layer. The card expected trained, close pairs (acceptance "
        "~0.78) to shrink the gap and asks only that it be strictly positive (>= 0.001); "
        "the per-temperature and per-n means are in the summary (lm/...)."),
)


def _ints(text: str) -> list[int]:
  return sorted(set(common.comma_list(text, int)))


def _floats(text: str) -> list[float]:
  return sorted(set(common.comma_list(text)), reverse=True)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "contexts.num", "contexts.dirichlet_concentration",
                        "validation.mc_samples", "mdsd.rrs_norepl_max_paths",
                        "mdsd.chunk_paths")
  vocabs, ns = _ints(config.contexts.vocab_sizes), _ints(config.mdsd.n_drafts)
  temps = _floats(config.sampling.temperatures)
  if not vocabs or min(vocabs) < 2:
    raise ConfigError(f"config.contexts.vocab_sizes={config.contexts.vocab_sizes!r} must "
                      "list vocabulary sizes >= 2")
  if not ns or min(ns) < 1 or max(ns) > min(vocabs):
    raise ConfigError(f"config.mdsd.n_drafts={config.mdsd.n_drafts!r} must list draft "
                      f"counts in 1..{min(vocabs)} (distinct drafts need n <= V)")
  if not temps or min(temps) <= 0 or 1.0 not in temps:
    raise ConfigError(f"config.sampling.temperatures={config.sampling.temperatures!r} must "
                      "be positive and include 1.0 (the headline temperature)")
  if config.mdsd.headline_vocab not in vocabs or config.mdsd.headline_n not in ns:
    raise ConfigError(
        f"config.mdsd.headline_vocab={config.mdsd.headline_vocab} and headline_n="
        f"{config.mdsd.headline_n} must be among contexts.vocab_sizes and mdsd.n_drafts")
  if config.mdsd.headline_vocab > 8:
    raise ConfigError(f"config.mdsd.headline_vocab={config.mdsd.headline_vocab} must be "
                      "<= 8: the headline is checked by LP and by brute force over subsets")
  v = config.validation
  for field in ("lp_contexts", "mc_contexts"):
    if not 0 <= v[field] <= config.contexts.num:
      raise ConfigError(f"config.validation.{field}={v[field]} must be in "
                        f"0..contexts.num={config.contexts.num}")


# ---------------------------------------------------------------------------------- sources


def dirichlet_source(config: ml_collections.ConfigDict, vocab_size: int, key: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """Independent Dirichlet(c) target and draft distributions, as log-probabilities.

  Drawn in log space (log-gamma variates), so no probability underflows to zero.

  Returns:
    (log_p, log_q), each [contexts.num, vocab_size] float32.
  """
  shape = (config.contexts.num, vocab_size)
  c = config.contexts.dirichlet_concentration
  k_p, k_q = jax.random.split(key)
  logs = [jax.random.loggamma(k, c, shape) for k in (k_p, k_q)]
  return tuple(x - jax.nn.logsumexp(x, axis=-1, keepdims=True) for x in logs)


def contexts(config, vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """The sweep's Dirichlet context pairs for one vocabulary size (seeded per size)."""
  key = jax.random.fold_in(jax.random.key(config.seed), vocab_size)
  return dirichlet_source(config, vocab_size, key)


def lm_contexts(config) -> tuple[jax.Array, jax.Array]:
  """Next-token log-probabilities of the shipped SynthLang target and draft (the scale layer).

  Contexts are prefixes of sequences drawn from the exact source the models were trained
  on, cut at uniformly random positions; both models see the same prefix.

  Returns:
    (log_p, log_q), each [models.num_contexts, V] float32 (V = the models' vocabulary).
  """
  from jaxrepro.launch import pretrained_lms  # Local: loading the models is only needed here.
  from jaxrepro.models import transformer
  m = config.models
  target, draft = pretrained_lms.load("synthlang_target"), pretrained_lms.load("synthlang_draft")
  seqs = pretrained_lms.language().sample(config.seed, m.num_contexts, m.length)
  rng = np.random.default_rng(config.seed)
  # Position >= 1 so that every context holds at least one token.
  cut = rng.integers(1, m.length, size=m.num_contexts)
  rows = np.arange(m.num_contexts)
  out = []
  for model in (target, draft):
    logits = jax.jit(lambda params, x, g=model.graphdef: transformer.apply_transformer(
        g, params, x))(model.params, jnp.asarray(seqs, jnp.int32))
    # The logits at position cut - 1 are the distribution of token `cut` given the prefix.
    out.append(jax.nn.log_softmax(logits[rows, cut - 1], axis=-1))
  return tuple(out)


def temper(log_probs: jax.Array, temperature) -> jax.Array:
  """softmax(log_probs / T) over the last axis."""
  return jax.nn.softmax(log_probs / temperature, axis=-1)


# ---------------------------------------------------------------------------------- measure


def _with_rrs_norepl(config, vocab: int, n: int) -> bool:
  return vocab ** n <= config.mdsd.rrs_norepl_max_paths


def make_measure(n: int, vocab: int, *, rrs_norepl: bool, batch: int):
  """A jitted `(log_p, log_q, T) -> {quantity: [num]}` for one (V, n), chunked over contexts."""
  def one(args):
    log_p, log_q, temperature = args
    p, q = temper(log_p, temperature), temper(log_q, temperature)
    out = {f"alpha_{s}": mdsd.optimal_acceptance(p, q, n, s) for s in mdsd.SCHEMES}
    out["rrs_iid"] = mdsd.rrs_acceptance(p, q, n, "iid")
    out["rrs_norepl"] = (mdsd.rrs_acceptance(p, q, n, "norepl") if rrs_norepl
                         else jnp.full((), jnp.nan, p.dtype))
    return out

  @jax.jit
  def measure(log_p, log_q, temperature):
    temps = jnp.broadcast_to(temperature, log_p.shape[:1])
    return jax.lax.map(one, (log_p, log_q, temps), batch_size=batch)

  return measure


def sweep(config) -> dict[tuple[int, float, int], dict[str, np.ndarray]]:
  """Every quantity on every context of every (V, T, n) setting, as float64 arrays."""
  results = {}
  for vocab in _ints(config.contexts.vocab_sizes):
    log_p, log_q = contexts(config, vocab)
    for n in _ints(config.mdsd.n_drafts):
      rrs = _with_rrs_norepl(config, vocab, n)
      # Memory per context: the V^n RRS paths, or the [V, 421] grid of the clock integral.
      per_context = max(vocab ** n if rrs else 1, vocab * 421)
      batch = int(max(1, min(config.contexts.num, config.mdsd.chunk_paths // per_context)))
      measure = make_measure(n, vocab, rrs_norepl=rrs, batch=batch)
      for temperature in _floats(config.sampling.temperatures):
        out = measure(log_p, log_q, jnp.float32(temperature))
        results[vocab, temperature, n] = {k: np.asarray(v, np.float64)
                                          for k, v in out.items()}
  return results


def aggregate(config, results) -> dict[str, float]:
  """The claims' metrics: minimum gaps over everything, headline means, per-n curves."""
  out = {}
  gaps = {"norepl_minus_iid": ("alpha_norepl", "alpha_iid"),
          "iid_minus_rrs_iid": ("alpha_iid", "rrs_iid"),
          "norepl_minus_rrs_norepl": ("alpha_norepl", "rrs_norepl"),
          "greedy_minus_norepl": ("alpha_greedy", "alpha_norepl")}
  for name, (a, b) in gaps.items():
    diffs = [r[a] - r[b] for r in results.values() if not np.isnan(r[b]).all()]
    out[f"min_gap/{name}"] = float(min(np.min(d) for d in diffs))
  increments = []
  for (vocab, temperature, n), r in results.items():
    bigger = [m for (v, t, m) in results if (v, t) == (vocab, temperature) and m > n]
    if bigger:
      nxt = results[vocab, temperature, min(bigger)]
      increments += [np.min(nxt[s] - r[s]) for s in ("alpha_iid", "alpha_norepl")]
  out["min_increment_in_n"] = float(min(increments)) if increments else float("nan")
  out["rrs_norepl_skipped_settings"] = int(sum(np.isnan(r["rrs_norepl"]).all()
                                               for r in results.values()))

  vocab, n = config.mdsd.headline_vocab, config.mdsd.headline_n
  head = results[vocab, 1.0, n]
  for q in QUANTITIES:
    out[f"headline/mean_{q}"] = float(np.mean(head[q]))
  for name, (a, b) in gaps.items():
    out[f"headline/mean_gap_{name}"] = float(np.mean(head[a] - head[b]))
  out["headline/mean_gap_greedy_minus_rrs_norepl"] = float(np.mean(
      head["alpha_greedy"] - head["rrs_norepl"]))
  out["headline/frac_greedy_above_norepl"] = float(np.mean(
      head["alpha_greedy"] > head["alpha_norepl"] + TOL))
  # The largest vocabulary at T = 1 and the headline n: how the picture scales with V.
  big = max(_ints(config.contexts.vocab_sizes))
  for q in QUANTITIES:
    out[f"V={big}/mean_{q}"] = float(np.mean(results[big, 1.0, n][q]))
  return out


def lm_sweep(config) -> dict[str, float]:
  """The bounds and RRS on the trained models' distributions, per temperature and n."""
  log_p, log_q = lm_contexts(config)
  vocab = log_p.shape[-1]
  out, gaps_iid, gaps_norepl, order = {}, [], [], []
  for n in _ints(config.models.n_drafts):
    rrs = _with_rrs_norepl(config, vocab, n)
    per_context = max(vocab ** n if rrs else 1, vocab * 421)
    batch = int(max(1, min(config.models.num_contexts, config.mdsd.chunk_paths // per_context)))
    measure = make_measure(n, vocab, rrs_norepl=rrs, batch=batch)
    for temperature in _floats(config.models.temperatures):
      r = {k: np.asarray(v, np.float64)
           for k, v in measure(log_p, log_q, jnp.float32(temperature)).items()}
      for q in QUANTITIES:
        if not np.all(np.isnan(r[q])):  # RRS without replacement is skipped when too big.
          out[f"lm/T={temperature}/n={n}/mean_{q}"] = float(np.nanmean(r[q]))
      order.append(float(np.min(r["alpha_norepl"] - r["alpha_iid"])))
      gaps_iid.append(r["alpha_iid"] - r["rrs_iid"])
      if rrs:
        gaps_norepl.append(r["alpha_norepl"] - r["rrs_norepl"])
  out["lm/min_gap/norepl_minus_iid"] = min(order)
  out["lm/min_gap/iid_minus_rrs_iid"] = float(min(np.min(g) for g in gaps_iid))
  out["lm/mean_gap/iid_minus_rrs_iid"] = float(np.mean(np.concatenate(gaps_iid)))
  out["lm/mean_gap/norepl_minus_rrs_norepl"] = (
      float(np.mean(np.concatenate(gaps_norepl))) if gaps_norepl else float("nan"))
  out["lm/vocab_size"] = vocab
  return out


# ------------------------------------------------------------------------------- validation


def lp_acceptance(p: np.ndarray, q: np.ndarray, n: int, scheme: str) -> float:
  """alpha* from scipy's LP on the coupling's bipartite edges (max-flow form).

  Variables pi(x, y) for the edges y in x; maximise their sum subject to row sums <= Q(x)
  and column sums <= p(y) (the inequality form: the full equality-constrained coupling LP
  is numerically fragile when some Q(x) ~ 1e-9).
  """
  tuples, probs = (np.asarray(a) for a in mdsd.draft_law(jnp.asarray(q), n, scheme))
  rows, cols = [], []
  for i, t in enumerate(tuples):
    for y in np.unique(t):
      cols += [len(cols) // 2] * 2
      rows += [i, len(tuples) + int(y)]
  edges = len(cols) // 2
  a_ub = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)),
                           shape=(len(tuples) + len(p), edges))
  b_ub = np.concatenate([probs.astype(np.float64), np.asarray(p, np.float64) / np.sum(p)])
  res = optimize.linprog(-np.ones(edges), A_ub=a_ub, b_ub=b_ub, bounds=(0, None),
                         method="highs")
  if res.status != 0:
    raise RuntimeError(f"linprog failed: {res.message}")
  return -res.fun


def validate(config) -> dict[str, float]:
  """LP and brute-force checks of the formula, and Monte-Carlo runs of the verifiers."""
  vocab, n_head = config.mdsd.headline_vocab, config.mdsd.headline_n
  log_p, log_q = contexts(config, vocab)
  p, q = temper(log_p, 1.0), temper(log_q, 1.0)
  p_np, q_np = np.asarray(p, np.float64), np.asarray(q, np.float64)
  lp_err = brute_err = 0.0
  for n in _ints(config.mdsd.n_drafts):
    for scheme in mdsd.SCHEMES:
      fast = np.asarray(mdsd.optimal_acceptance(p, q, n, scheme), np.float64)
      brute = np.asarray(mdsd.optimal_acceptance_subsets(p, q, n, scheme), np.float64)
      brute_err = max(brute_err, float(np.max(np.abs(fast - brute))))
      # The LP has V^n * n variables: n <= 3 keeps it to seconds.
      for i in range(config.validation.lp_contexts if n <= LP_MAX_N else 0):
        lp = lp_acceptance(p_np[i], q_np[i], n, scheme)
        lp_err = max(lp_err, abs(fast[i] - lp))
  out = {"lp_max_abs_error": lp_err, "subsets_max_abs_error": brute_err}

  samples = config.validation.mc_samples
  tv = greedy_err = rrs_err = 0.0
  for i in range(config.validation.mc_contexts):
    for j, name in enumerate(VERIFIERS):
      keys = jax.random.split(jax.random.key(1000 * config.seed + 10 * i + j), samples)
      result = _monte_carlo(name, n_head)(keys, p[i], q[i])
      freq = np.bincount(np.asarray(result.token), minlength=vocab) / samples
      tv = max(tv, 0.5 * float(np.abs(freq - p_np[i]).sum()))
      rate = float(np.mean(np.asarray(result.accepted)))
      if name == "greedy":
        exact = float(mdsd.optimal_acceptance(p[i], q[i], n_head, "greedy"))
        greedy_err = max(greedy_err, abs(rate - exact))
      else:
        exact = float(mdsd.rrs_acceptance(p[i], q[i], n_head, VERIFIERS[name]))
        rrs_err = max(rrs_err, abs(rate - exact))
  out.update({"mc_max_tv": tv, "mc_greedy_max_abs_error": greedy_err,
              "mc_rrs_max_abs_error": rrs_err})
  return out


# Verifier name -> the draft scheme it verifies.
VERIFIERS = {"rrs_iid": "iid", "rrs_norepl": "norepl", "greedy": "greedy"}


@functools.cache
def _monte_carlo(name: str, n: int):
  """A jitted `(keys [S], p, q) -> Verified` of [S] draft-and-verify rounds."""
  scheme = VERIFIERS[name]

  def one(key, p, q):
    k_draft, k_verify = jax.random.split(key)
    drafts = mdsd.sample_drafts(k_draft, q, n, scheme)
    if name == "greedy":
      return mdsd.verify_greedy(k_verify, p, q, drafts)
    return mdsd.verify_rrs(k_verify, p, q, drafts, scheme)

  return jax.jit(jax.vmap(one, in_axes=(0, None, None)))


# -------------------------------------------------------------------------------------- run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  start = time.perf_counter()
  results = sweep(config)
  summary = {"sweep_seconds": round(time.perf_counter() - start, 2)}
  summary.update(aggregate(config, results))
  start = time.perf_counter()
  summary.update(validate(config))
  summary["validation_seconds"] = round(time.perf_counter() - start, 2)
  start = time.perf_counter()
  summary.update(lm_sweep(config))
  summary["lm_seconds"] = round(time.perf_counter() - start, 2)
  with metric_writers.MetricWriter(workdir) as writer:
    writer.write_scalars(0, {f"final/{k}": v for k, v in summary.items()})
  if jax.process_index() == 0:
    _write_table(workdir, results)
    _plot(workdir, results)
  return summary


def _write_table(workdir, results):
  """Per-setting means as `acceptance.json` and a markdown table `acceptance.md`."""
  rows = []
  for (vocab, temperature, n), r in sorted(results.items()):
    rows.append({"V": vocab, "T": temperature, "n": n,
                 **{q: (None if np.isnan(r[q]).all() else float(np.mean(r[q])))
                    for q in QUANTITIES}})
  with open(os.path.join(workdir, "acceptance.json"), "w") as f:
    json.dump(rows, f, indent=1)
  fmt = lambda x: "skipped" if x is None else f"{x:.4f}"
  lines = ["| V | T | n | " + " | ".join(QUANTITIES) + " |",
           "|---" * (3 + len(QUANTITIES)) + "|"]
  lines += [f"| {r['V']} | {r['T']} | {r['n']} | "
            + " | ".join(fmt(r[q]) for q in QUANTITIES) + " |" for r in rows]
  with open(os.path.join(workdir, "acceptance.md"), "w") as f:
    f.write("Mean acceptance rates over the contexts of each setting.\n\n"
            + "\n".join(lines) + "\n")


def _plot(workdir, results):
  """Bounds and RRS vs n, one panel per (V, T): `bounds_vs_n.png`."""
  plt = plotting.plt  # pyplot with the Agg backend that launch.plotting selects
  panels = sorted({(v, t) for v, t, _ in results}, key=lambda vt: (vt[0], -vt[1]))
  cols = min(2, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), dpi=100,
                           squeeze=False)
  styles = {"alpha_norepl": ("alpha* without replacement", "-", "o"),
            "alpha_greedy": ("alpha* greedy drafts (= its verifier)", "-", "^"),
            "alpha_iid": ("alpha* with replacement", "-", "s"),
            "rrs_norepl": ("RRS without replacement", "--", "o"),
            "rrs_iid": ("RRS with replacement", "--", "s")}
  for ax, (vocab, temperature) in zip(axes.flat, panels):
    ns = sorted(n for v, t, n in results if (v, t) == (vocab, temperature))
    for q, (label, line, marker) in styles.items():
      ys = [float(np.mean(results[vocab, temperature, n][q])) for n in ns]
      ax.plot(ns, ys, line, marker=marker, label=label)
    ax.set(title=f"V = {vocab}, T = {temperature}", xlabel="drafts n",
           ylabel="mean acceptance rate", xticks=ns)
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "bounds_vs_n.png"))
  plt.close(fig)


# --------------------------------------------------------------------------------- benchmark


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """alpha* of one context: the sorted-prefix formula (jitted) vs scipy's HiGHS LP.

  The LP has V^n * n edge variables (V!/(V-n)! * n without replacement); the formula is
  O(V log V) with replacement and O(V * 421 * n) without (the clock integral).
  """
  rows = []
  n = 2
  rng = np.random.default_rng(0)
  for vocab in ((4, 16, 32) if quick else (4, 16, 64, 128)):
    p, q = (rng.dirichlet(np.ones(vocab)).astype(np.float32) for _ in range(2))
    pj, qj = jnp.asarray(p), jnp.asarray(q)
    for scheme in ("iid", "norepl"):
      fast = jax.jit(functools.partial(mdsd.optimal_acceptance, n=n, scheme=scheme))
      lp = lp_acceptance(p, q, n, scheme)
      if abs(float(fast(pj, qj)) - lp) > 1e-5:
        raise AssertionError(f"formula and LP disagree at V={vocab}, {scheme}")
      t = benchmarking.interleaved(
          {"ours": functools.partial(fast, pj, qj),
           "lp": functools.partial(lp_acceptance, p, q, n, scheme)},
          rounds=3 if quick else 5)
      label = "with" if scheme == "iid" else "without"
      rows.append(benchmarking.time_row(
          PAPER, f"alpha* of one context, V={vocab}, n={n}, drafts {label} replacement",
          ("sorted-prefix formula (jit)", t["ours"]), ("scipy HiGHS LP", t["lp"]),
          note="equal to 1e-5; LP time includes building it from the enumerated draft law; "
               "both compiled/warmed before timing"))
  # The decoding family's shared check: speculative vs autoregressive decoding.
  return rows + decoding_benchmark.core_rows(PAPER, quick)
