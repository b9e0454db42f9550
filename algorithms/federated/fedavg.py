"""FedAvg: local SGD epochs on every client, the server applies the weighted mean update.

Paper: H. Brendan McMahan, Eider Moore, Daniel Ramage, Seth Hampson, Blaise Aguera y Arcas,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017,
arXiv:1602.05629 (Algorithm 1, FederatedAveraging).

Method. In round t the server sends x^t to the clients; client i runs E epochs of
minibatch SGD (batch B, learning rate eta_l) on its own examples starting from x^t,

  y <- y - eta_l * grad l_i(y; b)      for every minibatch b,

and returns Delta_i = y_i - x^t. The server applies the weighted mean of the deltas with a
server learning rate eta_g (the "server optimizer" view of Reddi et al. 2021; eta_g = 1 and
weights n_i is the paper's rule x^{t+1} = sum_i n_i y_i / sum_i n_i):

  x^{t+1} = x^t + eta_g * sum_i w_i Delta_i / sum_i w_i.

Uplink = one model-shaped delta per client, downlink = the model.

Differences from the paper. Client shards are padded to a common size N (static shapes),
so every client runs the same number of local steps E * N / B; padded examples are masked
out of each minibatch mean, and a minibatch holding only padding is a zero-gradient step.
The paper's clients run E * n_i / B steps. Sampling clients is a weight mask chosen by the
caller (`jaxrepro.algorithms.federated.engine.sample_mask`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.algorithms.federated.engine import Aggregate, FederatedAlgorithm, FedState

PyTree = Any
# loss_fn(params, examples) -> per-example losses [B]; `examples` leaves are [B, ...].
LossFn = Callable[[PyTree, PyTree], jax.Array]


def local_sgd(params: PyTree, loss_fn: LossFn, examples: PyTree, mask: jax.Array,
              key: jax.Array, *, lr: float, num_epochs: int, batch_size: int,
              shuffle: bool = True, grad_correction: PyTree | None = None
              ) -> tuple[PyTree, jax.Array]:
  """Minibatch SGD over one client's padded shard (a `lax.scan` over all local steps).

  Each epoch visits the N examples in a fresh permutation (or in order) in N / B
  minibatches; the loss of a minibatch is the mean over its real (mask = 1) examples.

  Args:
    params: starting model (pytree of float arrays).
    loss_fn: `(params, examples[B]) -> losses [B]` per-example losses.
    examples: pytree, leaves `[N, ...]`.
    mask: `[N]` bool or float, 1 for real examples, 0 for padding.
    key: typed PRNG key for the permutations.
    lr: local learning rate eta_l.
    num_epochs: local epochs E.
    batch_size: minibatch size B (must divide N).
    shuffle: permute the examples every epoch.
    grad_correction: optional pytree like `params` added to every gradient
      (SCAFFOLD's `c - c_i`).

  Returns:
    `(params, losses)`: the final model and the float32 `[E * N / B]` minibatch losses
    (measured before each step).

  Raises:
    ValueError: if `batch_size` does not divide N or `num_epochs < 1`.
  """
  n = mask.shape[0]
  if batch_size < 1 or n % batch_size:
    raise ValueError(f"batch_size must divide the padded shard size {n}, got {batch_size}")
  if num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")

  def order(k):
    return jax.random.permutation(k, n) if shuffle else jnp.arange(n)

  idx = jax.vmap(order)(jax.random.split(key, num_epochs)).reshape(-1, batch_size)
  mask = mask.astype(jnp.float32)

  def step(p, ix):
    mb = jax.tree.map(lambda x: x[ix], examples)
    m = mask[ix]

    def loss(q):
      # max(., 1): an all-padding minibatch has loss 0 and zero gradient, not NaN.
      return jnp.sum(loss_fn(q, mb) * m) / jnp.maximum(jnp.sum(m), 1.0)

    value, grads = jax.value_and_grad(loss)(p)
    if grad_correction is not None:
      grads = jax.tree.map(jnp.add, grads, grad_correction)
    p = jax.tree.map(lambda w, g: w - lr * g.astype(w.dtype), p, grads)
    return p, value

  return lax.scan(step, params, idx)


def num_local_steps(shard_size: int, *, num_epochs: int, batch_size: int) -> int:
  """K = E * N / B, the number of local SGD steps per round."""
  return num_epochs * (shard_size // batch_size)


def make_fedavg(loss_fn: LossFn, *, client_lr: float, server_lr: float = 1.0,
                num_epochs: int = 1, batch_size: int, shuffle: bool = True
                ) -> FederatedAlgorithm:
  """FedAvg as a `FederatedAlgorithm`.

  Client data is `(examples, mask)` with leaves `[N, ...]` and mask `[N]` (per client; the
  round stacks them `[C, N, ...]`). Server state is the model pytree; there is no
  per-client state.

  Args:
    loss_fn: `(params, examples[B]) -> losses [B]`.
    client_lr: local SGD learning rate eta_l.
    server_lr: server learning rate eta_g applied to the mean delta.
    num_epochs: local epochs E.
    batch_size: local minibatch size B.
    shuffle: reshuffle the client's examples every epoch.

  Returns:
    The algorithm; client metric `loss` is the mean minibatch loss of the local steps.
  """
  if client_lr <= 0 or server_lr <= 0:
    raise ValueError(f"client_lr and server_lr must be > 0, got {client_lr}, {server_lr}")

  def init(params, num_clients):
    del num_clients
    return FedState(params, (), jnp.zeros((), jnp.int32))

  def broadcast(params):
    return params

  def client_update(params, client_state, data, key):
    examples, mask = data
    y, losses = local_sgd(params, loss_fn, examples, mask, key, lr=client_lr,
                          num_epochs=num_epochs, batch_size=batch_size, shuffle=shuffle)
    delta = jax.tree.map(jnp.subtract, y, params)
    return delta, {"loss": jnp.mean(losses)}, client_state

  def server_update(params, agg: Aggregate):
    return jax.tree.map(lambda x, d: x + server_lr * d, params, agg.mean)

  return FederatedAlgorithm(init, broadcast, client_update, server_update)
