"""MMD-DDM: fine-tune a diffusion model so that its few-step sampler matches the data in MMD.

Paper: Aiello, Valsesia & Magli, "Fast Inference in Denoising Diffusion Models via MMD
Finetuning", IEEE Access 2024, arXiv:2301.07969; official code `diegovalsesia/MMD-DDM`
(`runners/diffusion.py: train_cifar`, `functions/denoising.py: generalized_steps_diff`,
`functions/losses.py: KID`).

Method. Take a pretrained eps-model and a fixed budget of T' steps on the uniform grid
tau_i = i (T // T') (`schedules.make_timesteps(T', T, "leading")`, the code's
`range(0, T, skip)`). The whole T'-step DDIM sampler (generalized steps, eta configurable)
x_0 = S_theta(z), z ~ N(0, I), is one differentiable function of the parameters, and theta
is fine-tuned to minimise the unbiased squared MMD between features of its outputs and of a
data batch:

  L(theta) = MMD_u^2({phi(S_theta(z_j))}_{j<=m}, {phi(x_j)}_{j<=n}),
  MMD_u^2(A, B) = sum_{i != i'} k(a_i, a_i') / (m (m - 1)) + sum_{j != j'} k(b_j, b_j') /
                  (n (n - 1)) - 2 sum_{i, j} k(a_i, b_j) / (m n),

back-propagated through all T' network calls (each step `jax.checkpoint`ed when `remat`,
the code's optional gradient checkpointing), with Adam after clipping the global gradient
norm at 0.5: `optax.chain(clip_by_global_norm(0.5), adam(lr))`. Kernels (`make_kernel`):

  polynomial: k(a, b) = (gamma a . b + coef0)^degree, gamma = 1 / d by default (KID; the
              fine-tuning runs use degree 3 on InceptionV3 features);
  rbf:        k(a, b) = exp(-gamma ||a - b||^2), gamma = 1 / d by default (`KID_rbf`);
  gaussian:   k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2)) over bandwidths s (the card's CPU
              demo on raw 2-D points, bandwidths {0.05, 0.1, 0.2, 0.5}).

Data parallelism (`make_sharded_mmd_loss`): the batch of noise and data is split over a
mesh axis, every device runs the sampler on its shard, and the generated and data features
are `all_gather`ed before the kernel, because the MMD couples every pair of the batch. Loss
and gradients equal the single-device ones (tested on 8 CPU devices); `make_loss_fn(...,
mesh=mesh)` trains with it.

Differences from the paper and its code (what we followed where they disagree):
* The code fine-tunes every parameter of the model (`model.parameters()` into Adam) with
  fresh noise `randn_like(x)` at every step and eta from the command line (default 0); we
  do the same (noise from the step's key). The card's "fixed noise" is the code's
  visualisation batch only.
* The code computes the kernel in float64 on InceptionV3 (or CLIP) features; we use float32
  and identity features on the 2-D stand-in (S3), where Inception does not apply. `features`
  is a hook for any differentiable `phi`.
* The code's `KID` class defaults to degree 1 but the fine-tuning instantiates degree 3;
  our `make_kernel("polynomial")` defaults to degree 3.
* The last DDIM step goes to abar = 1 (the code's `compute_alpha` at index -1 + 1 = 0 of
  the padded betas), i.e. the sampler returns the final x_0 prediction; no clipping.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxrepro.algorithms.diffusion import metrics, samplers
from jaxrepro.algorithms.diffusion import schedules as sch

PyTree = Any
# apply_fn(params, x [B, ...], t int32 [B]) -> eps [B, ...]
ApplyFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]
Kernel = Callable[[jax.Array, jax.Array], jax.Array]

KERNELS = ("gaussian", "polynomial", "rbf")
GRAD_CLIP = 0.5  # the official code's clip_grad_norm_(model.parameters(), 0.5)


def make_kernel(name: str, *, bandwidths: float | Sequence[float] = (0.05, 0.1, 0.2, 0.5),
                degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> Kernel:
  """A kernel `k(a [m, d], b [n, d]) -> [m, n]` by name (see the module docstring).

  Args:
    name: one of `KERNELS`.
    bandwidths: the Gaussian kernel's sigmas (a float or a sequence).
    degree: the polynomial degree (>= 1).
    gamma: the polynomial/rbf scale; None means 1 / d.
    coef0: the polynomial offset.
  """
  if name == "gaussian":
    bws = np.atleast_1d(np.asarray(bandwidths, np.float64))
    if bws.size == 0 or np.any(bws <= 0):
      raise ValueError(f"bandwidths must be positive; got {bandwidths}")
    return lambda a, b: metrics.gaussian_kernel(a, b, tuple(float(s) for s in bws))
  if name == "polynomial":
    if int(degree) != degree or degree < 1:
      raise ValueError(f"degree must be an integer >= 1; got {degree}")
    return lambda a, b: metrics.polynomial_kernel(a, b, int(degree), coef0, gamma)
  if name == "rbf":
    # exp(-gamma ||a - b||^2) is the Gaussian kernel with sigma = 1 / sqrt(2 gamma).
    def rbf(a, b):
      g = 1.0 / a.shape[-1] if gamma is None else gamma
      return metrics.gaussian_kernel(a, b, (2.0 * g) ** -0.5)
    return rbf
  raise ValueError(f"kernel name={name!r}; choose one of {KERNELS}")


def mmd2_unbiased(x: jax.Array, y: jax.Array, kernel: Kernel) -> jax.Array:
  """The unbiased MMD^2 of two sets, x [m, d] and y [n, d] (m, n >= 2): a float scalar.

  Differentiable in both sets; it can be negative (an unbiased estimate of a value >= 0).
  """
  return metrics.mmd2(x, y, kernel=kernel)


def uniform_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
  """tau = [(T'-1) s, ..., s, 0] with s = T // T' (the paper's uniform stride), int32 [T']."""
  return sch.make_timesteps(num_steps, num_timesteps, "leading")


def sample(apply_fn: ApplyFn, params: PyTree, noise: jax.Array, alphas_cumprod: jax.Array,
           timesteps: jax.Array, *, eta: float = 0.0, key: jax.Array | None = None,
           remat: bool = False) -> jax.Array:
  """The T'-step DDIM sampler S_theta(z) as a function of the parameters.

  Args:
    apply_fn: `apply_fn(params, x [B, ...], t int32 [B]) -> eps [B, ...]`.
    params: the model parameters (any pytree).
    noise: float32 [B, ...] initial noise z.
    alphas_cumprod: float32 [T].
    timesteps: int [T'], decreasing (e.g. `uniform_timesteps`).
    eta: DDIM stochasticity (0: deterministic ODE sampler, 1: DDPM ancestral).
    key: typed key, needed when eta > 0.
    remat: checkpoint each step (memory O(1) in T' for the backward pass).

  Returns:
    float32 [B, ...] samples x_0.
  """
  model_fn = lambda x, t, cond: apply_fn(params, x, t)
  return samplers.ddim(model_fn, noise, None, alphas_cumprod, jnp.asarray(timesteps),
                       eta=eta, key=key, remat=remat)


def mmd_loss(apply_fn: ApplyFn, params: PyTree, data: jax.Array, noise: jax.Array,
             alphas_cumprod: jax.Array, timesteps: jax.Array, kernel: Kernel, *,
             eta: float = 0.0, key: jax.Array | None = None, remat: bool = True,
             features: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """L(theta) = MMD_u^2(phi(S_theta(noise)), phi(data)), a float scalar.

  Args:
    apply_fn, params, alphas_cumprod, timesteps, eta, key, remat: as in `sample`.
    data: float32 [n, ...] a batch of real samples (n >= 2).
    noise: float32 [m, ...] the initial noise of the m generated samples (m >= 2).
    kernel: `k(a [m, d], b [n, d]) -> [m, n]`, e.g. from `make_kernel`.
    features: phi, [B, ...] -> [B, d]; None flattens the samples.
  """
  gen = sample(apply_fn, params, noise, alphas_cumprod, timesteps, eta=eta, key=key,
               remat=remat)
  phi = features or (lambda v: v.reshape(v.shape[0], -1))
  return mmd2_unbiased(phi(gen), phi(data), kernel)


def make_loss_fn(apply_fn: ApplyFn, alphas_cumprod: jax.Array, timesteps: jax.Array,
                 kernel: Kernel, *, eta: float = 0.0, remat: bool = True,
                 features: Callable[[jax.Array], jax.Array] | None = None,
                 mesh: jax.sharding.Mesh | None = None, axis_name: str = "data"):
  """`loss_fn(params, data, key) -> (loss, {})` with fresh noise z ~ N(0, I) per call.

  The shape `launch.train_loop.make_train_step` and `train_step` expect: one generated
  sample per data row, as in the official loop (`randn_like(x)`). With a `mesh`, the loss
  is `make_sharded_mmd_loss` over `axis_name` (same value and gradient at eta = 0; the
  batch must divide over the axis).
  """
  sharded = None
  if mesh is not None:
    sharded = make_sharded_mmd_loss(apply_fn, alphas_cumprod, timesteps, kernel, mesh,
                                    axis_name=axis_name, eta=eta, remat=remat,
                                    features=features)

  def loss_fn(params, data, key):
    noise_key, step_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, data.shape, data.dtype)
    if sharded is not None:
      return sharded(params, data, noise, step_key), {}
    loss = mmd_loss(apply_fn, params, data, noise, alphas_cumprod, timesteps, kernel,
                    eta=eta, key=step_key if eta > 0 else None, remat=remat,
                    features=features)
    return loss, {}
  return loss_fn


def make_optimizer(learning_rate: float, grad_clip: float = GRAD_CLIP
                   ) -> optax.GradientTransformation:
  """`optax.chain(clip_by_global_norm(grad_clip), adam(learning_rate))`."""
  if not learning_rate > 0 or not grad_clip > 0:
    raise ValueError(f"learning_rate and grad_clip must be > 0; got {learning_rate}, "
                     f"{grad_clip}")
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(learning_rate))


def train_step(loss_fn, tx: optax.GradientTransformation, params: PyTree, opt_state: PyTree,
               data: jax.Array, key: jax.Array):
  """One fine-tuning update: `(params, opt_state, loss)` (jit with `loss_fn`, `tx` static).

  The launcher trains with `launch.train_loop.make_train_step(loss_fn, tx)`, which runs
  the same computation inside its resumable loop.
  """
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, data, key)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def make_sharded_mmd_loss(apply_fn: ApplyFn, alphas_cumprod: jax.Array,
                          timesteps: jax.Array, kernel: Kernel, mesh: jax.sharding.Mesh, *,
                          axis_name: str = "data", eta: float = 0.0, remat: bool = True,
                          features: Callable[[jax.Array], jax.Array] | None = None):
  """Data-parallel `loss(params, data, noise, key=None) -> scalar` over `mesh[axis_name]`.

  Layout: `data` [n, ...] and `noise` [m, ...] are split on their first axis (P(axis_name));
  each device samples and featurises its m / P rows, then `all_gather(tiled=True)` turns the
  [m / P, d] and [n / P, d] shards into the full [m, d] and [n, d] sets (in global row
  order), and every device evaluates the same MMD^2 (a `pmean` over identical copies marks
  it replicated). `params` are replicated (P()); their gradient is summed over the devices
  by shard_map's transpose rules, so `jax.grad` of this function equals the single-device
  gradient.

  With eta > 0 each device folds its axis index into `key`, so its stochastic steps differ
  from a single-device run's (the loss is then equal in distribution, not bit for bit).

  Raises:
    ValueError: when the mesh has no axis `axis_name`.
  """
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}")
  phi = features or (lambda v: v.reshape(v.shape[0], -1))

  def local(params, data, noise, key):
    step_key = None
    if eta > 0:
      step_key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    gen = sample(apply_fn, params, noise, alphas_cumprod, timesteps, eta=eta, key=step_key,
                 remat=remat)
    # The MMD couples every generated sample with every other one and with every data
    # point, so the kernel needs the whole batch on each device.
    gen_all = jax.lax.all_gather(phi(gen), axis_name, tiled=True)
    data_all = jax.lax.all_gather(phi(data), axis_name, tiled=True)
    # Every device now holds the same value, but the gathered arrays are still typed as
    # varying over the axis; the mean over identical copies makes the result replicated
    # (out_specs P()) and its transpose hands each device 1/P of the cotangent, so the
    # summed parameter gradient is the single-device one.
    return jax.lax.pmean(mmd2_unbiased(gen_all, data_all, kernel), axis_name)

  def loss(params, data, noise, key=None):
    if key is None:
      if eta > 0:
        raise ValueError("eta > 0 needs `key` (a jax.random.key)")
      key = jax.random.key(0)
    for name, arr in (("data", data), ("noise", noise)):
      if arr.shape[0] % mesh.shape[axis_name]:
        raise ValueError(f"{name} rows ({arr.shape[0]}) must be a multiple of the "
                         f"{axis_name!r} axis size {mesh.shape[axis_name]}")
    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis_name), P(axis_name), P()),
                       out_specs=P())
    return fn(params, data, noise, key)
  return loss


def eps_loss(apply_fn: ApplyFn, params: PyTree, x0: jax.Array, key: jax.Array,
             alphas_cumprod: jax.Array) -> jax.Array:
  """The DDPM pretraining loss E_{t, eps} ||eps - eps_theta(x_t, t)||^2 (mean over all
  entries), t uniform on {0..T-1}: what the base eps-model is trained with.

  Args:
    x0: float32 [B, ...] clean data.
    key: typed key for t and eps.
    alphas_cumprod: float32 [T].
  """
  t_key, e_key = jax.random.split(key)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, alphas_cumprod.shape[0])
  eps = jax.random.normal(e_key, x0.shape, x0.dtype)
  xt = sch.q_sample(x0, t, eps, alphas_cumprod)
  return jnp.mean((apply_fn(params, xt, t) - eps) ** 2)
