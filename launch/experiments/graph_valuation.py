"""Experiment driver for `graph_valuation` (library: `jaxrepro.algorithms.graph.graph_valuation`).

A buyer's SBM is compared with sellers' SBMs. Structure: the structural disparity (W1 between
blind-message-passing signals) of sellers whose within-block edge probability moves away
from the buyer's, on several seeds, and its stability under random relabelling of each
seller's nodes. Features: relevance and diversity of sellers drawn from the buyer's own
distribution and of sellers whose feature noise variance is scaled by c. No training.
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.stats

from jaxrepro.algorithms.graph import graph_valuation as gv
from jaxrepro.configs import common
from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import benchmarking, experiment, metric_writers, plotting
from jaxrepro.launch.data import graphs
from jaxrepro.models.graph import padding

PAPER = "graph_valuation"

CLAIMS = (
    experiment.Claim(
        "disparity_monotone_in_shift",
        "Structural disparity is monotone in the seller's SBM shift |p_in^s - p_in^b| "
        "(Spearman correlation, mean over seeds)", "disparity_spearman_mean", 0.9, ">=",
        note="The paper reports qualitative tracking on real graphs; the card restates it "
        "as a controlled SBM sweep. Blind signal: K=2 GCN hops of a shared Gaussian signal "
        "in degree-rank order; exact W1 by optimal assignment."),
    experiment.Claim(
        "disparity_stable_under_relabelling",
        "Randomly relabelling a seller's nodes moves its disparity by at most 10% of the "
        "disparity range across sellers (worst seller)", "relabel_spread_over_range", 0.10,
        "<=", note="Degree ranking breaks ties by node id, so relabelling changes the "
        "shared order inside groups of equal degree; this claim measures how much."),
    experiment.Claim(
        "same_distribution_is_relevant",
        "A seller drawn from the buyer's own distribution scores relevance at least 0.95 "
        "(worst seed)", "same_distribution_relevance_min", 0.95, ">=",
        note="Fails at the card's size (measured about 0.91 on 500 nodes): the buyer's "
        "sample eigenvalues are biased (the Marchenko-Pastur edges (1 +- sqrt(d/n))^2 are "
        "0.76 and 1.27 for d=8, n=500) while the seller's variance along the buyer's "
        "directions is not, so even identically distributed graphs differ per direction. "
        "A Gaussian simulation of the same features gives about 0.91 at n=500, 0.93 at "
        "1000 and 0.96 at 2000 nodes; the threshold is kept as the card states it."),
    experiment.Claim(
        "same_distribution_is_not_diverse",
        "A seller drawn from the buyer's own distribution scores diversity at most 0.15 "
        "(worst seed)", "same_distribution_diversity_max", 0.15, "<="),
    experiment.Claim(
        "relevance_decreases_with_noise",
        "Relevance decreases strictly as the seller's feature noise variance grows "
        "(smallest step R(c) - R(c+1), mean over seeds)", "relevance_min_decrease", 1e-6,
        ">="),
    experiment.Claim(
        "self_relevance_is_one",
        "R(X, X) = 1 up to float32 round-off (largest |R(X, X) - 1| over the buyers)",
        "self_relevance_error", 1e-6, "<="),
    experiment.Claim(
        "self_diversity_is_zero",
        "D(X, X) = 0 up to float32 round-off (largest D(X, X) over the buyers)",
        "self_diversity_max",
        1e-6, "<="),
)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "buyer.n_nodes", "buyer.n_classes", "buyer.n_features",
                        "valuation.signal_dim", "valuation.n_projections",
                        "sellers.relabel_trials")
  if config.valuation.k_hops < 0:
    raise ConfigError(f"config.valuation.k_hops={config.valuation.k_hops}; must be >= 0")
  p_in = common.comma_list(config.sellers.p_in)
  if len(p_in) < 3 or not all(0 <= p <= 1 for p in p_in):
    raise ConfigError(f"config.sellers.p_in={config.sellers.p_in!r}: need at least 3 "
                      "probabilities in [0, 1] for a rank correlation")
  if len(common.comma_list(config.sellers.noise_variance_scales)) < 2:
    raise ConfigError("config.sellers.noise_variance_scales needs at least 2 values")


# ------------------------------------------------------------------------------------ data


def class_means(config) -> np.ndarray:
  """`[C, F]` class means shared by the buyer's distribution and its look-alike sellers."""
  b = config.buyer
  rng = np.random.default_rng(b.means_seed)
  return (b.mean_scale * rng.standard_normal((b.n_classes, b.n_features))).astype(np.float32)


def make_party(config, seed: int, p_in: float, noise_variance: float = 1.0) -> graphs.Graph:
  """An SBM with the buyer's block sizes and p_out, the given p_in, Gaussian class features."""
  b = config.buyer
  g = graphs.sbm(seed, b.n_nodes, b.n_classes, p_in, b.p_out, features="none")
  rng = np.random.default_rng([seed, 1])
  noise = rng.standard_normal((b.n_nodes, b.n_features)) * b.noise_std
  x = class_means(config)[g.labels] + np.sqrt(noise_variance) * noise
  return graphs.Graph(edges=g.edges, n_nodes=g.n_nodes, features=x.astype(np.float32),
                      labels=g.labels)


def relabel(graph: graphs.Graph, seed: int) -> graphs.Graph:
  """The same graph with its node ids randomly permuted."""
  perm = np.random.default_rng(seed).permutation(graph.n_nodes)  # old id -> new id
  inverse = np.argsort(perm)
  return graphs.Graph(edges=graphs.canonical_edges(perm[graph.edges], graph.n_nodes),
                      n_nodes=graph.n_nodes, features=graph.features[inverse],
                      labels=graph.labels[inverse])


class Valuer:
  """Pads every graph to one shape and scores pairs with jitted, compiled-once functions."""

  def __init__(self, config, max_edges: int):
    v = config.valuation
    self.config = config
    self.n_node = padding.next_power_of_two(config.buyer.n_nodes + 1)
    self.n_edge = padding.next_power_of_two(max_edges)
    self.key = jax.random.key(config.seed)
    self._signals = jax.jit(lambda key, gb, mb, gs, ms: gv.blind_signals(
        key, gb, mb, gs, ms, k_hops=v.k_hops, signal_dim=v.signal_dim, matching=v.matching))
    self._sliced = jax.jit(lambda key, a, b, ma, mb: gv.sliced_wasserstein(
        key, a, b, ma, mb, v.n_projections))
    self._features = jax.jit(gv.featural_value)

  def pad(self, graph: graphs.Graph):
    padded = padding.pad_graph(graphs.to_graphs_tuple(graph), self.n_node, self.n_edge, 2)
    features = np.zeros((self.n_node, graph.features.shape[1]), np.float32)
    features[:graph.n_nodes] = graph.features
    return padded._replace(nodes=features), padding.node_mask(padded, self.n_node)

  def disparity(self, buyer: graphs.Graph, seller: graphs.Graph) -> float:
    (gb, mb), (gs, ms) = self.pad(buyer), self.pad(seller)
    sb, ss = self._signals(self.key, gb, mb, gs, ms)
    if self.config.valuation.distance == "sliced":
      return float(self._sliced(jax.random.fold_in(self.key, 1), sb, ss, mb, ms))
    sb, ss = np.asarray(sb)[np.asarray(mb)], np.asarray(ss)[np.asarray(ms)]
    return gv.wasserstein_exact(sb, ss)

  def features(self, buyer: graphs.Graph, seller: graphs.Graph) -> tuple[float, float]:
    (gb, mb), (gs, ms) = self.pad(buyer), self.pad(seller)
    r, d = self._features(jnp.asarray(gb.nodes), mb, jnp.asarray(gs.nodes), ms)
    return float(r), float(d)


# ----------------------------------------------------------------------------- the study


def structure_study(config, valuer: Valuer, buyers: dict, sellers: dict) -> dict:
  """Disparities per seed and seller, rank correlations, relabelling spread."""
  p_b = config.buyer.p_in
  p_in = common.comma_list(config.sellers.p_in)
  shift = [abs(p - p_b) for p in p_in]
  out, rhos = {}, []
  for seed, buyer in buyers.items():
    values = [valuer.disparity(buyer, sellers[seed, p]) for p in p_in]
    for p, value in zip(p_in, values, strict=True):
      out[f"disparity/seed{seed}/p_in={p}"] = value
    rhos.append(float(scipy.stats.spearmanr(shift, values).statistic))
    out[f"disparity_spearman/seed{seed}"] = rhos[-1]
  out["disparity_spearman_mean"] = float(np.mean(rhos))
  seed = next(iter(buyers))
  base = [out[f"disparity/seed{seed}/p_in={p}"] for p in p_in]
  value_range = max(base) - min(base)
  spreads = []
  for p, value in zip(p_in, base, strict=True):
    moved = [valuer.disparity(buyers[seed], relabel(sellers[seed, p], 1000 + t))
             for t in range(config.sellers.relabel_trials)]
    spreads.append(max(moved + [value]) - min(moved + [value]))
  out["relabel_spread_max"] = max(spreads)
  out["relabel_spread_over_range"] = max(spreads) / max(value_range, 1e-12)
  return out


def feature_study(config, valuer: Valuer, buyers: dict) -> dict:
  """Relevance/diversity of look-alike sellers and of noisier sellers; R(X,X), D(X,X)."""
  scales = common.comma_list(config.sellers.noise_variance_scales)
  out, rel = {}, {c: [] for c in scales}
  for seed, buyer in buyers.items():
    for c in scales:
      seller = make_party(config, 10_000 + seed, config.buyer.p_in, c)
      r, d = valuer.features(buyer, seller)
      rel[c].append(r)
      out[f"relevance/seed{seed}/c={c}"], out[f"diversity/seed{seed}/c={c}"] = r, d
  same = [out[f"relevance/seed{s}/c={scales[0]}"] for s in buyers]
  same_d = [out[f"diversity/seed{s}/c={scales[0]}"] for s in buyers]
  out["same_distribution_relevance_min"] = min(same)
  out["same_distribution_diversity_max"] = max(same_d)
  means = [float(np.mean(rel[c])) for c in scales]
  out.update({f"relevance_mean/c={c}": m for c, m in zip(scales, means, strict=True)})
  out["relevance_min_decrease"] = min(a - b for a, b in zip(means, means[1:], strict=False))
  selves = [valuer.features(b, b) for b in buyers.values()]
  out["self_relevance_error"] = max(abs(r - 1.0) for r, _ in selves)
  out["self_diversity_max"] = max(d for _, d in selves)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  start = time.perf_counter()
  seeds = common.comma_list(config.sellers.seeds, int)
  p_in = common.comma_list(config.sellers.p_in)
  buyers = {s: make_party(config, s, config.buyer.p_in) for s in seeds}
  # Sellers use seeds disjoint from the buyers' (a seller is never the buyer's own graph).
  sellers = {(s, p): make_party(config, 100 + 17 * s + i, p)
             for s in seeds for i, p in enumerate(p_in)}
  max_edges = 2 * max(len(g.edges) for g in [*buyers.values(), *sellers.values()])
  valuer = Valuer(config, max_edges)
  summary = structure_study(config, valuer, buyers, sellers)
  summary.update(feature_study(config, valuer, buyers))
  summary["seconds"] = round(time.perf_counter() - start, 2)
  with metric_writers.MetricWriter(workdir) as writer:
    writer.write_scalars(0, {f"final/{k}": v for k, v in summary.items()})
  if jax.process_index() == 0:
    _plot(workdir, config, summary)
  return summary


def _plot(workdir, config, summary):
  p_in = common.comma_list(config.sellers.p_in)
  shift = [abs(p - config.buyer.p_in) for p in p_in]
  plotting.line_plot(
      f"{workdir}/disparity_vs_shift.png",
      {f"seed {s}": (shift, [summary[f"disparity/seed{s}/p_in={p}"] for p in p_in])
       for s in common.comma_list(config.sellers.seeds, int)},
      title="structural disparity vs SBM shift", xlabel="|p_in seller - p_in buyer|",
      ylabel="W1 between blind signals", markers=True)
  scales = common.comma_list(config.sellers.noise_variance_scales)
  plotting.line_plot(
      f"{workdir}/relevance_vs_noise.png",
      {"relevance (mean over seeds)": (scales, [summary[f"relevance_mean/c={c}"]
                                                for c in scales])},
      title="featural relevance vs seller noise", xlabel="noise variance scale c",
      ylabel="relevance", markers=True)


# --------------------------------------------------------------------------------- benchmark


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Exact W1 (scipy assignment) vs the jitted sliced W1 on the demo's blind signals, and
  the graph family's GCN epoch (ours vs dense JAX and PyTorch Geometric)."""
  from jaxrepro.launch import gcn_benchmark  # noqa: PLC0415 - only the benchmark needs it
  config = experiment.config_module(PAPER).get_config("smoke" if quick else "demo")
  buyer = make_party(config, 0, config.buyer.p_in)
  seller = make_party(config, 1, common.comma_list(config.sellers.p_in)[-1])
  valuer = Valuer(config, 2 * max(len(buyer.edges), len(seller.edges)))
  (gb, mb), (gs, ms) = valuer.pad(buyer), valuer.pad(seller)
  sb, ss = valuer._signals(valuer.key, gb, mb, gs, ms)
  a, b = np.asarray(sb)[np.asarray(mb)], np.asarray(ss)[np.asarray(ms)]
  key = jax.random.key(1)
  t = benchmarking.interleaved(
      {"sliced": lambda: valuer._sliced(key, sb, ss, mb, ms),
       "exact": lambda: gv.wasserstein_exact(a, b)}, rounds=3 if quick else 5)
  rows = [benchmarking.time_row(
      PAPER, f"structural disparity of two {config.buyer.n_nodes}-node graphs",
      (f"sliced W1 ({config.valuation.n_projections} projections, jitted)", t["sliced"]),
      ("exact W1 (scipy linear_sum_assignment)", t["exact"]),
      note=f"sliced {float(valuer._sliced(key, sb, ss, mb, ms)):.4f} vs exact "
           f"{gv.wasserstein_exact(a, b):.4f} (sliced W1 <= W1)")]
  return rows + gcn_benchmark.rows(PAPER, quick)
