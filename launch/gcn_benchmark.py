"""The graph family's shared speed check: one full-batch GCN training epoch, three ways.

The graph papers all sit on `models.graph.layers` (jraph message passing over padded
`GraphsTuple`s). This module times one training epoch of the same two-layer GCN (forward,
masked cross-entropy, backward, Adam update) on the same random graph:

* ours: `layers.GNN("gcn")`, sparse `segment_sum` message passing, jitted with the state
  donated;
* PyTorch Geometric's `GCNConv` (the library a user would pick instead), when
  `torch_geometric` is importable, otherwise a skipped row saying so;
* a dense-adjacency JAX GCN (`Â` as an `[N, N]` matrix), the baseline a sparse layer has
  to beat. It needs `4 N^2` bytes, so it runs at a smaller size than the others.

Rows report milliseconds per epoch and, in the note, edges per second; `ratio` is
baseline / ours (above 1: ours is faster). Called from a graph driver's `benchmark`.
"""

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from flax import nnx

from jaxrepro.algorithms.graph import metrics
from jaxrepro.launch import benchmarking
from jaxrepro.models.graph import layers

FEATURES, HIDDEN, CLASSES = 64, 64, 8


def random_graph(seed: int, n_nodes: int, n_edges: int):
  """A random symmetric graph with `n_edges` directed edges (both directions of `n_edges // 2`
  uniform pairs, self-pairs moved off the diagonal), features and labels (NumPy)."""
  rng = np.random.default_rng(seed)
  half = n_edges // 2
  a = rng.integers(0, n_nodes, half)
  b = (a + rng.integers(1, n_nodes, half)) % n_nodes  # never a self-loop
  senders = np.concatenate([a, b]).astype(np.int32)
  receivers = np.concatenate([b, a]).astype(np.int32)
  x = rng.normal(size=(n_nodes, FEATURES)).astype(np.float32)
  y = rng.integers(0, CLASSES, n_nodes).astype(np.int32)
  train = rng.random(n_nodes) < 0.5
  return senders, receivers, x, y, train


def _jitted_epoch(loss_fn, params, data):
  """A zero-argument callable running one jitted Adam step of `loss_fn(params, data)`.

  The graph travels as an argument, not a closed-over constant, so XLA does not try to
  constant-fold a million-edge gather at compile time.
  """
  opt = optax.adam(1e-2)

  def step(p, opt_state, data):
    loss, grads = jax.value_and_grad(loss_fn)(p, data)
    updates, opt_state = opt.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))  # the epoch updates the state in place
  state = [params, opt.init(params)]

  def run():
    state[0], state[1], loss = step(*state, data)
    return loss
  return run


def ours_epoch(data):
  """A zero-argument callable running one epoch of our jraph GCN (state kept inside)."""
  senders, receivers, x, y, train = data
  n = x.shape[0]
  graph = jraph.GraphsTuple(nodes=jnp.asarray(x), edges=None, senders=jnp.asarray(senders),
                            receivers=jnp.asarray(receivers), n_node=jnp.array([n]),
                            n_edge=jnp.array([len(senders)]), globals=None)
  model = layers.GNN("gcn", FEATURES, HIDDEN, CLASSES, 2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p, data):
    graph, labels, mask = data
    logits = nnx.merge(graphdef, p)(graph)
    return metrics.masked_cross_entropy(logits, labels, mask)
  return _jitted_epoch(loss_fn, params, (graph, jnp.asarray(y), jnp.asarray(train)))


def dense_epoch(data):
  """One epoch of the same GCN with `Â = D^-1/2 (A + I) D^-1/2` as a dense `[N, N]` matrix."""
  senders, receivers, x, y, train = data
  n = x.shape[0]
  adj = np.zeros((n, n), np.float32)
  np.add.at(adj, (receivers, senders), 1.0)
  adj += np.eye(n, dtype=np.float32)
  d = adj.sum(1) ** -0.5
  a_hat = jnp.asarray(d[:, None] * adj * d[None, :])
  key_1, key_2 = jax.random.split(jax.random.key(0))
  glorot = jax.nn.initializers.glorot_uniform()
  params = {"w1": glorot(key_1, (FEATURES, HIDDEN)), "b1": jnp.zeros(HIDDEN),
            "w2": glorot(key_2, (HIDDEN, CLASSES)), "b2": jnp.zeros(CLASSES)}

  def loss_fn(p, data):
    a_hat, features, labels, mask = data
    h = jax.nn.relu(a_hat @ (features @ p["w1"]) + p["b1"])
    return metrics.masked_cross_entropy(a_hat @ (h @ p["w2"]) + p["b2"], labels, mask)
  return _jitted_epoch(loss_fn, params, (a_hat, jnp.asarray(x), jnp.asarray(y),
                                         jnp.asarray(train)))


def pyg_epoch(data):
  """One epoch of PyTorch Geometric's two-layer `GCNConv` model (raises ImportError)."""
  import torch  # noqa: PLC0415 - optional anchor, imported only when benchmarking
  import torch_geometric  # noqa: PLC0415
  from torch_geometric.nn import GCNConv  # noqa: PLC0415
  senders, receivers, x, y, train = data
  torch.manual_seed(0)
  conv1, conv2 = GCNConv(FEATURES, HIDDEN), GCNConv(HIDDEN, CLASSES)
  edge_index = torch.from_numpy(np.stack([senders, receivers]).astype(np.int64))
  features, labels = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
  mask = torch.from_numpy(train)
  opt = torch.optim.Adam([*conv1.parameters(), *conv2.parameters()], lr=1e-2)

  def run():
    opt.zero_grad()
    h = torch.relu(conv1(features, edge_index))
    loss = torch.nn.functional.cross_entropy(conv2(h, edge_index)[mask], labels[mask])
    loss.backward()
    opt.step()
    return np.float32(loss.item())
  run.name = (f"PyTorch Geometric {torch_geometric.__version__} GCNConv (torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads)")
  return run


def rows(paper: str, quick: bool) -> list[benchmarking.Row]:
  """Ours vs PyTorch Geometric at the large size, ours vs dense JAX at a dense-feasible size."""
  out = []
  n_nodes, n_edges = (10_000, 100_000) if quick else (100_000, 1_000_000)
  rounds = 3 if quick else 5
  data = random_graph(0, n_nodes, n_edges)
  what = f"GCN training epoch, {n_nodes} nodes, {n_edges} edges, 2 layers x {HIDDEN}"
  try:
    baseline = pyg_epoch(data)
  except ImportError as e:
    t = benchmarking.interleaved({"ours": ours_epoch(data)}, rounds=rounds)["ours"]
    out.append(benchmarking.Row(
        paper, what, "jraph GCN (models.graph.layers)", "-", t.median_s * 1e3,
        float("nan"), "ms", float("nan"),
        note=f"{n_edges / t.median_s / 1e6:.1f} M edges/s; no anchor"))
    out.append(benchmarking.skipped_row(paper, what, "PyTorch Geometric GCNConv",
                                        f"torch_geometric not importable ({e.name})"))
  else:
    t = benchmarking.interleaved({"ours": ours_epoch(data), "pyg": baseline}, rounds=rounds)
    out.append(benchmarking.time_row(
        paper, what, ("jraph GCN (models.graph.layers)", t["ours"]),
        (baseline.name, t["pyg"]),
        note=f"{n_edges / t['ours'].median_s / 1e6:.1f} vs "
             f"{n_edges / t['pyg'].median_s / 1e6:.1f} M edges/s (ours vs PyG)"))
  # The dense baseline needs 4 N^2 bytes: 8k nodes (256 MB) with the same average degree.
  n_small = 2_000 if quick else 8_000
  data = random_graph(1, n_small, n_small * n_edges // n_nodes)
  t = benchmarking.interleaved({"ours": ours_epoch(data), "dense": dense_epoch(data)},
                               rounds=rounds)
  out.append(benchmarking.time_row(
      paper, f"GCN training epoch, {n_small} nodes, {len(data[0])} edges",
      ("jraph GCN (sparse)", t["ours"]), ("dense-adjacency JAX GCN", t["dense"]),
      note=f"dense needs an [N, N] float32 matrix: {4 * n_nodes ** 2 / 1e9:.2g} GB at "
           f"{n_nodes} nodes"))
  return out
