"""The federated round engine: C simulated clients on D devices, one pure jitted round.

Shared by the federated papers of the suite (FedAvg and SCAFFOLD here; FedKSeed, Ferret,
CELLM, SCAFCOM, DFedSAM and FedFix build on it). No single paper: the structure follows
google/fedjax (`FederatedAlgorithm(init, apply)`, `for_each_client`) and the notation of
McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", 2017, arXiv:1602.05629.

Method. An algorithm is four pure functions (`FederatedAlgorithm`):

  init(params, num_clients)      -> FedState(server, clients)
  broadcast(server)              -> payload          (the downlink message)
  client_update(payload, client_state, client_data, key)
                                 -> (uplink, metrics, client_state)
  server_update(server, Aggregate) -> server

and a round t is

  u_i = client_update(broadcast(s^t), z_i, D_i, k_i)    for every client i
  mean = sum_i w_i u_i / sum_i w_i,   total = sum_{i: w_i > 0} u_i
  s^{t+1} = server_update(s^t, Aggregate(mean, total, ...)),

where w_i >= 0 is the client's aggregation weight (e.g. its number of examples) times its
participation mask for the round. Absent clients (w_i = 0) are still computed (static
shapes) but contribute nothing and keep their per-client state z_i (fedjax's masking trick
`where(mask, new, old)`).

Layout (the "hybrid" layout of the group's spec card, section 0.1): the clients form the
`clients` axis of a 1-D mesh of D devices; each device holds C / D clients and `vmap`s the
client update over them; the two sums are `lax.psum` over the mesh axis inside
`jax.shard_map`. Per-client state and data are sharded `P('clients')`; the server state is
replicated. With `mesh=None` the same body runs on one device with plain sums over the
client axis, so both layouts share one code path.

Communication is counted from the shapes and dtypes actually transmitted: `round_ledger`
traces `broadcast` and `client_update` abstractly (`jax.eval_shape`) and records the
payload (down) and uplink (up) trees of one client in a `CommLedger`.

Differences from fedjax: clients are a fixed, padded population (static shapes) rather than
a sampled stream; client sampling is a weight mask chosen by the caller (`sample_mask`);
client keys are `jax.random.split(key, C)[i]` for every client, present or not.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxrepro.sharding.ledger import CommLedger

PyTree = Any


class FedState(NamedTuple):
  """The whole federated state carried from round to round.

  Attributes:
    server: replicated server pytree (global model, server control variate, ...).
    clients: per-client pytree, every leaf `[C, ...]` (sharded over the clients axis);
      `()` when the algorithm keeps no client state.
    round: int32 scalar, number of rounds done.
  """
  server: PyTree
  clients: PyTree
  round: jax.Array


class ClientBatch(NamedTuple):
  """The clients' inputs for one round.

  Attributes:
    data: pytree, every leaf `[C, ...]` (e.g. padded examples `[C, N, ...]` and a mask
      `[C, N]` from `jaxrepro.launch.data.partitions.pad_client_shards`).
    weight: float32 `[C]`, aggregation weight times participation mask (0 = absent).
  """
  data: PyTree
  weight: jax.Array


class Aggregate(NamedTuple):
  """What the server receives after the collective.

  Attributes:
    mean: the uplink tree averaged with the weights, `sum_i w_i u_i / sum_i w_i`
      (zeros when no client is present); accumulated in float32 or wider, returned in
      each leaf's dtype (float32 for integer leaves).
    total: the uplink tree summed over present clients (`w_i > 0`), unweighted, in each
      leaf's dtype.
    weight_sum: float32 scalar, `sum_i w_i`.
    num_present: float32 scalar, number of clients with `w_i > 0`.
    num_clients: Python int, the population size C.
  """
  mean: PyTree
  total: PyTree
  weight_sum: jax.Array
  num_present: jax.Array
  num_clients: int


class FederatedAlgorithm(NamedTuple):
  """A federated algorithm as pure functions (see the module docstring)."""
  init: Callable[[PyTree, int], FedState]
  broadcast: Callable[[PyTree], PyTree]
  client_update: Callable[[PyTree, PyTree, PyTree, jax.Array],
                          tuple[PyTree, dict[str, jax.Array], PyTree]]
  server_update: Callable[[PyTree, Aggregate], PyTree]


def _round_body(algorithm: FederatedAlgorithm, server, clients, data, weight, keys,
                num_clients: int, reduce: Callable, to_local: Callable):
  """One round over the clients held here (all C, or C / D inside a shard)."""
  payload = algorithm.broadcast(server)
  # Inside shard_map the payload is replicated ("invariant") while the client updates make
  # it device-varying; casting first keeps scan carries of one type under check_vma.
  payload_local = to_local(payload)
  uplink, metrics, new_clients = jax.vmap(
      algorithm.client_update, in_axes=(None, 0, 0, 0))(payload_local, clients, data, keys)
  present = weight > 0

  def expand(v, x):
    # [c] -> [c, 1, ..., 1] to broadcast a per-client scalar against a leaf [c, ...].
    return v.reshape(v.shape + (1,) * (x.ndim - 1))

  # Absent clients are computed (static shapes) but keep their previous state.
  new_clients = jax.tree.map(
      lambda new, old: jnp.where(expand(present, new), new, old), new_clients, clients)
  weight_sum = reduce(jnp.sum(weight))
  num_present = reduce(jnp.sum(present.astype(jnp.float32)))
  # A round where nobody is present leaves the server unchanged (mean = 0 by convention).
  denom = jnp.where(weight_sum > 0, weight_sum, 1.0)

  def weighted_mean(u):
    # Accumulate in at least float32 (bf16 sums over many clients lose digits); floating
    # uplinks come back in their own dtype, integer ones as a float32 mean.
    acc = jnp.promote_types(u.dtype, jnp.float32)
    # jnp.where, not a multiply, so NaN/inf from absent clients cannot leak in.
    terms = jnp.where(expand(present, u), expand(weight, u).astype(acc) * u.astype(acc), 0)
    out = reduce(jnp.sum(terms, 0)) / denom.astype(acc)
    return out.astype(u.dtype) if jnp.issubdtype(u.dtype, jnp.floating) else out

  def masked_total(u):
    acc = jnp.promote_types(u.dtype, jnp.float32) if jnp.issubdtype(
        u.dtype, jnp.floating) else u.dtype
    out = reduce(jnp.sum(jnp.where(expand(present, u), u.astype(acc), 0), 0))
    return out.astype(u.dtype)

  mean = jax.tree.map(weighted_mean, uplink)
  total = jax.tree.map(masked_total, uplink)
  agg = Aggregate(mean, total, weight_sum, num_present, num_clients)
  new_server = algorithm.server_update(server, agg)
  out_metrics = {
      name: reduce(jnp.sum(jnp.where(present, weight * m.astype(jnp.float32), 0)))
      / denom for name, m in metrics.items()}
  out_metrics["num_present"] = num_present
  out_metrics["weight_sum"] = weight_sum
  return new_server, new_clients, out_metrics


def make_round(algorithm: FederatedAlgorithm, mesh: jax.sharding.Mesh | None = None,
               axis_name: str = "clients", *, jit: bool = True
               ) -> Callable[[FedState, ClientBatch, jax.Array],
                             tuple[FedState, dict[str, jax.Array]]]:
  """Wires an algorithm into `round(state, batch, key) -> (state, metrics)`.

  Args:
    algorithm: the four functions of the algorithm.
    mesh: a mesh with axis `axis_name` of size D (clients sharded over it, C / D per
      device); `None` runs every client on one device with `vmap` (same results).
    axis_name: the clients axis of `mesh`.
    jit: wrap the round in `jax.jit`.

  Returns:
    `round(state, batch, key)`: `state` a `FedState`, `batch` a `ClientBatch` with C
    clients (C a multiple of D), `key` a typed PRNG key. Metrics are the client metrics
    averaged with the weights over present clients plus `num_present` and `weight_sum`
    (float32 scalars).

  Raises:
    ValueError: if `axis_name` is not an axis of `mesh`.
  """
  if mesh is not None and axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh "
                     f"{tuple(mesh.axis_names)}")

  def round_fn(state: FedState, batch: ClientBatch, key: jax.Array):
    num_clients = int(batch.weight.shape[0])
    _check_batch(state, batch, mesh, axis_name)
    keys = jax.random.split(key, num_clients)
    if mesh is None:
      server, clients, metrics = _round_body(
          algorithm, state.server, state.clients, batch.data, batch.weight, keys,
          num_clients, reduce=lambda x: x, to_local=lambda x: x)
    else:
      def body(server, clients, data, weight, keys):
        return _round_body(
            algorithm, server, clients, data, weight, keys, num_clients,
            reduce=lambda x: lax.psum(x, axis_name),
            to_local=lambda t: jax.tree.map(
                lambda x: lax.pcast(x, axis_name, to="varying"), t))

      sharded = P(axis_name)
      server, clients, metrics = jax.shard_map(
          body, mesh=mesh,
          in_specs=(P(), sharded, sharded, sharded, sharded),
          out_specs=(P(), sharded, P()))(
              state.server, state.clients, batch.data, batch.weight, keys)
    return FedState(server, clients, state.round + 1), metrics

  return jax.jit(round_fn) if jit else round_fn


def _check_batch(state: FedState, batch: ClientBatch, mesh, axis_name: str) -> None:
  """Static shape checks (run at trace time)."""
  if batch.weight.ndim != 1:
    raise ValueError(f"batch.weight must be [C], got shape {batch.weight.shape}")
  c = batch.weight.shape[0]
  for name, tree in (("batch.data", batch.data), ("state.clients", state.clients)):
    for leaf in jax.tree.leaves(tree):
      if leaf.ndim == 0 or leaf.shape[0] != c:
        raise ValueError(f"every leaf of {name} must have leading axis C={c}, "
                         f"got shape {leaf.shape}")
  if mesh is not None:
    d = mesh.shape[axis_name]
    if c % d:
      raise ValueError(f"number of clients C={c} must be a multiple of the "
                       f"{axis_name!r} mesh axis size {d}")


def place_on_mesh(tree: PyTree, mesh: jax.sharding.Mesh, axis_name: str = "clients",
                  *, per_client: bool) -> PyTree:
  """`tree` placed as the round expects it: sharded `P(axis_name)` or replicated `P()`.

  Placing the state and batch once before the first round lets every round reuse one
  compiled program (the round's outputs already carry these shardings).

  Args:
    tree: pytree of arrays.
    mesh: the round's mesh.
    axis_name: the clients axis.
    per_client: True for per-client trees (`FedState.clients`, `ClientBatch`), False for
      replicated ones (`FedState.server`, `FedState.round`).
  """
  spec = P(axis_name) if per_client else P()
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, spec))


def place_state(state: FedState, mesh: jax.sharding.Mesh, axis_name: str = "clients"
                ) -> FedState:
  """A `FedState` with replicated server/round and client state sharded over the clients."""
  return FedState(place_on_mesh(state.server, mesh, axis_name, per_client=False),
                  place_on_mesh(state.clients, mesh, axis_name, per_client=True),
                  place_on_mesh(state.round, mesh, axis_name, per_client=False))


def stack_clients(tree: PyTree, num_clients: int) -> PyTree:
  """`tree` repeated on a new leading client axis `[C, ...]` (initial per-client state)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + jnp.shape(x)), tree)


def sample_mask(key: jax.Array, num_clients: int, clients_per_round: int) -> jax.Array:
  """Uniform sampling without replacement as a float32 `[C]` 0/1 participation mask."""
  if not 0 < clients_per_round <= num_clients:
    raise ValueError(f"clients_per_round must be in [1, {num_clients}], "
                     f"got {clients_per_round}")
  chosen = jax.random.permutation(key, num_clients)[:clients_per_round]
  return jnp.zeros((num_clients,), jnp.float32).at[chosen].set(1.0)


def round_ledger(algorithm: FederatedAlgorithm, state: FedState, batch: ClientBatch,
                 *, count: int = 1) -> CommLedger:
  """Bytes one participating client receives (down) and sends (up) in one round.

  The payload and uplink trees are obtained with `jax.eval_shape` from the algorithm's own
  `broadcast` and `client_update`, so the ledger follows what is actually transmitted.

  Args:
    algorithm: the algorithm.
    state: a `FedState` (arrays or `jax.ShapeDtypeStruct`s).
    batch: a `ClientBatch` (arrays or shape structs) with a leading client axis.
    count: number of messages to record (e.g. the number of present clients).

  Returns:
    A `CommLedger` with entries `payload` (direction `down`) and `uplink` (direction `up`).
  """
  first = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), t)
  payload = jax.eval_shape(algorithm.broadcast, state.server)
  key = jax.eval_shape(lambda: jax.random.key(0))
  uplink, _, _ = jax.eval_shape(algorithm.client_update, payload, first(state.clients),
                                first(batch.data), key)
  ledger = CommLedger()
  ledger.add_tree("payload", "down", payload, count=count)
  ledger.add_tree("uplink", "up", uplink, count=count)
  return ledger
