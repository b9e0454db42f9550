"""Static-shape graph batches: padding buckets, padding masks and our zero-out-padding.

Every jitted GNN function compiles once per input shape, so graphs of varying size are
batched and padded on the host (numpy) to a small set of `(n_node, n_edge, n_graph)`
budgets, the next powers of two, with `jraph.pad_with_graphs`. That function appends one
padding graph that owns every padding node and edge (each padding edge is a self-loop on
the first padding node) and then empty graphs; padding is therefore computation preserving
for message passing on the real nodes, but every mean, max, softmax, loss and metric over
nodes, edges or graphs must use the masks returned here.

`jraph.zero_out_padding` and `jraph.get_fully_connected_graph` call `jax.tree_map` /
`jax.tree_leaves`, which JAX removed, so `zero_out_padding` and `fully_connected_graph`
re-implement them (with `jax.tree.map` and host numpy respectively).

The masks follow jraph's rule: the padding graphs are the trailing graphs with no nodes
plus the last graph that has nodes. They are only meaningful for graphs padded by
`pad_graph` / `jraph.pad_with_graphs`; an unpadded graph would lose its last graph.
"""

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import jraph
import numpy as np


def next_power_of_two(n: int) -> int:
  """Smallest power of two `>= max(n, 1)`."""
  return 1 << max(int(n) - 1, 0).bit_length()


def bucket_sizes(n_node: int, n_edge: int, n_graph: int) -> tuple[int, int, int]:
  """Power-of-two padding budget for a batch with these real totals.

  `jraph.pad_with_graphs` needs at least one padding node and one padding graph, hence the
  `+ 1` on nodes and graphs (edges may be padded by zero).

  Args:
    n_node: total real nodes in the batch.
    n_edge: total real edges.
    n_graph: number of real graphs.

  Returns:
    `(n_node_pad, n_edge_pad, n_graph_pad)` with `n_node_pad > n_node`,
    `n_edge_pad >= n_edge`, `n_graph_pad > n_graph` (so `>= 2`).
  """
  if min(n_node, n_edge, n_graph) < 0:
    raise ValueError(f"n_node={n_node}, n_edge={n_edge}, n_graph={n_graph} must be >= 0")
  return (next_power_of_two(n_node + 1), next_power_of_two(n_edge),
          next_power_of_two(n_graph + 1))


def pad_graph(graph: jraph.GraphsTuple, n_node: int | None = None, n_edge: int | None = None,
              n_graph: int | None = None) -> jraph.GraphsTuple:
  """Pads a (batched) host graph to a budget; by default the power-of-two bucket.

  Args:
    graph: a `GraphsTuple` of numpy arrays (`n_node`, `n_edge`: `[G]` int).
    n_node: padded node count, `> sum(graph.n_node)`; default from `bucket_sizes`.
    n_edge: padded edge count, `>= sum(graph.n_edge)`; default from `bucket_sizes`.
    n_graph: padded graph count, `> len(graph.n_node)`; default from `bucket_sizes`.

  Returns:
    The padded numpy `GraphsTuple` (int32 `n_node`, `n_edge`, `senders`, `receivers`).

  Raises:
    ValueError: if a budget is too small for the graph.
  """
  real = (int(np.sum(graph.n_node)), int(np.sum(graph.n_edge)), len(graph.n_node))
  default = bucket_sizes(*real)
  budget = tuple(d if b is None else int(b) for b, d in zip((n_node, n_edge, n_graph), default))
  if budget[0] <= real[0] or budget[1] < real[1] or budget[2] <= real[2]:
    raise ValueError(f"padding budget (n_node, n_edge, n_graph)={budget} is too small for "
                     f"a graph with {real}: need n_node > {real[0]}, n_edge >= {real[1]}, "
                     f"n_graph > {real[2]}")
  graph = graph._replace(n_node=np.asarray(graph.n_node, np.int32),
                         n_edge=np.asarray(graph.n_edge, np.int32),
                         senders=np.asarray(graph.senders, np.int32),
                         receivers=np.asarray(graph.receivers, np.int32))
  return jraph.pad_with_graphs(graph, *budget)


def batch_graphs(graphs: Sequence[jraph.GraphsTuple]) -> jraph.GraphsTuple:
  """Concatenates host graphs into one `GraphsTuple` (numpy `jraph.batch`)."""
  if not graphs:
    raise ValueError("graphs must hold at least one GraphsTuple")
  return jraph.batch_np(list(graphs))


def padded_batches(graphs: Sequence[jraph.GraphsTuple], batch_size: int,
                   *, drop_remainder: bool = False) -> Iterator[jraph.GraphsTuple]:
  """Successive groups of `batch_size` graphs, batched and padded to their bucket.

  Args:
    graphs: host `GraphsTuple`s, in the order they should be batched.
    batch_size: number of real graphs per batch, >= 1.
    drop_remainder: skip a last, smaller group.

  Yields:
    Padded numpy `GraphsTuple`s; each has one of few power-of-two shapes, so a jitted
    consumer compiles at most once per bucket.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; must be >= 1")
  for start in range(0, len(graphs), batch_size):
    group = graphs[start:start + batch_size]
    if drop_remainder and len(group) < batch_size:
      return
    yield pad_graph(batch_graphs(group))


def _num_nodes(graph: jraph.GraphsTuple, num_nodes: int | None) -> int:
  if num_nodes is not None:
    return int(num_nodes)
  leaves = jax.tree.leaves(graph.nodes)
  if not leaves:
    raise ValueError("graph.nodes is empty: pass num_nodes (the padded node count)")
  return leaves[0].shape[0]


def node_mask(graph: jraph.GraphsTuple, num_nodes: int | None = None) -> jax.Array:
  """`[N]` bool, True on real nodes of a padded graph (jittable).

  Args:
    graph: a graph padded with `pad_graph` / `jraph.pad_with_graphs`.
    num_nodes: static padded node count `N`; default from the first `graph.nodes` leaf.
  """
  n = _num_nodes(graph, num_nodes)
  n_pad = jraph.get_number_of_padding_with_graphs_nodes(graph)
  return jnp.arange(n) < n - n_pad


def edge_mask(graph: jraph.GraphsTuple) -> jax.Array:
  """`[E]` bool, True on real edges of a padded graph (jittable)."""
  return jraph.get_edge_padding_mask(graph)


def graph_mask(graph: jraph.GraphsTuple) -> jax.Array:
  """`[G]` bool, True on real graphs of a padded graph (jittable)."""
  return jraph.get_graph_padding_mask(graph)


def node_graph_index(graph: jraph.GraphsTuple, num_nodes: int | None = None) -> jax.Array:
  """`[N]` int32 index of the graph each node belongs to (jittable, static `N`)."""
  n = _num_nodes(graph, num_nodes)
  n_graph = graph.n_node.shape[0]
  # total_repeat_length keeps the output shape static under jit.
  return jnp.repeat(jnp.arange(n_graph, dtype=jnp.int32), graph.n_node, axis=0,
                    total_repeat_length=n)


def edge_graph_index(graph: jraph.GraphsTuple) -> jax.Array:
  """`[E]` int32 index of the graph each edge belongs to (jittable)."""
  n_graph = graph.n_edge.shape[0]
  return jnp.repeat(jnp.arange(n_graph, dtype=jnp.int32), graph.n_edge, axis=0,
                    total_repeat_length=graph.senders.shape[0])


def _zero(mask: jax.Array):
  def zero(x):
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
    # `where`, not a product: padding may hold inf/nan, and 0 * inf = nan.
    return jnp.where(m, x, jnp.zeros((), x.dtype))
  return zero


def zero_out_padding(graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
  """Sets every padding node, edge and global feature to zero (jittable).

  Replaces `jraph.zero_out_padding`. Useful between layers so that values on padding
  nodes (which receive all padding edges) cannot grow without bound.

  Args:
    graph: a padded graph; `nodes`, `edges` and `globals` may be arrays, pytrees or None.

  Returns:
    The same graph with padding rows of every feature leaf set to 0 (dtype preserved).
  """
  nodes, edges, globals_ = graph.nodes, graph.edges, graph.globals
  if jax.tree.leaves(nodes):
    nodes = jax.tree.map(_zero(node_mask(graph)), nodes)
  if jax.tree.leaves(edges):
    edges = jax.tree.map(_zero(edge_mask(graph)), edges)
  if jax.tree.leaves(globals_):
    globals_ = jax.tree.map(_zero(graph_mask(graph)), globals_)
  return graph._replace(nodes=nodes, edges=edges, globals=globals_)


def fully_connected_graph(n_node: Sequence[int], *, self_edges: bool = False,
                          nodes=None, globals_=None) -> jraph.GraphsTuple:
  """A batch of complete directed graphs on the host (replaces jraph's broken builder).

  Args:
    n_node: node count of each graph (graphs may differ in size).
    self_edges: also add `i -> i`.
    nodes: optional node features with `sum(n_node)` rows.
    globals_: optional global features with `len(n_node)` rows.

  Returns:
    A numpy `GraphsTuple`; graph `g` has every ordered pair of its nodes as an edge,
    senders major (`(0, 1), (0, 2), ...`).
  """
  n_node = np.asarray(n_node, np.int32).reshape(-1)
  if n_node.size == 0 or n_node.min() < 0:
    raise ValueError(f"n_node={n_node.tolist()}; need at least one graph, sizes >= 0")
  senders, receivers, n_edge = [], [], []
  for offset, n in zip(np.cumsum(n_node) - n_node, n_node):
    s, r = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    keep = np.ones_like(s, bool) if self_edges else s != r
    senders.append(s[keep] + offset)
    receivers.append(r[keep] + offset)
    n_edge.append(int(keep.sum()))
  return jraph.GraphsTuple(
      nodes=nodes, edges=None, globals=globals_, n_node=n_node,
      n_edge=np.asarray(n_edge, np.int32),
      senders=np.concatenate(senders).astype(np.int32),
      receivers=np.concatenate(receivers).astype(np.int32))
