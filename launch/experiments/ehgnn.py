"""Experiment driver for `ehgnn` (library: `jaxrepro.algorithms.graph.ehgnn`).

Generated QM9-like molecules, each bond one directed edge `i -> j` of a padded graph with
one-hot bond-type features; every batch of a run is padded to one shape (one compile).

* Reconstruction: `HyperCluster` sees only the bond-type one-hots (as in the official ZINC
  model); `NodeAutoencoder` sees atom types plus per-atom counts of single/double/triple
  bonds, pools the nodes with the same number of seeds and width, and decodes each bond from
  its endpoints. Metric: bond-type accuracy on the test molecules (and the fraction of test
  molecules with every bond right), at the step of best validation accuracy.
* Classification: label 1 iff the molecule has a double or triple bond. Node features are
  the atom types only (the official TU models do not feed edge features to the GCN), so
  bond types reach HyperDrop only through its edge branch (scores, drops, edge weights);
  the baseline is the same GCN stack and readout without the edge branch. Metric: test
  accuracy at the step of best validation accuracy.

Every model trains with `launch.train_loop.fit` (logs, checkpoints, resume); batch order is
a per-epoch permutation seeded by (seed, epoch), so a resumed run sees the same batches.
"""

import math
import time

import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxrepro.algorithms.graph import ehgnn
from jaxrepro.configs import common
from jaxrepro.launch import benchmarking, experiment, plotting, train_loop
from jaxrepro.launch.data import graphs
from jaxrepro.models.graph import padding

PAPER = "ehgnn"
NUM_BOND_TYPES = 3
RECON = ("hypercluster", "node_ae")
CLASSIFY = ("hyperdrop", "node_pool")

CLAIMS = (
    experiment.Claim(
        "hypercluster_beats_node_autoencoder",
        "Bond-type reconstruction accuracy of HyperCluster (DHT + hypergraph convs + edge "
        "GMPool) is at least the node autoencoder's + 5 points (test bonds, mean of seeds)",
        "bond_accuracy_gain", 0.05,
        note="The spec card's CPU restatement of the ZINC reconstruction result. Both "
        "models have the same number of pooling seeds (ceil(0.3 x mean #bonds) = 2) and "
        "width 32; the node autoencoder's node features include incident bond-type "
        "counts, so both inputs determine the bond types. About 89% of bonds are single, "
        "so accuracy is compressed near the top; the exact-molecule rates are in the "
        "summary. Setup change after a first measurement: with 1500 steps on seeds 0-1 "
        "the gain was 0.048 (HyperCluster 0.972, still rising; node AE 0.924), so the "
        "reconstruction budget was raised to 3000 steps (about 270 epochs; the official "
        "run trains 500) and the demo measures seeds 2-3, unused for that choice. It "
        "still fails there: bond accuracy 0.986 vs 0.947 (gain 0.039). At this scale the "
        "5-point margin leaves little room (89% of bonds are single; beating 0.947 by 5 "
        "points needs 0.997); in error rates HyperCluster makes about 4x fewer bond errors "
        "(1.4% vs 5.3%) and rebuilds 96% vs 80% of the test molecules exactly."),
    experiment.Claim(
        "hyperdrop_at_least_node_pooling",
        "Graph classification accuracy (has a double/triple bond) of HyperDrop is at least "
        "that of the same GCN stack without HyperDrop (test, mean of seeds)",
        "classification_accuracy_gain", 0.0,
        note="The paper compares HyperDrop with node-pooling methods on TU/OGB sets; here "
        "the label depends on bond types, which neither model's GCN sees (node "
        "features are atom types, as the official TU models feed no edge features to the "
        "GCN); HyperDrop reads them through its dual-hypergraph branch, whose scores drop "
        "and reweight edges. The large margin measures that access to edge features, "
        "not node-pooling quality on equal inputs."),
)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "num_seeds", "batch_size", "data.n_molecules",
                        "reconstruction.hidden", "reconstruction.num_convs",
                        "reconstruction.pool_ratio", "reconstruction.learning_rate",
                        "reconstruction.num_steps", "classification.num_steps",
                        "classification.hidden", "classification.edge_hidden",
                        "classification.num_convs", "classification.learning_rate")
  d = config.data
  if not (0 < d.val_fraction and 0 < d.test_fraction and d.val_fraction + d.test_fraction < 1):
    raise common.ConfigError(f"config.data.val_fraction={d.val_fraction} and test_fraction="
                             f"{d.test_fraction} must be > 0 with a sum < 1")
  if not 0 < config.classification.edge_ratio <= 1:
    raise common.ConfigError(f"config.classification.edge_ratio="
                             f"{config.classification.edge_ratio} must lie in (0, 1]")
  if config.classification.hidden < 2:
    raise common.ConfigError("config.classification.hidden must be >= 2 (MLP uses h // 2)")
  n_eval = round(d.n_molecules * min(d.val_fraction, d.test_fraction))
  if n_eval < 1 or d.n_molecules - 2 * n_eval < config.batch_size:
    raise common.ConfigError(f"config.data.n_molecules={d.n_molecules} is too small for "
                             f"batch_size={config.batch_size} and the val/test splits")


# ------------------------------------------------------------------------------------ data


def molecule_graph(mol: graphs.Graph, node_features: str) -> jraph.GraphsTuple:
  """One molecule as a host `GraphsTuple`: one edge per bond, one-hot bond types.

  `node_features`: `"atoms"` (5 atom-type one-hots) or `"atoms+bonds"` (plus the atom's
  number of single, double and triple bonds). `globals` holds the classification label.
  """
  bond = np.eye(NUM_BOND_TYPES, dtype=np.float32)[mol.edge_types - 1]
  x = mol.features
  if node_features == "atoms+bonds":
    counts = np.zeros((mol.n_nodes, NUM_BOND_TYPES), np.float32)
    np.add.at(counts, mol.edges[:, 0], bond)
    np.add.at(counts, mol.edges[:, 1], bond)
    x = np.concatenate([x, counts], axis=1)
  label = np.array([int((mol.edge_types >= 2).any())], np.int32)
  return jraph.GraphsTuple(nodes=x, edges=bond, globals=label,
                           senders=mol.edges[:, 0].astype(np.int32),
                           receivers=mol.edges[:, 1].astype(np.int32),
                           n_node=np.array([mol.n_nodes], np.int32),
                           n_edge=np.array([len(mol.edges)], np.int32))


def make_batches(mols, node_features: str, batch_size: int, budget=None):
  """Padded batches, all of one shape; returns `(batches, budget)`."""
  groups = [padding.batch_graphs([molecule_graph(m, node_features) for m in
                                  mols[i:i + batch_size]])
            for i in range(0, len(mols), batch_size)]
  if budget is None:
    budget = padding.bucket_sizes(max(int(g.n_node.sum()) for g in groups),
                                  max(int(g.n_edge.sum()) for g in groups), batch_size)
  return [padding.pad_graph(g, *budget) for g in groups], budget


def make_data(config, seed: int) -> dict:
  """Molecules of one seed, split, and batched for both feature sets."""
  d = config.data
  mols = graphs.random_molecules(seed, d.n_molecules, min_heavy_atoms=d.min_heavy_atoms,
                                 max_heavy_atoms=d.max_heavy_atoms, coordinates=False,
                                 ring_rate=d.ring_rate,
                                 multiple_bond_prob=d.multiple_bond_prob)
  n_val, n_test = round(d.n_molecules * d.val_fraction), round(d.n_molecules * d.test_fraction)
  n_train = d.n_molecules - n_val - n_test
  splits = {"train": mols[:n_train], "val": mols[n_train:n_train + n_val],
            "test": mols[n_train + n_val:]}
  out = {"max_nodes": max(m.n_nodes for m in mols),
         "max_edges": max(len(m.edges) for m in mols),
         "mean_edges": float(np.mean([len(m.edges) for m in splits["train"]])),
         "positive_rate": float(np.mean([(m.edge_types >= 2).any() for m in mols]))}
  for feats in ("atoms", "atoms+bonds"):
    budget = None
    for name in ("train", "val", "test"):
      out[feats, name], budget = make_batches(splits[name], feats, config.batch_size, budget)
  return out


def stack(batches):
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def host_batches_fn(batches, seed: int):
  """`(start_step, n) -> n stacked batches`: epoch `t` visits a permutation seeded (seed, t)."""
  nb = len(batches)

  def fn(start: int, n: int):
    picked = []
    for step in range(start, start + n):
      perm = np.random.default_rng([seed, step // nb]).permutation(nb)
      picked.append(batches[perm[step % nb]])
    return stack(picked)
  return fn


# ---------------------------------------------------------------------------------- models


def build_model(config, data: dict, method: str, seed: int) -> nnx.Module:
  rngs = nnx.Rngs(seed)
  r, c = config.reconstruction, config.classification
  num_seeds = math.ceil(r.pool_ratio * data["mean_edges"])
  if method == "hypercluster":
    return ehgnn.HyperCluster(NUM_BOND_TYPES, r.hidden, NUM_BOND_TYPES, num_seeds,
                              num_convs=r.num_convs, cluster=r.cluster, rngs=rngs)
  if method == "node_ae":
    return ehgnn.NodeAutoencoder(5 + NUM_BOND_TYPES, r.hidden, NUM_BOND_TYPES, num_seeds,
                                 num_convs=r.num_convs, cluster=r.cluster, rngs=rngs)
  if method in CLASSIFY:
    return ehgnn.GraphClassifier(5, NUM_BOND_TYPES, c.hidden, c.edge_hidden, 2,
                                 num_convs=c.num_convs, edge_ratio=c.edge_ratio,
                                 hyperdrop=method == "hyperdrop", dropout=c.dropout,
                                 rngs=rngs)
  raise ValueError(f"method={method!r}; choose one of {RECON + CLASSIFY}")


def make_forward(graphdef, method: str, data: dict):
  """`(params, graph, key) -> (logits, labels, mask)` over bonds or graphs."""
  def forward(params, graph, key=None):
    model = nnx.merge(graphdef, params)
    if method in RECON:
      width = data["max_edges"] if method == "hypercluster" else data["max_nodes"]
      logits = model(graph, width)
      return logits, jnp.argmax(graph.edges, axis=-1), padding.edge_mask(graph)
    logits, _ = model(graph, key=key)
    return logits, graph.globals, padding.graph_mask(graph)
  return forward


def _masked_stats(logits, labels, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels) & mask
  count = jnp.maximum(mask.sum(), 1)
  return jnp.where(mask, ce, 0.0).sum() / count, correct.sum() / count, correct


def train_method(config, workdir: str, data: dict, method: str, seed: int,
                 prefix: str) -> tuple[train_loop.FitResult, dict]:
  """Trains one model; returns the fit result and its metrics at the best validation step."""
  feats = "atoms+bonds" if method == "node_ae" else "atoms"
  task = config.reconstruction if method in RECON else config.classification
  graphdef, params = nnx.split(build_model(config, data, method, seed))
  forward = make_forward(graphdef, method, data)
  tx = optax.adam(task.learning_rate)

  def loss_fn(p, batch, key):
    loss, acc, _ = _masked_stats(*forward(p, batch, key))
    return loss, {"accuracy": acc}

  step = train_loop.make_train_step(loss_fn, tx)

  @jax.jit
  def eval_batch(p, batch):
    logits, labels, mask = forward(p, batch)
    _, _, correct = _masked_stats(logits, labels, mask)
    if method in RECON:  # a molecule is exact when all of its bonds are right
      seg = padding.edge_graph_index(batch)
      wrong = jax.ops.segment_sum((~correct & mask).astype(jnp.int32), seg,
                                  batch.n_node.shape[0])
      exact = ((wrong == 0) & padding.graph_mask(batch)).sum()
    else:
      exact = correct.sum()
    return correct.sum(), mask.sum(), exact, padding.graph_mask(batch).sum()

  def evaluate(p):
    out = {}
    for split in ("val", "test"):
      totals = np.sum([np.asarray(eval_batch(p, b)) for b in data[feats, split]], axis=0)
      out[f"{split}_accuracy"] = totals[0] / totals[1]
      if method in RECON:
        out[f"{split}_exact"] = totals[2] / totals[3]
    return out

  state = train_loop.TrainState.create(params, tx, jax.random.key(seed + 10_000))
  t = config.train
  result = train_loop.fit(state, step, num_steps=task.num_steps, log_every=t.log_every,
                          workdir=workdir, checkpoint_every=t.checkpoint_every,
                          keep_checkpoints=t.keep_checkpoints, eval_fn=evaluate,
                          eval_every=t.log_every,
                          host_batches=host_batches_fn(data[feats, "train"], seed),
                          prefix=prefix, description=prefix.rstrip("/"))
  rows = [r for r in result.history if f"{prefix}eval/val_accuracy" in r]
  best = max(rows, key=lambda r: r[f"{prefix}eval/val_accuracy"])
  return result, {k.rsplit("/", 1)[-1]: v for k, v in best.items() if "/eval/" in f"/{k}"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  start = time.perf_counter()
  results = {m: [] for m in RECON + CLASSIFY}
  curves = {m: [] for m in RECON + CLASSIFY}
  summary = {}
  for seed in range(config.seed, config.seed + config.num_seeds):
    data = make_data(config, seed)
    summary[f"data/positive_rate/seed{seed}"] = data["positive_rate"]
    for method in RECON + CLASSIFY:
      prefix = f"{method}/seed{seed}/"
      result, best = train_method(config, workdir, data, method, seed, prefix)
      results[method].append(best)
      curves[method].append(([r["step"] for r in result.history],
                             [r[f"{prefix}eval/test_accuracy"] for r in result.history]))
  for method in RECON + CLASSIFY:
    for key in results[method][0]:
      values = [r[key] for r in results[method]]
      summary[f"{key}/{method}"] = float(np.mean(values))
      summary[f"{key}_std/{method}"] = float(np.std(values))
  summary["bond_accuracy_gain"] = (summary["test_accuracy/hypercluster"]
                                   - summary["test_accuracy/node_ae"])
  summary["classification_accuracy_gain"] = (summary["test_accuracy/hyperdrop"]
                                             - summary["test_accuracy/node_pool"])
  summary["seconds"] = round(time.perf_counter() - start, 1)
  if jax.process_index() == 0:
    for title, methods in (("reconstruction", RECON), ("classification", CLASSIFY)):
      plotting.line_plot(
          f"{workdir}/{title}.png",
          {m: (curves[m][0][0], np.mean([c[1] for c in curves[m]], axis=0)) for m in methods},
          title=f"{title}: test accuracy (mean over seeds)", xlabel="step",
          ylabel="accuracy")
  return summary


# --------------------------------------------------------------------------------- benchmark


def _dense_conv(x, incidence):
  """Dense-incidence reference `D^-1 H B^-1 H^T x` (no self-loops), `H [V, H]`."""
  b = incidence.sum(0)
  d = incidence.sum(1)
  hyper = (incidence.T @ x) / jnp.maximum(b, 1.0)[:, None]
  return (incidence @ hyper) / jnp.maximum(d, 1.0)[:, None]


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Hypergraph convolution on the dual of a molecule batch: segment sums (ours) vs a dense
  `[E, N]` incidence matmul, as the batch grows."""
  config = experiment.config_module(PAPER).get_config("smoke" if quick else "demo")
  sparse = jax.jit(lambda x, dual: ehgnn.hypergraph_propagate(x, dual, self_loops=False))
  dense = jax.jit(_dense_conv)
  rows = []
  for n_mol in (128,) if quick else (128, 1024):
    mols = graphs.random_molecules(0, n_mol, coordinates=False)
    (graph,), _ = make_batches(mols, "atoms", n_mol)
    graph = jax.tree.map(jnp.asarray, graph)
    dual = ehgnn.dual_of_graph(graph)
    incidence = jnp.zeros((graph.senders.shape[0], graph.nodes.shape[0]))
    incidence = incidence.at[jnp.arange(graph.senders.shape[0]), graph.senders].add(1.0)
    incidence = incidence.at[jnp.arange(graph.senders.shape[0]), graph.receivers].add(1.0)
    x = jax.random.normal(jax.random.key(0),
                          (graph.senders.shape[0], config.reconstruction.hidden))
    error = float(jnp.max(jnp.abs(sparse(x, dual) - dense(x, incidence))))
    t = benchmarking.interleaved(
        {"sparse": lambda x=x, dual=dual: sparse(x, dual),
         "dense": lambda x=x, incidence=incidence: dense(x, incidence)},
        rounds=3 if quick else 5)
    rows.append(benchmarking.time_row(
        PAPER, f"hypergraph conv on the dual of {n_mol} molecules "
               f"({graph.senders.shape[0]} padded bonds)",
        ("segment sums (ours)", t["sparse"]), ("dense incidence matmul", t["dense"]),
        note=f"ratio = dense time / segment-sum time; max |difference| {error:.1e}"))
  return rows
