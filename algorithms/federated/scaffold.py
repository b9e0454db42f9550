"""SCAFFOLD: federated averaging with control variates against client drift (option II).

Paper: Sai Praneeth Karimireddy, Satyen Kale, Mehryar Mohri, Sashank J. Reddi, Sebastian U.
Stich, Ananda Theertha Suresh, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, arXiv:1910.06378 (Algorithm 1).

Method. The server keeps the model x and a control variate c; client i keeps its own c_i
(all zero at the start). In a round the server sends (x, c); every sampled client i runs K
corrected local SGD steps from y = x,

  y <- y - eta_l * (g_i(y) - c_i + c),

then updates its control variate with option II (eq. (4) of the paper),

  c_i^+ = c_i - c + (x - y) / (K eta_l),

and uploads Delta y_i = y - x and Delta c_i = c_i^+ - c_i. The server, with S the set of
sampled clients and N the population size, sets

  x <- x + eta_g * (1/|S|) sum_{i in S} Delta y_i,     c <- c + (1/N) sum_{i in S} Delta c_i.

Uplink = two model-sized vectors per client (Delta y, Delta c), downlink = two (x, c).
Because every c_i starts at zero and c moves by the mean change, c = (1/N) sum_i c_i holds
after every round, also with partial participation.

Differences from the paper. The x-average uses the engine's weights: with 0/1 participation
weights it is the paper's 1/|S| mean; with data-size weights it is a weighted mean. Shards
are padded to a common size (see `fedavg.py`), so K = E * N / B is the same for every
client; a minibatch of only padding contributes a zero gradient but still the correction
c - c_i. Option I (c_i^+ = full gradient at x) is not implemented.
"""

import jax
import jax.numpy as jnp

from jaxrepro.algorithms.federated.engine import (
  Aggregate,
  FederatedAlgorithm,
  FedState,
  stack_clients,
)
from jaxrepro.algorithms.federated.fedavg import LossFn, local_sgd


def make_scaffold(loss_fn: LossFn, *, client_lr: float, server_lr: float = 1.0,
                  num_epochs: int = 1, batch_size: int, shuffle: bool = True
                  ) -> FederatedAlgorithm:
  """SCAFFOLD (option II) as a `FederatedAlgorithm`.

  Server state is `{"params": x, "control": c}`; the per-client state is c_i stacked
  `[C, ...]` like the params (sharded over the clients axis by the engine). Client data is
  `(examples, mask)` as for `make_fedavg`.

  Args:
    loss_fn: `(params, examples[B]) -> losses [B]`.
    client_lr: local learning rate eta_l.
    server_lr: global learning rate eta_g.
    num_epochs: local epochs E (K = E * N / B local steps).
    batch_size: local minibatch size B.
    shuffle: reshuffle the client's examples every epoch.

  Returns:
    The algorithm. Uplink `{"delta_params", "delta_control"}`, downlink `(x, c)`; client
    metric `loss` is the mean minibatch loss of the local steps.
  """
  if client_lr <= 0 or server_lr <= 0:
    raise ValueError(f"client_lr and server_lr must be > 0, got {client_lr}, {server_lr}")

  def init(params, num_clients):
    zeros = jax.tree.map(jnp.zeros_like, params)
    server = {"params": params, "control": zeros}
    return FedState(server, stack_clients(zeros, num_clients), jnp.zeros((), jnp.int32))

  def broadcast(server):
    return (server["params"], server["control"])

  def client_update(payload, c_i, data, key):
    x, c = payload
    examples, mask = data
    correction = jax.tree.map(jnp.subtract, c, c_i)
    y, losses = local_sgd(x, loss_fn, examples, mask, key, lr=client_lr,
                          num_epochs=num_epochs, batch_size=batch_size, shuffle=shuffle,
                          grad_correction=correction)
    k = losses.shape[0]
    # Option II: reuse the local trajectory, (x - y) / (K eta_l) is the mean corrected step.
    c_new = jax.tree.map(lambda ci, cc, x0, y0: ci - cc + (x0 - y0) / (k * client_lr),
                         c_i, c, x, y)
    uplink = {"delta_params": jax.tree.map(jnp.subtract, y, x),
              "delta_control": jax.tree.map(jnp.subtract, c_new, c_i)}
    return uplink, {"loss": jnp.mean(losses)}, c_new

  def server_update(server, agg: Aggregate):
    params = jax.tree.map(lambda x, d: x + server_lr * d, server["params"],
                          agg.mean["delta_params"])
    control = jax.tree.map(lambda c, d: c + d / agg.num_clients, server["control"],
                           agg.total["delta_control"])
    return {"params": params, "control": control}

  return FederatedAlgorithm(init, broadcast, client_update, server_update)
