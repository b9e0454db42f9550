"""Experiment driver for `stable` (library: `jaxrepro.algorithms.graph.stable`).

For every seed and every configured setting (the clean graph and the attacked one):

1. generate the card's SBM, its train/val/test split and, for an attacked setting, the
   perturbed graph (`algorithms.graph.attacks`);
2. `gcn`: the baseline, a 2-layer GCN on the raw features and the perturbed graph;
3. `stable`: Jaccard pre-processing and the two recovered views, contrastive pre-training
   of the encoder (Adam, early stopping on the loss, as `robcon.py`), cosine pruning and
   top-k reliable neighbours from the embeddings, then the advanced GCN on the embeddings.

Both classifiers are the same `AdvancedGCN` (the baseline with `alpha = -1/2`, i.e. the
standard GCN normalisation) trained identically, as `main.py` trains: Adam with coupled L2
weight decay, 200 epochs, `num_runs` independent initialisations trained side by side, and
each run keeps the weights of the last epoch that improved its validation accuracy or its
validation loss. Every training run goes through `launch.train_loop.fit`, so it logs,
checkpoints and resumes; the early-stopping and model-selection state rides in the
checkpointed parameters.

The summary reports mean test accuracy per setting and method, STABLE's gain over GCN, the
share of clean and of injected edges that the cosine step keeps, and the edge homophily of
the graph before and after refinement. The benchmark compares STABLE's whole pipeline with
training the GCN alone, and the refinement step's cost as the graph grows.
"""

import time

import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxrepro.algorithms.graph import attacks, metrics, stable
from jaxrepro.configs import common
from jaxrepro.launch import benchmarking, experiment, plotting, train_loop
from jaxrepro.launch.data import graphs
from jaxrepro.models.graph import padding

PAPER = "stable"
METHODS = ("gcn", "stable")
# Per-seed numbers averaged into the summary as `<name>/<setting>`.
DIAGNOSTICS = ("kept_fraction/clean", "kept_fraction/injected", "jaccard_kept_fraction",
               "homophily/perturbed", "homophily/refined", "refined_edges", "dgi_best_epoch")

CLAIMS = (
    experiment.Claim(
        "beats_gcn_under_attack",
        "On the card's SBM with random heterophilous edges injected at 100% of its edges, "
        "STABLE's test accuracy is at least GCN's + 5 points (mean of 3 seeds)",
        "accuracy_gain_vs_gcn/attacked", 0.05,
        note="The card's restatement of the paper's Metattack results (Cora 20%: about +20 "
        "points over GCN) at CPU scale; the attack is the card's calibrated random "
        "heterophilous injection, not Metattack. Does NOT reproduce here: measured STABLE "
        "0.552 vs GCN 0.570 (seeds 0-2; per seed 0.605/0.547/0.505 vs 0.566/0.570/0.574), "
        "not the card's 0.67-0.69. Diagnosis: with the README's jt = 0.03 the Jaccard step "
        "keeps only 20% of the attacked graph's edges (same-class pairs of the card's "
        "300-word features have an expected Jaccard of about 0.02, below Cora's threshold), "
        "so the contrastive embeddings carry little structure; the cosine step then "
        "removes 66% of injected but also 55% of clean edges (edge homophily 0.41 -> 0.50). "
        "Diagnostics on unused seeds 100-101 (not used to change anything): the demo's "
        "setup gave 0.570/0.540 vs GCN 0.557/0.606 (on seed 100 the contrastive loss never "
        "improved on its initial value, so the official early stopping kept the random "
        "encoder); jt = 0 was worse (0.511/0.527), as every embedding cosine exceeds "
        "cos = 0.1 and nothing is pruned. The card's calibration run does not state its jt "
        "or embedding details; setup and threshold "
        "were kept as fixed before measuring."),
    experiment.Claim(
        "matches_gcn_when_clean",
        "On the clean SBM, STABLE's test accuracy is within 2 points of GCN's, i.e. at "
        "least GCN's - 2 points (mean of 3 seeds)", "accuracy_gain_vs_gcn/clean", -0.02,
        note="With the README's 0% settings (alpha -0.5, k 1, jt 0, cos 0.1)."),
    experiment.Claim(
        "prunes_injected_edges_more",
        "On the attacked SBM, the cosine step keeps a smaller share of the injected edges "
        "than of the clean edges (kept share of injected minus kept share of clean <= 0)",
        "kept_fraction_gap/attacked", 0.0, direction="<="),
)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "num_seeds", "dgi.hidden", "dgi.lr", "dgi.patience",
                        "gcn.hidden", "gcn.lr", "gcn.num_runs", "data.n_nodes")
  split = config.split
  if split.n_train + split.n_val + split.n_test > config.data.n_nodes:
    raise common.ConfigError(
        f"config.split asks for {split.n_train} + {split.n_val} + {split.n_test} nodes but "
        f"data.n_nodes={config.data.n_nodes}")
  if not 0.0 <= config.dgi.recover_percent <= 1.0:
    raise common.ConfigError(
        f"config.dgi.recover_percent={config.dgi.recover_percent} must be in [0, 1]")
  if not 0.0 <= config.gcn.dropout < 1.0:
    raise common.ConfigError(f"config.gcn.dropout={config.gcn.dropout} must be in [0, 1)")
  if not config.settings:
    raise common.ConfigError("config.settings is empty; name at least one graph setting")
  for name, s in config.settings.items():
    if not 0 <= s.k <= config.data.n_nodes:
      raise common.ConfigError(
          f"config.settings.{name}.k={s.k} must be in [0, data.n_nodes={config.data.n_nodes}]")
    if s.rate < 0:
      raise common.ConfigError(f"config.settings.{name}.rate={s.rate} must be >= 0")
  if config.attack.flips_per_step < 1:
    raise common.ConfigError(
        f"config.attack.flips_per_step={config.attack.flips_per_step} must be >= 1")


# -------------------------------------------------------------------------------------- data


def make_data(config, setting: str, seed: int) -> dict:
  """The clean graph, its split and the perturbed graph of one setting, on the host."""
  g = graphs.sbm(seed, **config.data.to_dict())
  split = graphs.node_split(seed + 1, g.labels, **config.split.to_dict())
  rate = config.settings[setting].rate
  budget = attacks.budget_from_rate(len(g.edges), rate)
  kind = config.attack.type
  if budget == 0:
    perturbed, injected = g.edges, np.zeros((0, 2), np.int32)
  else:
    if kind == "heterophilous":
      p = attacks.heterophilous_edge_injection(seed + 2, g.edges, g.labels, budget)
    elif kind == "random":
      p = attacks.random_edge_injection(seed + 2, g.edges, g.n_nodes, budget)
    else:
      p = attacks.metattack(seed + 2, g.edges, g.features, g.labels, split.train, budget,
                            flips_per_step=config.attack.flips_per_step)
    perturbed, injected = p.edges, p.added
  return dict(graph=g, split=split, perturbed=perturbed, injected=injected)


def padded_pairs(edges: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """Undirected edges padded to a power of two (one compilation per size bucket)."""
  m = len(edges)
  size = padding.next_power_of_two(max(m, 1))
  pairs = np.zeros((size, 2), np.int32)
  pairs[:m] = edges
  return jnp.asarray(pairs), jnp.asarray(np.arange(size) < m)


def connectivity(pairs: jax.Array, mask: jax.Array, n_nodes: int):
  """A connectivity-only `GraphsTuple` of both directions of `pairs`, and its `[2M]` mask."""
  senders, receivers, directed_mask = stable.directed(pairs, mask)
  graph = jraph.GraphsTuple(nodes=None, edges=None, globals=None, senders=senders,
                            receivers=receivers, n_node=jnp.array([n_nodes], jnp.int32),
                            n_edge=jnp.array([senders.shape[0]], jnp.int32))
  return graph, directed_mask


# ---------------------------------------------------------------------------------- training


def _tree_where(cond, new, old):
  """Per-leaf `where(cond, new, old)`, `cond` broadcast over the leading axes."""
  def pick(a, b):
    c = jnp.reshape(cond, jnp.shape(cond) + (1,) * (a.ndim - jnp.ndim(cond)))
    return jnp.where(c, a, b)
  return jax.tree.map(pick, new, old)


def make_dgi_step(graphdef, tx, features, graph, pre_mask, view_masks, *, beta: float,
                  patience: int):
  """The contrastive training step with the official early stopping carried in the state.

  `state.params` is `{"model", "best", "best_loss", "wait", "stopped"}`: as in `robcon.py`,
  an epoch whose loss beats the best so far saves the (pre-update) weights; after
  `patience` epochs without improvement training stops, here by freezing the weights.
  """
  n = features.shape[0]

  def loss_fn(model_params, perm):
    return stable.dgi_loss(nnx.merge(graphdef, model_params), features, graph, pre_mask,
                           view_masks, perm, beta=beta)

  def step(state, batch=None):
    del batch
    p = state.params
    perm = jax.random.permutation(jax.random.fold_in(state.key, state.step), n)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p["model"], perm)
    updates, opt_state = tx.update(grads, state.opt_state, p["model"])
    improved = (loss < p["best_loss"]) & ~p["stopped"]
    wait = jnp.where(improved, 0, p["wait"] + jnp.where(p["stopped"], 0, 1))
    stopped = p["stopped"] | (wait >= patience)
    params = dict(
        model=_tree_where(stopped, p["model"], optax.apply_updates(p["model"], updates)),
        best=_tree_where(improved, p["model"], p["best"]),
        best_loss=jnp.where(improved, loss, p["best_loss"]),
        best_step=jnp.where(improved, state.step, p["best_step"]),
        wait=wait, stopped=stopped)
    opt_state = _tree_where(stopped, state.opt_state, opt_state)
    metrics_ = {"loss": loss, "best_loss": params["best_loss"],
                "stopped": stopped.astype(jnp.float32), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics_

  return step


def train_encoder(config, workdir, prefix, features, graph, pre_mask, view_masks, seed):
  """Contrastive pre-training; returns the best encoder's embeddings and its epoch."""
  cfg = config.dgi
  graphdef, model_params = nnx.split(stable.DGI(features.shape[1], cfg.hidden,
                                                rngs=nnx.Rngs(seed)))
  tx = optax.adam(cfg.lr)
  # `best` is a copy: the train loop donates the state, and one buffer cannot be donated
  # twice.
  params = dict(model=model_params, best=jax.tree.map(jnp.copy, model_params),
                best_loss=jnp.float32(1e9), best_step=jnp.int32(0), wait=jnp.int32(0),
                stopped=jnp.bool_(False))
  state = train_loop.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(model_params),
                                key=jax.random.key(seed + 10_000))
  step = make_dgi_step(graphdef, tx, features, graph, pre_mask, view_masks,
                       beta=cfg.beta, patience=cfg.patience)
  t = cfg.train
  result = train_loop.fit(state, step, num_steps=t.num_steps, log_every=t.log_every,
                          workdir=workdir, checkpoint_every=t.checkpoint_every,
                          keep_checkpoints=t.keep_checkpoints, prefix=prefix,
                          description=prefix.rstrip("/"))
  best = result.state.params
  embeddings = jax.jit(lambda p: stable.embed(nnx.merge(graphdef, p), features, graph,
                                              pre_mask, beta=cfg.beta))(best["best"])
  return embeddings, int(best["best_step"]), result


def make_classifier_step(graphdef, tx, inputs, graph, labels, split):
  """`num_runs` stacked classifiers trained side by side with `main.py`'s selection.

  `state.params` is `{"model", "best", "best_acc", "best_loss"}` with a leading run axis.
  After each update the validation accuracy (evaluation mode) and the validation loss
  (of the update's training-mode logits, as `main.py` computes it) are compared with the
  best so far; if either improved, the updated weights become the selected ones.
  """
  train_mask, val_mask = jnp.asarray(split.train), jnp.asarray(split.val)

  def run_loss(params, key):
    logits = nnx.merge(graphdef, params)(inputs, graph, key=key)
    loss = metrics.masked_cross_entropy(logits, labels, train_mask)
    return loss, metrics.masked_cross_entropy(logits, labels, val_mask)

  def run_val_acc(params):
    logits = nnx.merge(graphdef, params)(inputs, graph)
    return metrics.masked_accuracy(logits, labels, val_mask)

  grad_fn = jax.vmap(jax.value_and_grad(run_loss, has_aux=True))

  def step(state, batch=None):
    del batch
    p = state.params
    n_runs = p["best_acc"].shape[0]
    keys = jax.random.split(jax.random.fold_in(state.key, state.step), n_runs)
    (loss, val_loss), grads = grad_fn(p["model"], keys)
    # Runs are independent and Adam is elementwise, so one optimizer over the stacked
    # parameters equals one optimizer per run.
    updates, opt_state = tx.update(grads, state.opt_state, p["model"])
    model = optax.apply_updates(p["model"], updates)
    val_acc = jax.vmap(run_val_acc)(model)
    improved = (val_loss < p["best_loss"]) | (val_acc > p["best_acc"])
    params = dict(model=model, best=_tree_where(improved, model, p["best"]),
                  best_acc=jnp.maximum(val_acc, p["best_acc"]),
                  best_loss=jnp.minimum(val_loss, p["best_loss"]))
    metrics_ = {"loss": jnp.mean(loss), "val_loss": jnp.mean(val_loss),
                "val_accuracy": jnp.mean(val_acc)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics_

  return step


def train_classifier(config, workdir, prefix, inputs, graph, labels, split, n_classes, seed):
  """Trains `gcn.num_runs` classifiers; returns their selected weights' test accuracies."""
  cfg = config.gcn
  models = [nnx.split(stable.AdvancedGCN(inputs.shape[1], cfg.hidden, n_classes,
                                         dropout_rate=cfg.dropout,
                                         rngs=nnx.Rngs(seed * 1000 + r)))
            for r in range(cfg.num_runs)]
  graphdef = models[0][0]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[m[1] for m in models])
  # torch's Adam(weight_decay=wd) adds wd * w to the gradient (coupled L2), on every
  # parameter, before the moment estimates.
  tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.lr))
  n_runs = cfg.num_runs
  params = dict(model=stacked, best=jax.tree.map(jnp.copy, stacked), best_acc=jnp.zeros((n_runs,)),
                best_loss=jnp.full((n_runs,), 9999.0))
  state = train_loop.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(stacked), key=jax.random.key(seed + 20_000))
  step = make_classifier_step(graphdef, tx, inputs, graph, labels, split)
  test_mask = jnp.asarray(split.test)

  @jax.jit
  def test_accuracy(best):
    def one(p):
      logits = nnx.merge(graphdef, p)(inputs, graph)
      return metrics.masked_accuracy(logits, labels, test_mask)
    return jax.vmap(one)(best)

  t = cfg.train
  result = train_loop.fit(
      state, step, num_steps=t.num_steps, log_every=t.log_every, workdir=workdir,
      checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
      eval_fn=lambda p: {"test_accuracy": jnp.mean(test_accuracy(p["best"]))},
      eval_every=t.checkpoint_every, prefix=prefix, description=prefix.rstrip("/"))
  return np.asarray(test_accuracy(result.state.params["best"])), result


# ---------------------------------------------------------------------------------- pipeline


def stable_inputs(config, setting: str, data: dict, seed: int, workdir: str, prefix: str):
  """STABLE's stages 1-3 on one perturbed graph; returns everything the summary needs."""
  s = config.settings[setting]
  g = data["graph"]
  n = g.n_nodes
  features = jnp.asarray(g.features)
  pairs, mask = padded_pairs(data["perturbed"])
  graph, directed_mask = connectivity(pairs, mask, n)

  @jax.jit
  def views(key):
    kept = stable.jaccard_keep(features, pairs, mask, s.jt)
    k1, k2 = jax.random.split(key)
    v = [stable.recover_edges(k, kept, mask, config.dgi.recover_percent) for k in (k1, k2)]
    both = lambda m: jnp.concatenate([m, m])  # undirected mask -> both directions
    return kept, both(kept), jnp.stack([both(v[0]), both(v[1])])

  kept_pre, pre_mask, view_masks = views(jax.random.key(seed + 30_000))
  embeddings, best_epoch, dgi_result = train_encoder(
      config, workdir, f"{prefix}dgi/", features, graph, pre_mask, view_masks, seed)

  @jax.jit
  def refine(z):
    kept = stable.cosine_keep(z, pairs, mask, s.cos)
    deg = stable.degrees(pairs, kept, n)
    nbrs, valid = stable.reliable_neighbors(z, deg, s.k, config.degree_threshold)
    senders, receivers, emask = stable.refined_graph(pairs, kept, nbrs, valid)
    return kept, stable.normalize_adjacency(senders, receivers, emask, n, s.alpha), emask

  kept_cos, refined, refined_mask = refine(embeddings)
  return dict(embeddings=embeddings, graph=refined, kept_cos=np.asarray(kept_cos),
              kept_pre=np.asarray(kept_pre), refined_mask=np.asarray(refined_mask),
              best_epoch=best_epoch, dgi_seconds=dgi_result.seconds)


def gcn_graph(data: dict) -> object:
  """The baseline's graph: the perturbed graph with the standard GCN normalisation."""
  n = data["graph"].n_nodes
  pairs, mask = padded_pairs(data["perturbed"])
  senders, receivers, directed_mask = stable.directed(pairs, mask)
  return jax.jit(stable.normalize_adjacency, static_argnums=(3, 4))(
      senders, receivers, directed_mask, n, -0.5)


def _kept_share(edges: np.ndarray, kept_codes: set) -> float:
  if len(edges) == 0:
    return float("nan")
  return float(np.mean([tuple(e) in kept_codes for e in edges.tolist()]))


def run_seed(config, workdir: str, setting: str, seed: int) -> dict:
  """Both methods on one setting and seed; returns per-seed numbers and curves."""
  data = make_data(config, setting, seed)
  g, split = data["graph"], data["split"]
  labels = jnp.asarray(g.labels)
  n_classes = int(g.labels.max()) + 1
  prefix = f"{setting}/seed{seed}/"
  out = {"curves": {}}

  acc, result = train_classifier(config, workdir, f"{prefix}gcn/", jnp.asarray(g.features),
                                 gcn_graph(data), labels, split, n_classes, seed)
  out["gcn"] = float(acc.mean())
  out["curves"]["gcn"] = [(r["step"], r[f"{prefix}gcn/train/val_accuracy"])
                          for r in result.history]
  out["seconds/gcn"] = result.seconds

  start = time.perf_counter()
  st = stable_inputs(config, setting, data, seed, workdir, prefix)
  acc, result = train_classifier(config, workdir, f"{prefix}stable/", st["embeddings"],
                                 st["graph"], labels, split, n_classes, seed)
  out["stable"] = float(acc.mean())
  out["curves"]["stable"] = [(r["step"], r[f"{prefix}stable/train/val_accuracy"])
                             for r in result.history]
  out["seconds/stable"] = time.perf_counter() - start
  out["dgi_best_epoch"] = st["best_epoch"]

  # Which perturbed edges survive the cosine step: the clean ones vs the injected ones.
  m = len(data["perturbed"])
  kept = {tuple(e) for e in data["perturbed"][st["kept_cos"][:m]].tolist()}
  injected = {tuple(e) for e in data["injected"].tolist()}
  clean = np.array([e for e in data["perturbed"].tolist() if tuple(e) not in injected],
                   np.int32).reshape(-1, 2)
  out["kept_fraction/clean"] = _kept_share(clean, kept)
  out["kept_fraction/injected"] = _kept_share(data["injected"], kept)
  out["jaccard_kept_fraction"] = float(st["kept_pre"][:m].mean()) if m else float("nan")
  out["homophily/perturbed"] = graphs.edge_homophily(data["perturbed"], g.labels)
  r = st["graph"]
  live = st["refined_mask"]
  pairs = np.stack([np.asarray(r.senders)[:live.size][live],
                    np.asarray(r.receivers)[:live.size][live]], axis=1)
  out["homophily/refined"] = graphs.edge_homophily(pairs, g.labels)
  out["refined_edges"] = int(live.sum())
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  summary, curves = {}, {}
  for setting in config.settings:
    runs = [run_seed(config, workdir, setting, seed)
            for seed in range(config.seed, config.seed + config.num_seeds)]
    for method in METHODS:
      accs = np.array([r[method] for r in runs])
      summary[f"accuracy/{setting}/{method}"] = float(accs.mean())
      summary[f"accuracy_std/{setting}/{method}"] = float(accs.std())
      summary[f"seconds/{setting}/{method}"] = round(sum(r[f"seconds/{method}"] for r in runs),
                                                     1)
      steps = [c[0] for c in runs[0]["curves"][method]]
      values = np.mean([[c[1] for c in r["curves"][method]] for r in runs], axis=0)
      curves[f"{method} ({setting})"] = (steps, values)
    summary[f"accuracy_gain_vs_gcn/{setting}"] = (summary[f"accuracy/{setting}/stable"]
                                                  - summary[f"accuracy/{setting}/gcn"])
    for key in DIAGNOSTICS:
      values = np.array([r[key] for r in runs], np.float64)
      summary[f"{key}/{setting}"] = (float("nan") if np.all(np.isnan(values))
                                     else float(np.nanmean(values)))
    summary[f"kept_fraction_gap/{setting}"] = (summary[f"kept_fraction/injected/{setting}"]
                                               - summary[f"kept_fraction/clean/{setting}"])
  if jax.process_index() == 0:
    plotting.line_plot(f"{workdir}/val_accuracy.png", curves,
                       title="Validation accuracy while training (mean over seeds and runs)",
                       xlabel="epoch", ylabel="validation accuracy")
  return summary


# --------------------------------------------------------------------------------- benchmark


def _timed_steps(config, data: dict, seed: int = 0) -> dict:
  """Zero-argument callables for one contrastive epoch, one refinement and one GCN epoch."""
  g = data["graph"]
  n = g.n_nodes
  features = jnp.asarray(g.features)
  pairs, mask = padded_pairs(data["perturbed"])
  graph, directed_mask = connectivity(pairs, mask, n)
  s = config.settings.attacked
  graphdef, model_params = nnx.split(stable.DGI(features.shape[1], config.dgi.hidden,
                                                rngs=nnx.Rngs(seed)))
  tx = optax.adam(config.dgi.lr)
  kept = stable.jaccard_keep(features, pairs, mask, s.jt)
  pre_mask = jnp.concatenate([kept, kept])
  dgi_state = train_loop.TrainState(
      step=jnp.zeros((), jnp.int32), opt_state=tx.init(model_params), key=jax.random.key(0),
      params=dict(model=model_params, best=model_params, best_loss=jnp.float32(1e9),
                  best_step=jnp.int32(0), wait=jnp.int32(0), stopped=jnp.bool_(False)))
  dgi_step = jax.jit(make_dgi_step(graphdef, tx, features, graph, pre_mask,
                                   jnp.stack([directed_mask, directed_mask]),
                                   beta=config.dgi.beta, patience=config.dgi.patience))
  embeddings = jax.random.normal(jax.random.key(1), (n, config.dgi.hidden))

  @jax.jit
  def refine(z):
    kept = stable.cosine_keep(z, pairs, mask, s.cos)
    nbrs, valid = stable.reliable_neighbors(z, stable.degrees(pairs, kept, n), s.k,
                                            config.degree_threshold)
    return stable.normalize_adjacency(*stable.refined_graph(pairs, kept, nbrs, valid), n,
                                      s.alpha).edges

  gcn_def, gcn_params = nnx.split(stable.AdvancedGCN(features.shape[1], config.gcn.hidden,
                                                     int(g.labels.max()) + 1,
                                                     rngs=nnx.Rngs(seed)))
  gcn_tx = optax.chain(optax.add_decayed_weights(config.gcn.weight_decay),
                       optax.adam(config.gcn.lr))
  stacked = jax.tree.map(lambda v: v[None], gcn_params)
  gcn_state = train_loop.TrainState(
      step=jnp.zeros((), jnp.int32), opt_state=gcn_tx.init(stacked), key=jax.random.key(2),
      params=dict(model=stacked, best=stacked, best_acc=jnp.zeros((1,)),
                  best_loss=jnp.full((1,), 9999.0)))
  gcn_step = jax.jit(make_classifier_step(gcn_def, gcn_tx, features, gcn_graph(data),
                                          jnp.asarray(g.labels), data["split"]))
  return {"dgi": lambda: dgi_step(dgi_state), "refine": lambda: refine(embeddings),
          "gcn": lambda: gcn_step(gcn_state)}


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """The cost of STABLE's stages next to a plain GCN training epoch on the same attacked
  graph. The paper makes no speed claim; this shows where STABLE's extra time goes (the
  contrastive epochs, up to `dgi.train.num_steps` of them, and one refinement)."""
  config = experiment.config_module(PAPER).get_config("demo")
  rows = []
  for n_nodes in (1000,) if quick else (1000, 4000):
    cfg = config.copy_and_resolve_references()
    # Keep the expected degree fixed as the graph grows.
    scale = 1000 / n_nodes
    cfg.data.update(n_nodes=n_nodes, p_in=cfg.data.p_in * scale, p_out=cfg.data.p_out * scale)
    cfg.split.update(n_test=n_nodes - cfg.split.n_train - cfg.split.n_val)
    data = make_data(cfg, "attacked", cfg.seed)
    fns = _timed_steps(cfg, data)
    t = benchmarking.interleaved(fns, rounds=3 if quick else 5)
    size = f"{n_nodes}-node attacked SBM, {len(data['perturbed'])} edges"
    rows.append(benchmarking.time_row(
        PAPER, f"one contrastive epoch vs one GCN epoch, {size}",
        (f"STABLE contrastive step ({cfg.dgi.hidden}-dim)", t["dgi"]),
        ("GCN training step (1 run)", t["gcn"]),
        note="ratio = GCN epoch / contrastive epoch (below 1: the contrastive epoch is "
             "dearer)"))
    rows.append(benchmarking.time_row(
        PAPER, f"structure refinement (cosine prune, top-{cfg.settings.attacked.k}, "
               f"normalise) vs one GCN epoch, {size}",
        ("STABLE refinement (once per run)", t["refine"]),
        ("GCN training step (1 run)", t["gcn"]),
        note="ratio = GCN epoch / refinement; the refinement runs once"))
  return rows
