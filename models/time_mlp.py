"""A small time-conditioned MLP: the noise-prediction network for low-dimensional data.

The eps-model of the diffusion family's 2-D demos (stand-in S3, `launch.data.mixtures2d`;
used by MMD-DDM, later by Concept Arithmetics and MT-Diffusion). No single paper:

  e = MLP_t(emb(t)),   emb(t) = [cos(t f), sin(t f)]  (`unet.timestep_embedding`),
  eps_theta(x, t) = MLP_x([x, e]),

with `models.mlp.MLP` for both stacks (each ends in a linear layer; Flax defaults: LeCun
normal kernels, zero biases). The functional core (`init_time_mlp`, `apply_time_mlp`,
`make_model_fn`) works on a nested dict of float32 arrays, like `models.mlp`, so the
parameters go straight into optax, orbax and `jax.grad`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrepro.models import mlp
from jaxrepro.models.unet import timestep_embedding


@dataclasses.dataclass(frozen=True)
class TimeMLPConfig:
  """Sizes of a `TimeMLP`.

  Attributes:
    data_dim: D, the width of x and of the output.
    hidden: width of every hidden layer.
    num_layers: hidden layers of the x stack (>= 1).
    time_embed_dim: even width of the sinusoidal embedding.
    activation: one of `models.mlp.ACTIVATIONS`.
  """
  data_dim: int = 2
  hidden: int = 128
  num_layers: int = 3
  time_embed_dim: int = 32
  activation: str = "gelu"

  def __post_init__(self):
    if self.data_dim < 1 or self.hidden < 1 or self.num_layers < 1:
      raise ValueError(f"data_dim, hidden and num_layers must be >= 1; got {self}")
    if self.time_embed_dim < 2 or self.time_embed_dim % 2:
      raise ValueError(f"time_embed_dim must be even and >= 2; got {self.time_embed_dim}")


class TimeMLP(nnx.Module):
  """eps_theta(x [B, D], t [B]) -> [B, D] (see the module docstring)."""

  def __init__(self, config: TimeMLPConfig, *, rngs: nnx.Rngs):
    self.config = config
    h = config.hidden
    self.time_mlp = mlp.MLP([config.time_embed_dim, h, h], activation=config.activation,
                            rngs=rngs)
    self.net = mlp.MLP([config.data_dim + h] + [h] * config.num_layers + [config.data_dim],
                       activation=config.activation, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    cfg = self.config
    if x.ndim != 2 or x.shape[1] != cfg.data_dim:
      raise ValueError(f"x must be [B, {cfg.data_dim}]; got shape {x.shape}")
    if jnp.shape(t) != (x.shape[0],):
      raise ValueError(f"t must be [B] = [{x.shape[0]}]; got shape {jnp.shape(t)}")
    emb = self.time_mlp(timestep_embedding(t, cfg.time_embed_dim))
    return self.net(jnp.concatenate([x, emb.astype(x.dtype)], axis=-1))


def init_time_mlp(config: TimeMLPConfig, key: jax.Array) -> tuple[nnx.GraphDef, dict]:
  """Builds a `TimeMLP` and splits it into (graphdef, params as a nested dict of arrays)."""
  graphdef, state = nnx.split(TimeMLP(config, rngs=nnx.Rngs(params=key)))
  return graphdef, nnx.to_pure_dict(state)


def apply_time_mlp(graphdef: nnx.GraphDef, params: dict, x: jax.Array,
                   t: jax.Array) -> jax.Array:
  """Pure forward: x float [B, D], t int or float [B] -> eps float [B, D] (jit at the call
  site)."""
  return nnx.merge(graphdef, params)(x, t)


def make_model_fn(graphdef: nnx.GraphDef, params: dict):
  """`model_fn(x, t, cond)` for `algorithms.diffusion.samplers` (cond is ignored)."""
  return lambda x, t, cond: apply_time_mlp(graphdef, params, x, t)
