"""Experiment driver for `ultragcn` (library: `jaxrepro.algorithms.graph.ultragcn`).

Three methods share the data, the optimizer and the budget, and differ only in the loss:

* `ultragcn`: L_O + lambda L_C + gamma L_I (the config's w1..w4, ii_weight, l2_weight);
* `ultragcn_no_ii`: the same without the item-item loss (gamma = 0);
* `mf_bce`: matrix factorisation with BCE and negative sampling (w1 = w3 = 1,
  w2 = w4 = 0, gamma = 0), the baseline the card's claim is stated against.

Each runs for every seed on every configured dataset; the best Recall@20 over the run
(evaluated every `log_every` steps on held-out interactions, training items excluded) is
averaged over seeds. The benchmark compares UltraGCN's training step and time-to-target
with LightGCN, the message-passing model it simplifies.
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxrepro.algorithms.graph import ranking, ultragcn
from jaxrepro.configs import common
from jaxrepro.launch import benchmarking, experiment, plotting, train_loop
from jaxrepro.launch.data import graphs
from jaxrepro.models.graph import lightgcn

PAPER = "ultragcn"
METHODS = ("ultragcn", "ultragcn_no_ii", "mf_bce")

CLAIMS = (
    experiment.Claim(
        "beats_mf_on_card_data",
        "On the spec card's bipartite SBM (2000 x 1500, 25 communities, ~12 interactions "
        "per user), UltraGCN's best Recall@20 is at least MF-BCE's + 0.01 (mean of 3 "
        "seeds)", "recall_gain_vs_mf/card", 0.01,
        note="The spec card's own restatement. It does not reproduce here: on this "
        "generator a ranker that knows the true communities and popularities reaches "
        "Recall@20 0.537 and MF-BCE with a tuned L2 already 0.50, and every UltraGCN "
        "setting tried (about 150: Gowalla weights, L_I weight 0.01-10, L2 0-1, on seeds "
        "0-2) lands within +-0.007 of MF-BCE. The card's calibration (MF-BCE 0.433 vs "
        "UltraGCN 0.461) is consistent with an MF-BCE that overfits at L2 1e-4; with the "
        "same L2 here MF-BCE still reaches 0.508. The data is too dense and too easy to "
        "separate the methods; the next claim tests the sparse regime of the paper's "
        "datasets."),
    experiment.Claim(
        "beats_mf_on_sparse_data",
        "On a sparser SBM (50 communities, ~8 interactions per user), UltraGCN's best "
        "Recall@20 is at least MF-BCE's + 0.01 (mean of 3 held-out seeds)",
        "recall_gain_vs_mf/sparse", 0.01,
        note="This dataset and the shared loss weights (w1..w4 = 1, L_I weight 3, L2 0.1 "
        "for every method) were chosen on seeds 0-2 after the card's data showed no "
        "separation; the demo measures seeds 3-5, which played no part in the choice. "
        "The paper's datasets are sparser still (Gowalla: 0.084% density, here 0.53%)."),
    experiment.Claim(
        "item_item_loss_helps",
        "On the sparser SBM, UltraGCN's best Recall@20 is at least that of UltraGCN "
        "without the item-item loss L_I", "recall_gain_vs_no_ii/sparse", 0.0),
)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "num_seeds", "batch_size", "learning_rate", "eval_k",
                        "model.dim", "loss.num_negatives", "loss.ii_neighbors")
  if config.eval_k > config.data.n_items:
    raise common.ConfigError(f"config.eval_k={config.eval_k} exceeds data.n_items="
                             f"{config.data.n_items}")


def loss_hparams(method: str, loss: ml_collections.ConfigDict) -> ultragcn.LossHParams:
  if method == "mf_bce":
    return ultragcn.mf_bce_hparams(loss.negative_weight, loss.l2_weight)
  ii_weight = loss.ii_weight if method == "ultragcn" else 0.0
  return ultragcn.LossHParams(loss.w1, loss.w2, loss.w3, loss.w4, loss.negative_weight,
                              ii_weight, loss.l2_weight)


def make_dataset(config, name: str, seed: int) -> graphs.BipartiteInteractions:
  return graphs.bipartite_sbm(seed, **config.data.to_dict(), **config.datasets[name].to_dict())


def train_method(config, workdir: str, data: graphs.BipartiteInteractions, method: str,
                 seed: int, prefix: str) -> train_loop.FitResult:
  """Trains one method on one dataset and seed, evaluating Recall/NDCG@K as it goes."""
  loss_cfg = config.loss
  hparams = loss_hparams(method, loss_cfg)
  constants = ultragcn.make_constants(
      data.train_pairs, data.n_users, data.n_items,
      loss_cfg.ii_neighbors if hparams.ii_weight > 0 else 0)
  pairs = jnp.asarray(data.train_pairs)
  tx = optax.adam(config.learning_rate)
  step = train_loop.make_train_step(
      lambda params, batch, key: ultragcn.loss_fn(params, batch, constants, hparams), tx,
      batch_fn=lambda key: ultragcn.sample_batch(key, pairs, data.n_items, config.batch_size,
                                                 loss_cfg.num_negatives))
  train_items = jnp.asarray(ranking.pad_item_lists(data.train_pairs, data.n_users))
  test_items = jnp.asarray(ranking.pad_item_lists(data.test_pairs, data.n_users))
  k = config.eval_k

  def evaluate(params):
    m = ranking.evaluate_in_batches(ultragcn.score_users, params, train_items, test_items, k=k)
    return {f"recall@{k}": m["recall"], f"ndcg@{k}": m["ndcg"]}

  params = ultragcn.init_params(jax.random.key(seed), data.n_users, data.n_items,
                                config.model.dim, config.model.init_std)
  state = train_loop.TrainState.create(params, tx, jax.random.key(seed + 10_000))
  t = config.train
  return train_loop.fit(state, step, num_steps=t.num_steps, log_every=t.log_every,
                        workdir=workdir, checkpoint_every=t.checkpoint_every,
                        keep_checkpoints=t.keep_checkpoints, eval_fn=evaluate,
                        eval_every=t.log_every, prefix=prefix,
                        description=prefix.rstrip("/"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  k = config.eval_k
  summary, curves = {}, {}
  for dataset in config.datasets:
    best = {m: [] for m in METHODS}
    seconds = {m: 0.0 for m in METHODS}
    for seed in range(config.seed, config.seed + config.num_seeds):
      data = make_dataset(config, dataset, seed)
      for method in METHODS:
        prefix = f"{dataset}/{method}/seed{seed}/"
        result = train_method(config, workdir, data, method, seed, prefix)
        recall = [r[f"{prefix}eval/recall@{k}"] for r in result.history]
        at_best = result.history[int(np.argmax(recall))]
        best[method].append((max(recall), at_best[f"{prefix}eval/ndcg@{k}"]))
        seconds[method] += result.seconds
        curves.setdefault((dataset, method), []).append(
            ([r["step"] for r in result.history], recall))
    for method in METHODS:
      recalls, ndcgs = np.array(best[method]).T
      summary[f"recall@{k}/{dataset}/{method}"] = float(recalls.mean())
      summary[f"recall@{k}_std/{dataset}/{method}"] = float(recalls.std())
      summary[f"ndcg@{k}/{dataset}/{method}"] = float(ndcgs.mean())
      summary[f"train_seconds/{dataset}/{method}"] = round(seconds[method], 1)
    ours = summary[f"recall@{k}/{dataset}/ultragcn"]
    summary[f"recall_gain_vs_mf/{dataset}"] = ours - summary[f"recall@{k}/{dataset}/mf_bce"]
    summary[f"recall_gain_vs_no_ii/{dataset}"] = (
        ours - summary[f"recall@{k}/{dataset}/ultragcn_no_ii"])
  if jax.process_index() == 0:
    for dataset in config.datasets:
      series = {}
      for method in METHODS:
        steps = curves[(dataset, method)][0][0]
        series[method] = (steps, np.mean([c[1] for c in curves[(dataset, method)]], axis=0))
      plotting.line_plot(f"{workdir}/recall_{dataset}.png", series,
                         title=f"Recall@{k} on the {dataset} data (mean over seeds)",
                         xlabel="step", ylabel=f"Recall@{k}")
  return summary


# --------------------------------------------------------------------------------- benchmark


def _ultragcn_step(config, hparams, n_items, tx):
  """One jitted UltraGCN step with the data as arguments (no constants baked in)."""
  def step(state, pairs, constants):
    return train_loop.make_train_step(
        lambda p, b, k: ultragcn.loss_fn(p, b, constants, hparams), tx,
        batch_fn=lambda key: ultragcn.sample_batch(key, pairs, n_items, config.batch_size,
                                                   config.loss.num_negatives))(state)
  return jax.jit(step)


def _lightgcn_step(config, graphdef, n_items, tx, l2_weight=1e-4):
  """One jitted LightGCN (BPR, one negative) step with the graph as an argument."""
  def step(state, pairs, graph):
    loss = lambda p, b, k: lightgcn.bpr_loss(nnx.merge(graphdef, p), graph, b, l2_weight)
    return train_loop.make_train_step(
        loss, tx, batch_fn=lambda key: ultragcn.sample_batch(
            key, pairs, n_items, config.batch_size, 1))(state)
  return jax.jit(step)


def comparison_setup(config, data, num_layers: int = 3) -> dict:
  """Both models' initial states and jitted steps on `data`, for side-by-side timing."""
  tx = optax.adam(config.learning_rate)
  hparams = loss_hparams("ultragcn", config.loss)
  constants = ultragcn.make_constants(data.train_pairs, data.n_users, data.n_items,
                                      config.loss.ii_neighbors)
  ug_params = ultragcn.init_params(jax.random.key(0), data.n_users, data.n_items,
                                   config.model.dim, config.model.init_std)
  graphdef, lg_params = nnx.split(lightgcn.LightGCN(
      data.n_users, data.n_items, config.model.dim, num_layers, rngs=nnx.Rngs(0)))
  graph = lightgcn.build_bipartite_graph(data.train_pairs, data.n_users, data.n_items)
  return dict(
      pairs=jnp.asarray(data.train_pairs), constants=constants, graph=graph,
      ug_state=train_loop.TrainState.create(ug_params, tx, jax.random.key(1)),
      lg_state=train_loop.TrainState.create(lg_params, tx, jax.random.key(1)),
      ug_step=_ultragcn_step(config, hparams, data.n_items, tx),
      lg_step=_lightgcn_step(config, graphdef, data.n_items, tx),
      lg_graphdef=graphdef)


def _time_to_target(config, data, setup, target: float, max_steps: int, chunk: int = 100):
  """Seconds of training (compile excluded) until Recall@K >= target, for both models."""
  k = config.eval_k
  train_items = jnp.asarray(ranking.pad_item_lists(data.train_pairs, data.n_users))
  test_items = jnp.asarray(ranking.pad_item_lists(data.test_pairs, data.n_users))
  graph, graphdef = setup["graph"], setup["lg_graphdef"]

  def lightgcn_scores(params, users):
    final = nnx.merge(graphdef, params)(graph)
    return final["user"][users] @ final["item"].T

  runs = {"ultragcn": (setup["ug_step"], setup["ug_state"], setup["constants"],
                       ultragcn.score_users),
          "lightgcn": (setup["lg_step"], setup["lg_state"], graph, lightgcn_scores)}
  out = {}
  for name, (step, state, extra, score_fn) in runs.items():
    chunk_fn = jax.jit(lambda s, extra=extra, step=step: jax.lax.scan(
        lambda c, _: step(c, setup["pairs"], extra), s, None, length=chunk))
    compiled = chunk_fn.lower(state).compile()
    evaluate = jax.jit(lambda p, score_fn=score_fn: ranking.evaluate_in_batches(
        score_fn, p, train_items, test_items, k=k)["recall"])
    jax.block_until_ready(evaluate(state.params))  # compile the evaluation too
    elapsed, steps, recall = 0.0, 0, 0.0
    while steps < max_steps and recall < target:
      start = time.perf_counter()
      state, _ = compiled(state)
      jax.block_until_ready(state)
      elapsed += time.perf_counter() - start
      steps += chunk
      recall = float(evaluate(state.params))
    out[name] = (elapsed if recall >= target else float("nan"), steps, recall)
  return out


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Training-step time of UltraGCN vs LightGCN as the graph grows, and time to a target
  Recall@20 on the demo's sparse data (the paper: more than 10x faster than LightGCN)."""
  config = experiment.config_module(PAPER).get_config("demo")
  rows = []
  for n_users in (2000,) if quick else (2000, 20_000, 100_000):
    n_items = n_users * 3 // 4
    data = graphs.bipartite_sbm(0, n_users=n_users, n_items=n_items,
                                n_communities=max(50, n_users // 40),
                                interactions_per_user=8)
    s = comparison_setup(config, data)
    t = benchmarking.interleaved(
        {"ultragcn": lambda s=s: s["ug_step"](s["ug_state"], s["pairs"], s["constants"]),
         "lightgcn": lambda s=s: s["lg_step"](s["lg_state"], s["pairs"], s["graph"])},
        rounds=3 if quick else 5)
    rows.append(benchmarking.time_row(
        PAPER, f"training step, {n_users} users x {n_items} items, "
               f"{len(data.train_pairs)} interactions",
        ("UltraGCN (B=1024, 50 negatives, K=10)", t["ultragcn"]),
        ("LightGCN (jraph, 3 layers, BPR)", t["lightgcn"]),
        note="ratio = LightGCN step time / UltraGCN step time"))
  data = make_dataset(config, "sparse", config.seed)
  target = 0.6
  reached = _time_to_target(config, data, comparison_setup(config, data), target,
                            max_steps=500 if quick else 2000)
  (ug_s, ug_steps, ug_r), (lg_s, lg_steps, lg_r) = reached["ultragcn"], reached["lightgcn"]
  rows.append(benchmarking.Row(
      PAPER, f"training time to Recall@20 >= {target} (demo sparse data, compile excluded)",
      "UltraGCN", "LightGCN (jraph)", ug_s, lg_s, "s", lg_s / ug_s,
      note=f"UltraGCN {ug_steps} steps (reached {ug_r:.3f}), LightGCN {lg_steps} steps "
           f"(reached {lg_r:.3f}); NaN = target not reached. UltraGCN starts from the "
           "official N(0, 1e-4) tables and needs ~1000 steps to leave them; LightGCN starts "
           "from N(0, 0.1), and at this size its step is no slower"))
  return rows
