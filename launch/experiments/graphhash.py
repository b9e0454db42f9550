"""Experiment driver for `graphhash` (library: `jaxrepro.algorithms.graph.graphhash`).

Every method trains the same MF-BPR backbone (dim D, one uniform negative per positive,
Adam with coupled weight decay, the same steps and batch) and differs only in the id ->
row maps of the user and item tables:

* `full`: one row per id (the unhashed model);
* `graph`: GraphHash, each id's Louvain cluster on bipartite modularity
  (`config.hash.resolution`), which fixes the bucket counts `B_U`, `B_I`;
* `modulo`, `frequency`: the official hashing baselines at the same `B_U`, `B_I`;
* `double_graph`: DoubleGraphHash, a universal hash row plus the cluster row, same tables.

The main comparison runs at the resolution's table size (~99% smaller on the card's data);
the sweep adds tables 75% and 90% smaller (`config.hash.sweep_sizes`), where GraphHash's
resolution is bisected to the budget. Recall@K is the held-out Recall@20 at the *last*
step (no selection on the test interactions), averaged over seeds. Every method uses one
learning rate and weight decay (the official Gowalla MF + GraphHash values, 1e-2 / 1e-6);
the official `commands.sh` tunes them per hash (e.g. full 5e-3 / 1e-8, random 1e-3 / 1e-6),
which this driver does not: no method is tuned on this data. The benchmark times a
training step of the hashed vs the full model, counts parameter bytes and times Louvain.
"""

import importlib.util
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxrepro.algorithms.graph import graphhash as gh
from jaxrepro.algorithms.graph import ranking, ultragcn
from jaxrepro.configs import common
from jaxrepro.configs import graphhash as graphhash_config
from jaxrepro.launch import benchmarking, experiment, plotting, train_loop
from jaxrepro.launch.data import graphs

PAPER = "graphhash"
MAIN = "main"  # the setting name of the main comparison in the summary

CLAIMS = (
    experiment.Claim(
        "graph_vs_modulo",
        "On the card's bipartite SBM (2000 x 2000, 25 communities), with tables ~99% "
        "smaller (Louvain at resolution 1), GraphHash's Recall@20 is at least 10x that "
        "of modulo hashing at the same bucket counts (mean of 3 seeds)",
        "graph_over_modulo", 10.0,
        note="The spec card's restatement of the paper's gains over hashing baselines at "
        "an extreme compression. Modulo hashing mixes the communities in every bucket, so "
        "it is close to a popularity-free random ranking."),
    experiment.Claim(
        "graph_vs_full",
        "At the same ~99% smaller tables, GraphHash's Recall@20 is at least 0.8x that of "
        "the full tables (mean of 3 seeds, same backbone and budget)",
        "graph_over_full", 0.8,
        note="The spec card's threshold (its calibration: 0.276 vs 0.300). On the shared "
        "`bipartite_sbm` the full tables also learn each item's Pareto popularity, which "
        "a table with one row per cluster cannot: all ~80 items of a community tie, so "
        "GraphHash is capped near the in-community share times 20 / (unseen items of the "
        "community), ~0.3, while the full tables reach ~0.41. On the exploration seeds "
        "0-2 the ratio was 0.77; the threshold was kept."),
    experiment.Claim(
        "graph_vs_best_hash",
        "Averaged over tables 75%, 90% and ~99% smaller, GraphHash's Recall@20 is at "
        "least 2.0x the best of modulo and frequency hashing at the same table size "
        "(the paper: +101.52% over the best hashing baseline on average)",
        "graph_over_best_hash/mean", 2.0,
        note="The paper's baselines also include double, double-frequency, LSH and DHE "
        "hashing; only modulo and frequency are compared here."),
)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "num_seeds", "learning_rate", "eval_k", "model.dim",
                        "num_negatives", "hash.resolution", "hash.sweep_iterations")
  if config.batch_size < 0:
    raise common.ConfigError(f"config.batch_size={config.batch_size} must be >= 0 (0 = "
                             "full batch)")
  if config.weight_decay < 0:
    raise common.ConfigError(f"config.weight_decay={config.weight_decay} must be >= 0")
  methods = tuple(config.methods)
  unknown = [m for m in methods if m not in graphhash_config.METHODS]
  if not methods or unknown or len(set(methods)) != len(methods):
    raise common.ConfigError(
        f"config.methods={methods!r} must be distinct names from: "
        + ", ".join(graphhash_config.METHODS))
  for size in config.hash.sweep_sizes:
    if not 0 < size < 1:
      raise common.ConfigError(f"config.hash.sweep_sizes holds {size!r}; each size is a "
                               "fraction of the full tables' rows in (0, 1)")
  if not 0 <= config.hash.frequency_cutoff < 1:
    raise common.ConfigError(f"config.hash.frequency_cutoff={config.hash.frequency_cutoff}"
                             " must be in [0, 1)")
  if config.data.source == "interactions" and not config.data.path:
    raise common.ConfigError("config.data.source='interactions' needs config.data.path")
  if config.data.source == "sbm" and config.eval_k > config.data.n_items:
    raise common.ConfigError(f"config.eval_k={config.eval_k} exceeds data.n_items="
                             f"{config.data.n_items}")


def load_data(config, seed: int) -> graphs.BipartiteInteractions:
  d = config.data
  if d.source == "interactions":
    return graphs.load_interactions(d.path, test_fraction=d.test_fraction, seed=seed)
  return graphs.bipartite_sbm(
      seed, n_users=d.n_users, n_items=d.n_items, n_communities=d.n_communities,
      interactions_per_user=d.interactions_per_user, in_community=d.in_community,
      pareto_alpha=d.pareto_alpha, test_fraction=d.test_fraction)


def baseline_codes(method: str, data, graph: gh.HashCodes, config, seed: int) -> gh.HashCodes:
  """The codes of `method` at the bucket counts GraphHash found (`graph`)."""
  u, i = data.n_users, data.n_items
  if method == "graph":
    return graph
  if method == "full":
    return gh.identity_hash(u, i)
  if method == "modulo":
    return gh.modulo_hash(u, i, graph.n_user_buckets, graph.n_item_buckets)
  if method == "frequency":
    return gh.frequency_hash(data.train_pairs, u, i, graph.n_user_buckets,
                             graph.n_item_buckets, config.hash.frequency_cutoff)
  if method == "double_graph":
    return gh.double_graph_hash(graph, seed)
  raise ValueError(f"method={method!r}; choose one of {graphhash_config.METHODS}")


def _score(bundle, users):
  """Module-level (hashable) score function for `ranking.evaluate_in_batches`."""
  return gh.score_users(bundle["params"], bundle["codes"], users)


def make_batch_fn(config, pairs: jax.Array, n_items: int):
  """`key -> batch`: uniform positives, or every pair when `batch_size` is 0 (official)."""
  if config.batch_size > 0:
    return lambda key: ultragcn.sample_batch(key, pairs, n_items, config.batch_size,
                                             config.num_negatives)

  def full_batch(key):
    neg = jax.random.randint(key, (pairs.shape[0], config.num_negatives), 0, n_items,
                             jnp.int32)
    return {"users": pairs[:, 0], "pos_items": pairs[:, 1], "neg_items": neg}
  return full_batch


def make_optimizer(config) -> optax.GradientTransformation:
  # torch's Adam(weight_decay=wd) adds wd * param to the gradient before the moments.
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.adam(config.learning_rate))


def train_method(config, workdir: str, data, codes: gh.HashCodes, seed: int,
                 prefix: str) -> train_loop.FitResult:
  """Trains MF-BPR on `codes`' tables, evaluating Recall/NDCG@K as it goes."""
  code_arrays = codes.arrays()
  pairs = jnp.asarray(data.train_pairs)
  tx = make_optimizer(config)
  step = train_loop.make_train_step(
      lambda params, batch, key: gh.bpr_loss(params, batch, code_arrays), tx,
      batch_fn=make_batch_fn(config, pairs, data.n_items))
  train_items = jnp.asarray(ranking.pad_item_lists(data.train_pairs, data.n_users))
  test_items = jnp.asarray(ranking.pad_item_lists(data.test_pairs, data.n_users))
  k = config.eval_k

  def evaluate(params):
    m = ranking.evaluate_in_batches(_score, {"params": params, "codes": code_arrays},
                                    train_items, test_items, k=k)
    return {f"recall@{k}": m["recall"], f"ndcg@{k}": m["ndcg"]}

  params = gh.init_params(jax.random.key(seed), codes, config.model.dim)
  state = train_loop.TrainState.create(params, tx, jax.random.key(seed + 10_000))
  t = config.train
  return train_loop.fit(state, step, num_steps=t.num_steps, log_every=t.log_every,
                        workdir=workdir, checkpoint_every=t.checkpoint_every,
                        keep_checkpoints=t.keep_checkpoints, eval_fn=evaluate,
                        eval_every=t.log_every, prefix=prefix,
                        description=prefix.rstrip("/"))


def _settings(config, data, seed: int, summary_lists: dict) -> list[tuple[str, dict]]:
  """`[(setting, {method: codes})]`: the main comparison, then the sweep's sizes."""
  u, i = data.n_users, data.n_items
  start = time.perf_counter()
  user_labels, item_labels = gh.louvain_bipartite(
      data.train_pairs, u, i, resolution=config.hash.resolution, seed=seed)
  summary_lists["louvain_seconds"].append(time.perf_counter() - start)
  summary_lists["modularity/louvain"].append(gh.bipartite_modularity(
      data.train_pairs, u, i, user_labels, item_labels, config.hash.resolution))
  if config.data.source == "sbm":
    summary_lists["modularity/planted"].append(gh.bipartite_modularity(
        data.train_pairs, u, i, data.user_community, data.item_community,
        config.hash.resolution))
  graph = gh.codes_from_clusters(data.train_pairs, u, i, user_labels, item_labels)
  out = [(MAIN, {m: baseline_codes(m, data, graph, config, seed) for m in config.methods})]
  for size in config.hash.sweep_sizes:
    max_rows = max(2, math.floor(size * (u + i)))
    _, sized = gh.resolution_for_budget(data.train_pairs, u, i, max_rows, seed=seed,
                                        iterations=config.hash.sweep_iterations)
    methods = [m for m in graphhash_config.SWEEP_METHODS if m in config.methods]
    out.append((f"size{size:g}", {m: baseline_codes(m, data, sized, config, seed)
                                  for m in methods}))
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  k = config.eval_k
  lists = {"louvain_seconds": [], "modularity/louvain": [], "modularity/planted": []}
  runs = {}  # (setting, method) -> lists of (final recall, final ndcg, best recall, rows)
  for seed in range(config.seed, config.seed + config.num_seeds):
    data = load_data(config, seed)
    for setting, methods in _settings(config, data, seed, lists):
      for method, codes in methods.items():
        prefix = f"{setting}/{method}/seed{seed}/"
        result = train_method(config, workdir, data, codes, seed, prefix)
        recall = [r[f"{prefix}eval/recall@{k}"] for r in result.history]
        last = result.history[-1]
        runs.setdefault((setting, method), []).append(
            (recall[-1], last[f"{prefix}eval/ndcg@{k}"], max(recall), codes.table_rows,
             codes.size_reduction, result.seconds))

  summary = {name: float(np.mean(v)) for name, v in lists.items() if v}
  recall_of = {}
  for (setting, method), values in runs.items():
    recall, ndcg, best, rows, reduction, seconds = np.array(values).T
    key = method if setting == MAIN else f"{setting}/{method}"
    recall_of[(setting, method)] = float(recall.mean())
    summary[f"recall@{k}/{key}"] = float(recall.mean())
    summary[f"recall@{k}_std/{key}"] = float(recall.std())
    summary[f"best_recall@{k}/{key}"] = float(best.mean())
    summary[f"ndcg@{k}/{key}"] = float(ndcg.mean())
    summary[f"table_rows/{key}"] = float(rows.mean())
    summary[f"size_reduction/{key}"] = float(reduction.mean())
    summary[f"train_seconds/{key}"] = round(float(seconds.sum()), 1)
  if (MAIN, "graph") in recall_of:
    graph = recall_of[(MAIN, "graph")]
    # float32 tables: rows x D x 4 bytes (the int32 code buffers are not parameters).
    summary["param_bytes/graph"] = summary["table_rows/graph"] * 4 * config.model.dim
    if (MAIN, "modulo") in recall_of:
      summary["graph_over_modulo"] = graph / recall_of[(MAIN, "modulo")]
    if (MAIN, "full") in recall_of:
      summary["graph_over_full"] = graph / recall_of[(MAIN, "full")]
  ratios = []
  for setting in {s for s, _ in runs}:
    baselines = [recall_of[(setting, m)] for m in ("modulo", "frequency")
                 if (setting, m) in recall_of]
    if (setting, "graph") in recall_of and baselines:
      ratio = recall_of[(setting, "graph")] / max(baselines)
      summary[f"graph_over_best_hash/{setting}"] = ratio
      ratios.append(ratio)
  if ratios:
    summary["graph_over_best_hash/mean"] = float(np.mean(ratios))
  if jax.process_index() == 0:
    # Recall@K against table rows: one line per hash over the settings, full is a point.
    series = {}
    for method in config.methods:
      points = sorted((np.mean([v[3] for v in values]), recall_of[(setting, m)])
                      for (setting, m), values in runs.items() if m == method)
      series[method] = ([p[0] for p in points], [p[1] for p in points])
    plotting.line_plot(f"{workdir}/recall_vs_table_size.png", series,
                       title=f"Recall@{k} vs embedding rows (mean over seeds)",
                       xlabel="table rows (users + items)", ylabel=f"Recall@{k}",
                       logx=True, markers=True)
  return summary


# --------------------------------------------------------------------------------- benchmark


def _jitted_step(config, n_items: int):
  """One MF-BPR step with the data and the codes as arguments (nothing baked in)."""
  tx = make_optimizer(config)

  def step(state, pairs, codes):
    return train_loop.make_train_step(
        lambda p, b, key: gh.bpr_loss(p, b, codes), tx,
        batch_fn=make_batch_fn(config, pairs, n_items))(state)
  return jax.jit(step), tx


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Training step and parameter bytes of GraphHash vs the full tables, and Louvain's cost
  against the full model's training run (the paper: preprocessing takes seconds)."""
  config = experiment.config_module(PAPER).get_config("demo")
  rows = []
  for n in (2000,) if quick else (2000, 20_000):
    data = graphs.bipartite_sbm(0, n_users=n, n_items=n, n_communities=max(25, n // 80),
                                interactions_per_user=30, in_community=0.9)
    start = time.perf_counter()
    graph = gh.graph_hash(data.train_pairs, n, n, resolution=config.hash.resolution)
    louvain_s = time.perf_counter() - start
    full = gh.identity_hash(n, n)
    step, tx = _jitted_step(config, n)
    pairs = jnp.asarray(data.train_pairs)
    states = {name: train_loop.TrainState.create(
        gh.init_params(jax.random.key(0), codes, config.model.dim), tx, jax.random.key(1))
        for name, codes in (("graph", graph), ("full", full))}
    args = {"graph": (states["graph"], pairs, graph.arrays()),
            "full": (states["full"], pairs, full.arrays())}
    t = benchmarking.interleaved({name: lambda a=a, f=step: f(*a) for name, a in args.items()},
                                 rounds=5 if quick else 20)
    size = f"{n} users x {n} items, {len(data.train_pairs)} interactions"
    rows.append(benchmarking.time_row(
        PAPER, f"MF-BPR training step, {size}",
        (f"GraphHash ({graph.table_rows} rows)", t["graph"]),
        (f"full tables ({full.table_rows} rows)", t["full"]),
        note=f"B={config.batch_size}, D={config.model.dim}, Adam + weight decay; "
             "ratio = full / GraphHash step time"))
    d = config.model.dim
    rows.append(benchmarking.Row(
        PAPER, f"embedding parameter bytes, {size}", "GraphHash", "full tables",
        graph.param_bytes(d), full.param_bytes(d), "bytes",
        full.param_bytes(d) / graph.param_bytes(d),
        note=f"float32, D={d}; the int32 code buffers ({4 * 2 * n} bytes) are not counted"))
    train_s = config.train.num_steps * t["full"].median_s
    rows.append(benchmarking.Row(
        PAPER, f"Louvain preprocessing vs a {config.train.num_steps}-step full-table "
               f"training run, {size}", "Louvain (networkx)", "full-table training",
        louvain_s, train_s, "s", train_s / louvain_s,
        note="ratio = training time / clustering time; the clustering runs once, on "
             "the host, before training"))
    rows.append(_anchor_row(data, config.hash.resolution, louvain_s, size))
  return rows


def _anchor_row(data, resolution: float, ours_s: float, size: str) -> benchmarking.Row:
  """networkx Louvain vs scikit-network's (the official code's library), when installed."""
  name = f"Louvain on bipartite modularity, {size}"
  anchor = "scikit-network Louvain (official code)"
  if importlib.util.find_spec("sknetwork") is None:
    return benchmarking.skipped_row(PAPER, name, anchor, "scikit-network is not installed")
  from sknetwork.clustering import Louvain  # Optional anchor: imported only when present.

  r = gh.biadjacency(data.train_pairs, data.n_users, data.n_items)
  start = time.perf_counter()
  louvain = Louvain(resolution=resolution).fit(r, force_bipartite=True)
  anchor_s = time.perf_counter() - start
  q_ours = gh.bipartite_modularity(
      data.train_pairs, data.n_users, data.n_items,
      *gh.louvain_bipartite(data.train_pairs, data.n_users, data.n_items,
                            resolution=resolution), resolution)
  q_anchor = gh.bipartite_modularity(data.train_pairs, data.n_users, data.n_items,
                                     louvain.labels_row_, louvain.labels_col_, resolution)
  return benchmarking.Row(
      PAPER, name, "networkx (pure Python)", anchor, ours_s, anchor_s, "s",
      anchor_s / ours_s,
      note=f"ratio = scikit-network / networkx time (below 1: the compiled anchor is "
           f"faster); Barber Q {q_ours:.4f} (networkx) vs {q_anchor:.4f} (scikit-network)")
