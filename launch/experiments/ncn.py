"""Experiment driver for `ncn` (library: `jaxrepro.algorithms.graph.ncn`).

For every seed the driver builds one graph and one edge split, then runs each configured
setting: a setting hides a share of the training edges (the incompleteness the paper's
completion targets) and evaluates its methods on the same validation and test pairs:

* `cn`: the common-neighbour count on the observed training graph (no training);
* `gae`: the official `cn0` ablation, an MLP on `h_i * h_j`;
* `ncn`: neural common neighbours (`cn1`);
* `ncnc`: NCN with common-neighbour completion (`incn1cn1`).

The trained methods share the encoder, the optimizer (Adam, separate encoder / predictor
learning rates), target link removal and the budget. Validation and test Hits@K are
computed every `log_every` steps; a run reports its test Hits@K at the best validation
Hits@K (the official model selection), and the summary averages that over seeds.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxrepro.algorithms.graph import metrics, ncn
from jaxrepro.configs import common
from jaxrepro.launch import benchmarking, experiment, plotting, train_loop
from jaxrepro.launch.data import graphs

PAPER = "ncn"
METHODS = ("cn", "gae", "ncn", "ncnc")
TRAINED = ("gae", "ncn", "ncnc")

CLAIMS = (
    experiment.Claim(
        "ncn_beats_gae",
        "On the card's random geometric graphs (1000 nodes, degree ~9.5, uninformative "
        "features), NCN's test Hits@50 is at least GAE's + 0.15 (mean of 3 seeds)",
        "hits_gain_ncn_vs_gae/full", 0.15,
        note="Card calibration: GAE 0.307, NCN 0.589. With noise features GAE can only "
        "use what one propagation step leaks into h_i * h_j; NCN pools the common "
        "neighbours explicitly. Measured (demo, seeds 0-2): CN 0.554, GAE 0.472, NCN "
        "0.596, a gain of 0.123, so the claim fails at the card's threshold. Our GAE is "
        "the official cn0 predictor on the same puregcn encoder (LayerNorm, JK, "
        "Hadamard MLP); with 32 random Gaussian features the propagated features act as "
        "near-orthogonal node codes, so h_i * h_j already correlates with the number of "
        "shared neighbours and GAE is much stronger than the card's 0.307 (whose GAE "
        "setup the card does not give). Threshold kept; NCN beats GAE on every seed "
        "(per seed GAE 0.449 / 0.519 / 0.448, NCN 0.540 / 0.571 / 0.675)."),
    experiment.Claim(
        "ncn_matches_cn_heuristic",
        "On the same graphs, NCN's test Hits@50 is at least 0.9 x the common-neighbour "
        "count heuristic's (mean of 3 seeds)", "hits_ratio_ncn_to_cn/full", 0.9,
        note="On a geometric graph the CN count is a near-optimal score; the claim is "
        "that NCN learns it from the pooled common-neighbour representations."),
    experiment.Claim(
        "ncnc_helps_incomplete_graph",
        "With 30% of the training edges hidden, NCNC's test Hits@50 is at least NCN's "
        "(mean of 3 seeds)", "hits_gain_ncnc_vs_ncn/incomplete", 0.0,
        note="The card expects a small margin (the paper: +0.6 HR@100 on Cora, +1.9 "
        "Hits@50 on ogbl-collab). Measured (demo, seeds 0-2): NCN 0.291, NCNC 0.375, CN "
        "heuristic 0.316 on the incomplete graph; per seed NCN 0.219 / 0.279 / 0.374, NCNC "
        "0.388 / 0.376 / 0.361 (ahead on 2 of 3 seeds, a steadier mean)."),
)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "num_seeds", "batch_size", "gnn_lr", "pred_lr", "eval_k",
                        "eval_chunk", "model.hidden", "model.mp_layers")
  if not config.settings:
    raise common.ConfigError("config.settings is empty; define at least one setting")
  for name, setting in config.settings.items():
    methods = _methods(setting)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
      raise common.ConfigError(
          f"config.settings.{name}.methods={setting.methods!r}; choose a comma-separated "
          f"subset of {', '.join(METHODS)}")
    if not 0.0 <= setting.hide_fraction < 1.0:
      raise common.ConfigError(f"config.settings.{name}.hide_fraction="
                               f"{setting.hide_fraction} must be in [0, 1)")
  if config.data.source == "ogbl" and not config.data.root:
    raise common.ConfigError("config.data.source='ogbl' needs config.data.root (a local "
                             "ogbl-style directory, see launch.data.graphs.load_ogbl)")
  for rate_name, rate in config.dropout.items():
    if not 0.0 <= rate < 1.0:
      raise common.ConfigError(f"config.dropout.{rate_name}={rate} must be in [0, 1)")
  if not 0.0 < config.completion.pt <= 1.0 or config.completion.depth < 0:
    raise common.ConfigError(
        f"config.completion.pt={config.completion.pt} must be in (0, 1] and "
        f"config.completion.depth={config.completion.depth} >= 0")
  if config.data.source == "rgg" and config.data.n_negatives < config.eval_k:
    raise common.ConfigError(f"config.data.n_negatives={config.data.n_negatives} must be "
                             f">= config.eval_k={config.eval_k}")


def _methods(setting) -> tuple[str, ...]:
  return tuple(m.strip() for m in setting.methods.split(",") if m.strip())


# ------------------------------------------------------------------------------------ data


def make_data(config, seed: int) -> tuple[graphs.Graph, graphs.EdgeSplit]:
  """The full graph and its link split for one seed."""
  d = config.data
  if d.source == "ogbl":
    graph, split = graphs.load_ogbl(d.root, d.split or None)
    if split is None:
      split = graphs.edge_split(seed, graph, d.val_fraction, d.test_fraction,
                                d.n_negatives)
    if graph.features is None:
      raise common.ConfigError(f"{d.root} has no node features; NCN's encoder needs them")
    return graph, split
  graph = graphs.random_geometric_graph(seed, d.n_nodes, d.radius, n_features=d.n_features,
                                        feature_signal=d.feature_signal)
  return graph, graphs.edge_split(seed, graph, d.val_fraction, d.test_fraction,
                                  d.n_negatives)


def observed_graph(graph: graphs.Graph, train_edges: np.ndarray, hide_fraction: float,
                   seed: int) -> graphs.Graph:
  """The training graph with a random `hide_fraction` of its edges removed."""
  rng = np.random.default_rng([seed, 1])
  keep = np.sort(rng.permutation(len(train_edges))[
      :len(train_edges) - int(round(hide_fraction * len(train_edges)))])
  return graphs.Graph(edges=train_edges[keep], n_nodes=graph.n_nodes,
                      features=graph.features)


class Task:
  """Device constants of one observed graph and its evaluation pairs."""

  def __init__(self, observed: graphs.Graph, split: graphs.EdgeSplit):
    self.n_nodes = observed.n_nodes
    self.in_features = observed.features.shape[1]
    self.graph = jax.tree.map(jnp.asarray, graphs.to_graphs_tuple(observed))
    self.lists = ncn.neighbor_lists(observed.senders, observed.receivers, observed.n_nodes)
    self.train_edges = jnp.asarray(observed.edges)
    self.n_val, self.n_test = len(split.val), len(split.test)
    self.val_pairs = jnp.asarray(np.concatenate([split.val, split.val_negatives]))
    self.test_pairs = jnp.asarray(np.concatenate([split.test, split.test_negatives]))

  def hits(self, scores_val, scores_test, k: int) -> dict[str, jax.Array]:
    v, t = self.n_val, self.n_test
    return {f"val_hits@{k}": metrics.hits_at_k(scores_val[:v], scores_val[v:], k),
            f"test_hits@{k}": metrics.hits_at_k(scores_test[:t], scores_test[t:], k)}


# ---------------------------------------------------------------------------------- models


def completion_from(config) -> ncn.Completion:
  c = config.completion
  return ncn.Completion(depth=c.depth, scale=c.scale, offset=c.offset, pt=c.pt,
                        alpha=c.alpha, train_resdeg=c.train_resdeg,
                        test_resdeg=c.test_resdeg)


def create_model(config, method: str, in_features: int, seed: int) -> ncn.LinkModel:
  m, d = config.model, config.dropout
  return ncn.LinkModel(
      in_features, m.hidden, predictor=method,
      encoder_kwargs=dict(num_layers=m.mp_layers, conv=m.conv, layer_norm=m.ln, res=m.res,
                          jk=m.jk, x_dropout=d.x, gnn_dropout=d.gnn, tail_dropout=d.tail,
                          edge_dropout=d.gnn_edge),
      predictor_kwargs=dict(layer_norm=m.lnnn, use_xlin=m.use_xlin, tailact=m.tailact,
                            twolayerlin=m.twolayerlin, beta_init=m.beta_init,
                            dropout=d.predictor, edge_dropout=d.predictor_edge),
      rngs=nnx.Rngs(seed))


def create_optimizer(config) -> optax.GradientTransformation:
  """Adam with the encoder's and the predictor's learning rates (official param groups)."""
  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key, params)
  return optax.multi_transform({"encoder": optax.adam(config.gnn_lr),
                                "predictor": optax.adam(config.pred_lr)}, labels)


def make_scorer(graphdef, task: Task, completion, chunk: int):
  """Jitted `params -> (val logits, test logits)`."""
  def score(params):
    model = nnx.merge(graphdef, params)
    return tuple(ncn.score_pairs(model, task.graph, task.lists, pairs,
                                 completion=completion, chunk=chunk)
                 for pairs in (task.val_pairs, task.test_pairs))
  return jax.jit(score)


def train_method(config, workdir: str, task: Task, method: str, seed: int,
                 prefix: str) -> train_loop.FitResult:
  """Trains one method on one observed graph, evaluating Hits@K as it goes."""
  completion = completion_from(config)
  graphdef, params = nnx.split(create_model(config, method, task.in_features, seed))
  tx = create_optimizer(config)

  def loss_fn(p, batch, key):
    return ncn.link_loss(nnx.merge(graphdef, p), task.graph, task.lists, batch, key,
                         completion=completion,
                         target_link_removal=config.target_link_removal)

  step = train_loop.make_train_step(
      loss_fn, tx, batch_fn=lambda key: ncn.sample_link_batch(
          key, task.train_edges, task.n_nodes, config.batch_size))
  scorer = make_scorer(graphdef, task, completion, config.eval_chunk)
  k = config.eval_k

  def evaluate(p):
    return task.hits(*scorer(p), k)

  state = train_loop.TrainState.create(params, tx, jax.random.key(seed + 10_000))
  t = config.train
  return train_loop.fit(state, step, num_steps=t.num_steps, log_every=t.log_every,
                        workdir=workdir, checkpoint_every=t.checkpoint_every,
                        keep_checkpoints=t.keep_checkpoints, eval_fn=evaluate,
                        eval_every=t.log_every, prefix=prefix,
                        description=prefix.rstrip("/"))


def cn_heuristic(task: Task, k: int) -> dict[str, float]:
  score = jax.jit(lambda pairs: ncn.common_neighbor_counts(task.lists, pairs))
  return {name: float(v) for name, v in
          task.hits(score(task.val_pairs), score(task.test_pairs), k).items()}


# ------------------------------------------------------------------------------ experiment


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  k = config.eval_k
  results = {}  # (setting, method) -> list of per-seed test hits at best validation
  seconds, curves = {}, {}
  for seed in range(config.seed, config.seed + config.num_seeds):
    graph, split = make_data(config, seed)
    for setting_name, setting in config.settings.items():
      observed = observed_graph(graph, split.train, setting.hide_fraction, seed)
      task = Task(observed, split)
      for method in _methods(setting):
        key = (setting_name, method)
        if method == "cn":
          results.setdefault(key, []).append(cn_heuristic(task, k)[f"test_hits@{k}"])
          continue
        prefix = f"{setting_name}/{method}/seed{seed}/"
        result = train_method(config, workdir, task, method, seed, prefix)
        val = [r[f"{prefix}eval/val_hits@{k}"] for r in result.history]
        best = result.history[int(np.argmax(val))]
        results.setdefault(key, []).append(best[f"{prefix}eval/test_hits@{k}"])
        seconds[key] = seconds.get(key, 0.0) + result.seconds
        curves.setdefault(key, []).append(([r["step"] for r in result.history], val))

  summary = {}
  for (setting_name, method), values in results.items():
    summary[f"hits@{k}/{setting_name}/{method}"] = float(np.mean(values))
    summary[f"hits@{k}_std/{setting_name}/{method}"] = float(np.std(values))
    if (setting_name, method) in seconds:
      summary[f"train_seconds/{setting_name}/{method}"] = round(
          seconds[(setting_name, method)], 1)
  for setting_name in config.settings:
    get = lambda m, s=setting_name: summary.get(f"hits@{k}/{s}/{m}", float("nan"))
    summary[f"hits_gain_ncn_vs_gae/{setting_name}"] = get("ncn") - get("gae")
    summary[f"hits_ratio_ncn_to_cn/{setting_name}"] = get("ncn") / max(get("cn"), 1e-12)
    summary[f"hits_gain_ncnc_vs_ncn/{setting_name}"] = get("ncnc") - get("ncn")
  # Drop the derived numbers a setting cannot provide (its methods lack one side).
  summary = {key: v for key, v in summary.items() if not np.isnan(v)}
  if jax.process_index() == 0:
    _plot(config, workdir, results, curves)
  return summary


def _plot(config, workdir, results, curves) -> None:
  k = config.eval_k
  for setting_name, setting in config.settings.items():
    series = {}
    for method in _methods(setting):
      key = (setting_name, method)
      if key in curves:
        steps = curves[key][0][0]
        series[f"{method} (val)"] = (steps, np.mean([c[1] for c in curves[key]], axis=0))
      elif key in results:
        # The heuristic has no curve: draw its test Hits@K as a flat reference line.
        steps = next(iter(curves.values()))[0][0] if curves else [0, 1]
        series[f"{method} (test)"] = ([steps[0], steps[-1]], [np.mean(results[key])] * 2)
    plotting.line_plot(f"{workdir}/hits_{setting_name}.png", series,
                       title=f"Hits@{k}, {setting_name} graph (mean over seeds)",
                       xlabel="step", ylabel=f"Hits@{k}")


# ------------------------------------------------------------------------------- benchmark


def _scoring_setup(config, n_nodes: int, n_pairs: int, seed: int = 0):
  """Scoring functions of GAE, NCN and NCNC on an RGG of `n_nodes` with the demo degree."""
  d = config.data
  # Keep the average degree of the demo (~9.5): radius ~ 1 / sqrt(N).
  radius = d.radius * np.sqrt(d.n_nodes / n_nodes)
  graph = graphs.random_geometric_graph(seed, n_nodes, radius, n_features=d.n_features)
  task_graph = graphs.Graph(edges=graph.edges, n_nodes=n_nodes, features=graph.features)
  rng = np.random.default_rng(seed)
  pairs = jnp.asarray(rng.integers(0, n_nodes, (n_pairs, 2)), jnp.int32)
  gt = jax.tree.map(jnp.asarray, graphs.to_graphs_tuple(task_graph))
  lists = ncn.neighbor_lists(task_graph.senders, task_graph.receivers, n_nodes)
  completion = completion_from(config)
  fns = {}
  for method in TRAINED:
    graphdef, params = nnx.split(create_model(config, method, graph.features.shape[1], 0))
    score = jax.jit(lambda p, g=graphdef: ncn.score_pairs(
        nnx.merge(g, p), gt, lists, pairs, completion=completion, chunk=config.eval_chunk))
    fns[method] = (score, params)
  return fns, int(lists.neighbors.shape[1])


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Scoring cost per target link of NCN and NCNC against GAE (encoder included).

  The paper's efficiency claim: NCN scores links at close to GAE's cost, and far below
  subgraph GNNs; NCNC pays for the candidate predictions.
  """
  config = experiment.config_module(PAPER).get_config("demo")
  rows = []
  n_pairs = 4096 if quick else 20_480
  for n_nodes in (1000,) if quick else (1000, 10_000, 100_000):
    fns, width = _scoring_setup(config, n_nodes, n_pairs)
    t = benchmarking.interleaved({m: (lambda f=f, p=p: f(p)) for m, (f, p) in fns.items()},
                                 rounds=3 if quick else 5)
    for method in ("ncn", "ncnc"):
      rows.append(benchmarking.time_row(
          PAPER, f"score {n_pairs} target links, RGG {n_nodes} nodes (degree ~9.5, "
          f"max {width}), hidden {config.model.hidden}",
          (method.upper(), t[method]), ("GAE", t["gae"]),
          note="ratio = GAE time / ours (< 1: ours costs more per link); includes the "
               "encoder pass; NCNC uses all completion candidates (test_resdeg >= max "
               "degree)"))
  return rows
