"""Fake (simulated) uniform quantization, MSE scale search, AdaRound, and a quantized UNet.

Shared block B5 of the diffusion family (spec card `diffusion.md` sections 12 and 15), used by
PTQ4DM (Shang et al., "Post-training Quantization on Diffusion Models", CVPR 2023,
arXiv:2211.15736) and QuEST (Wang et al., "QuEST: Low-bit Diffusion Model Quantization via
Efficient Selective Finetuning", 2024, arXiv:2402.03666). The pieces follow BRECQ (Li et al.,
"BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction", ICLR 2021,
arXiv:2102.05426) and AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020, arXiv:2004.10568), as in their shared QDrop/BRECQ code.

Uniform quantizer with step s (scale) and integer zero point z on b bits:

  q(x) = s (clip(round(x / s) + z, q_min, q_max) - z),
  symmetric: [q_min, q_max] = [-2^(b-1), 2^(b-1) - 1], z = 0, s = max|x| / q_max;
  asymmetric: [q_min, q_max] = [0, 2^b - 1], s = (max - min) / (2^b - 1), z = round(-min / s).

Gradients use the straight-through estimator on the rounding only (LSQ form, as BRECQ's
`round_ste`): dq/dx = 1 inside the clip range and 0 outside; dq/ds = round(x/s) - x/s inside
and q_min - z or q_max - z outside, so learned step sizes (QuEST) get the LSQ gradient.

Scales are per tensor or per channel (a `channel_axis` keeps that axis; weights of Linear
[in, out] and Conv [kh, kw, in, out] kernels are quantized per output channel, the last axis).
MSE scale search (BRECQ/QDrop `init_quantization_scale(..., 'mse')`): shrink the observed range
by alpha_k = 1 - k * step, k = 0..K-1 (default K = 80, step 0.01), quantize with each
candidate and keep the alpha with the smallest squared error (per channel when channel-wise).

AdaRound: W_q = s clip(floor(W / s) + h(V), q_min, q_max), with the rectified sigmoid
h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, V initialised
so that h(V) = W/s - floor(W/s) (the soft weights start at the float weights), the loss
||f(W_q) - f(W)||^2 + lambda sum(1 - |2 h(V) - 1|^beta) with lambda = 0.01, no regulariser in
the first 20% of iterations (warm-up) and beta annealed linearly 20 -> 2 afterwards; the final
weights round up where V >= 0 (a hard h).

Quantized UNet (`models/unet.py` is left as is). Weights: `quantize_unet_weights` is a pure
function over the params state that replaces every Linear/Conv kernel by its fake-quantized
value (per output channel, symmetric; the first and last layers, `conv_in` and `conv_out`,
at 8 bits as in PTQ4DM's `set_first_last_layer_to_8bit`). Activations: `add_act_quant` wraps
every `nnx.Linear`/`nnx.Conv` of the module graph in an `ActQuant` layer that fake-quantizes
the layer's *input* per tensor with a calibrated step (an `ActScale` variable), so the
network output is never quantized. The wrapper's static `mode` switches between float
("fp"), range observation, MSE observation over the K candidates, and quantized ("quant")
forwards; `calibrate_activations` runs the two observation passes over calibration batches
(jitted, streaming: no activation is stored) and sets each step to its MSE-best candidate.

Differences from the papers / official code:
* Activations are quantized at the input of every Linear/Conv (Q-Diffusion's placement)
  rather than at the output of each layer or block (BRECQ/QDrop, PTQ4DM's code); attention
  score and softmax-value matmuls, norms and the embedding tables stay in float.
* All activation quantizers are calibrated at once on the float model's activations, not
  sequentially with upstream layers already quantized as QDrop's `set_act_quantize_params`.
* The MSE search uses the squared error (p = 2) as PTQ4DM's paper states, not QDrop's
  L_2.4 default; the symmetric grid is the signed integer grid, where BRECQ uses 2^b levels
  over [-max, max].
* Per-timestep activation steps (QuEST's TimewiseUniformQuantizer): `to_timewise` swaps every
  `ActQuant` for a `TimewiseActQuant` whose step/zero point have shape [S], one per sampler
  timestep, gathered per sample at the index the caller sets with `set_time_index` (a
  `TimeIndex` variable, int32 [B]); its observation passes keep per-timestep ranges and MSE
  candidate errors, so `calibrate_activations` gives each timestep its own MSE step. The
  step is gathered per sample, so a batch may mix timesteps, where QuEST's code sets one
  current timestep per forward (`set_timestep`).
* Fake quantization only: no integer kernels, so nothing here is faster than float.
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# AdaRound's rectified-sigmoid stretch (Nagel et al. 2020, eq. 23).
ZETA, GAMMA = 1.1, -0.1
# Modes of an `ActQuant` layer.
MODES = ("fp", "observe_range", "observe_mse", "quant")
SCALE_METHODS = ("minmax", "mse")


class ActScale(nnx.Variable):
  """Calibrated activation quantization parameters (step size and zero point)."""


class ActStat(nnx.Variable):
  """Running calibration statistics of an activation quantizer (range, candidate errors)."""


# ------------------------------------------------------------------------------- quantizers


def int_range(bits: int, symmetric: bool = True) -> tuple[int, int]:
  """(q_min, q_max) of the b-bit integer grid: signed if symmetric, else unsigned."""
  if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 24:
    raise ValueError(f"bits must be an int in [1, 24]; got {bits!r}")
  if symmetric:
    if bits < 2:
      raise ValueError(f"symmetric quantization needs bits >= 2; got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


def round_ste(x: jax.Array) -> jax.Array:
  """round(x) forward, identity gradient (straight-through estimator)."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fake_quant(x: jax.Array, scale: jax.Array, zero_point: jax.Array | float = 0.0, *,
               bits: int, symmetric: bool = True) -> jax.Array:
  """Quantize-dequantize s (clip(round(x/s) + z, q_min, q_max) - z) with an STE.

  Args:
    x: float array of any shape.
    scale: positive step s, broadcastable to x ([] per tensor, e.g. [1, ..., C] per channel).
    zero_point: integer-valued z broadcastable to x (0 for symmetric).
    bits: b, the integer bit width.
    symmetric: signed grid [-2^(b-1), 2^(b-1) - 1] if True, else [0, 2^b - 1].

  Returns:
    Array of x's shape and dtype on the grid s (k - z), k integer in [q_min, q_max].
    Gradient: 1 inside the clip range, 0 outside; LSQ gradient for `scale`.
  """
  qmin, qmax = int_range(bits, symmetric)
  scale = jnp.asarray(scale, x.dtype)
  zero_point = jnp.asarray(zero_point, x.dtype)
  q = jnp.clip(round_ste(x / scale) + zero_point, qmin, qmax)
  return ((q - zero_point) * scale).astype(x.dtype)


def range_to_qparams(lo: jax.Array, hi: jax.Array, *, bits: int,
                     symmetric: bool = True) -> tuple[jax.Array, jax.Array]:
  """(scale, zero_point) that map the range [lo, hi] onto the b-bit grid.

  Args:
    lo, hi: float arrays of the same shape (per tensor [] or per channel).
    bits, symmetric: as in `fake_quant`.

  Returns:
    (scale > 0, integer-valued zero_point), both of lo's shape, float32.
  """
  qmin, qmax = int_range(bits, symmetric)
  lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
  if symmetric:
    scale = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / qmax
    zero_point = jnp.zeros_like(scale)
  else:
    # The range must contain 0 so that zero is exactly representable (padding, ReLU zeros).
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = (hi - lo) / (qmax - qmin)
  # A constant-zero tensor would give s = 0; any positive step represents it exactly.
  scale = jnp.maximum(scale, 1e-8)
  if not symmetric:
    zero_point = jnp.clip(jnp.round(-lo / scale), qmin, qmax)
  return scale, zero_point


def _reduce_axes(ndim: int, channel_axis: int | None) -> tuple[int, ...]:
  if channel_axis is None:
    return tuple(range(ndim))
  if not -ndim <= channel_axis < ndim:
    raise ValueError(f"channel_axis={channel_axis} is out of range for a {ndim}-D array")
  return tuple(a for a in range(ndim) if a != channel_axis % ndim)


def shrink_factors(num_candidates: int = 80, step: float = 0.01) -> np.ndarray:
  """The MSE search grid alpha_k = 1 - k step, k = 0..K-1 (QDrop: K = 80, step = 0.01)."""
  if num_candidates < 1 or step <= 0 or (num_candidates - 1) * step >= 1:
    raise ValueError(f"need num_candidates >= 1 and 0 < (num_candidates - 1) * step < 1; got "
                     f"num_candidates={num_candidates}, step={step}")
  return 1.0 - step * np.arange(num_candidates, dtype=np.float32)


def candidate_errors(x: jax.Array, lo: jax.Array, hi: jax.Array, alphas, *, bits: int,
                     symmetric: bool = True, reduce_axes: Sequence[int] = ()) -> jax.Array:
  """Summed squared quantization error of x for each shrunk range (alpha lo, alpha hi).

  Args:
    x: float array.
    lo, hi: range, broadcastable to x (keepdims shape for per-channel).
    alphas: [K] shrink factors.
    bits, symmetric: the quantizer.
    reduce_axes: axes of x summed over (the rest are kept: channels).

  Returns:
    float32 [K, *kept] errors; `lax.map` over K keeps one quantized copy of x alive.
  """
  x = jnp.asarray(x, jnp.float32)

  def one(alpha):
    scale, zp = range_to_qparams(alpha * lo, alpha * hi, bits=bits, symmetric=symmetric)
    err = (fake_quant(x, scale, zp, bits=bits, symmetric=symmetric) - x) ** 2
    return jnp.sum(err, axis=tuple(reduce_axes))

  return jax.lax.map(one, jnp.asarray(alphas, jnp.float32))


def quant_params(x: jax.Array, *, bits: int, symmetric: bool = True,
                 channel_axis: int | None = None, method: str = "mse",
                 num_candidates: int = 80, step: float = 0.01
                 ) -> tuple[jax.Array, jax.Array]:
  """Per-tensor or per-channel (scale, zero_point) of x by min-max or MSE search.

  Args:
    x: float array (a weight kernel, or a batch of activations).
    bits, symmetric: the quantizer.
    channel_axis: None for one scale; else the axis that keeps its own scale.
    method: "minmax" (the full range) or "mse" (the best shrink factor, see module doc).
    num_candidates, step: the MSE grid (`shrink_factors`).

  Returns:
    (scale, zero_point): shape [] per tensor; per channel x's rank with size 1 on every
    reduced axis, so they broadcast against x.
  """
  if method not in SCALE_METHODS:
    raise ValueError(f"method={method!r}; choose one of {SCALE_METHODS}")
  axes = _reduce_axes(jnp.ndim(x), channel_axis)
  x = jnp.asarray(x, jnp.float32)
  lo = jnp.min(x, axis=axes, keepdims=True)
  hi = jnp.max(x, axis=axes, keepdims=True)
  if method == "mse":
    alphas = jnp.asarray(shrink_factors(num_candidates, step))
    errs = candidate_errors(x, lo, hi, alphas, bits=bits, symmetric=symmetric,
                            reduce_axes=axes)
    best = alphas[jnp.argmin(errs, axis=0)]
    best = jnp.expand_dims(best, axes) if best.ndim else best
    lo, hi = lo * best, hi * best
  if channel_axis is None:
    lo, hi = lo.reshape(()), hi.reshape(())
  return range_to_qparams(lo, hi, bits=bits, symmetric=symmetric)


def quantize_weight(w: jax.Array, *, bits: int, method: str = "mse", num_candidates: int = 80,
                    step: float = 0.01) -> jax.Array:
  """Symmetric per-output-channel (last axis) fake quantization of a Linear/Conv kernel."""
  scale, _ = quant_params(w, bits=bits, channel_axis=-1, method=method,
                          num_candidates=num_candidates, step=step)
  return fake_quant(w, scale, bits=bits)


# --------------------------------------------------------------------------------- AdaRound


def rectified_sigmoid(v: jax.Array) -> jax.Array:
  """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), in [0, 1]."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround_init(w: jax.Array, scale: jax.Array) -> jax.Array:
  """V with h(V) = W/s - floor(W/s), so the soft-rounded weight starts at W (float32)."""
  rest = w / scale - jnp.floor(w / scale)
  return -jnp.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def adaround_weight(w: jax.Array, v: jax.Array, scale: jax.Array, *, bits: int,
                    soft: bool = True) -> jax.Array:
  """s clip(floor(W/s) + h, q_min, q_max): h = h(V) if soft, else the hard 1[V >= 0]."""
  qmin, qmax = int_range(bits, True)
  h = rectified_sigmoid(v) if soft else (v >= 0).astype(w.dtype)
  return scale * jnp.clip(jnp.floor(w / scale) + h, qmin, qmax)


def adaround_regularizer(v: jax.Array, beta: jax.Array | float) -> jax.Array:
  """sum(1 - |2 h(V) - 1|^beta): 0 when every h is 0 or 1, largest at h = 1/2."""
  return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


def beta_schedule(it: jax.Array | int, num_iters: int, b_range: tuple[float, float] = (20., 2.),
                  warmup: float = 0.2) -> jax.Array:
  """BRECQ's LinearTempDecay: b_start during warm-up, then linear to b_end at the last step."""
  start = warmup * num_iters
  rel = jnp.clip((jnp.asarray(it, jnp.float32) - start) / max(num_iters - start, 1.0), 0., 1.)
  return b_range[1] + (b_range[0] - b_range[1]) * (1.0 - rel)


def adaround_reconstruct(apply_fn: Callable[[jax.Array, Any], jax.Array], w: jax.Array,
                         scale: jax.Array, inputs: Any, targets: jax.Array, *, bits: int,
                         iters: int, learning_rate: float = 1e-3, weight: float = 0.01,
                         b_range: tuple[float, float] = (20., 2.), warmup: float = 0.2
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Learns the rounding of one layer/block weight by AdaRound (Adam on V, a `lax.scan`).

  Args:
    apply_fn: `apply_fn(w_q, inputs) -> outputs`, the layer or block with weight w_q.
    w: float kernel, e.g. [..., out]; scale: its step, broadcastable (per output channel).
    inputs: pytree of captured inputs; targets: the float layer's outputs on them.
    bits: weight bits; iters, learning_rate: Adam steps and step size on V.
    weight, b_range, warmup: regulariser weight lambda, beta annealing, warm-up fraction.

  Returns:
    (w_q, info): the hard-rounded kernel, or the nearest-rounded one if that reconstructs the
    targets better (so reconstruction never increases the output error), and info with
    `mse_nearest`, `mse_learned`, `loss` [iters].
  """
  if iters < 1:
    raise ValueError(f"iters must be >= 1; got {iters}")
  def mse(wq):
    # BRECQ's lp_loss: squared error summed over an example's features, mean over examples,
    # which sets the balance against the regulariser's weight 0.01.
    err = (apply_fn(wq, inputs) - targets) ** 2
    return jnp.mean(jnp.sum(err.reshape(err.shape[0], -1), axis=1))

  tx = optax.adam(learning_rate)
  v0 = adaround_init(w, scale)

  def loss_fn(v, it):
    rec = mse(adaround_weight(w, v, scale, bits=bits))
    reg = jnp.where(it < warmup * iters, 0.0,
                    weight * adaround_regularizer(v, beta_schedule(it, iters, b_range, warmup)))
    return rec + reg

  def step(carry, it):
    v, opt = carry
    loss, g = jax.value_and_grad(loss_fn)(v, it)
    upd, opt = tx.update(g, opt, v)
    return (optax.apply_updates(v, upd), opt), loss

  (v, _), losses = jax.lax.scan(step, (v0, tx.init(v0)), jnp.arange(iters))
  learned = adaround_weight(w, v, scale, bits=bits, soft=False)
  nearest = fake_quant(w, scale, bits=bits)
  m_learned, m_nearest = mse(learned), mse(nearest)
  w_q = jnp.where(m_learned <= m_nearest, learned, nearest)
  return w_q, {"mse_nearest": m_nearest, "mse_learned": m_learned, "loss": losses}


# ------------------------------------------------------------------------ quantized UNet


def leaf_paths(node: dict, prefix: tuple = ()):
  """Yields `(path, leaf)` for every leaf of a nested dict (e.g. `nnx.to_pure_dict`), path a
  tuple of keys, in insertion order."""
  for k, v in node.items():
    if isinstance(v, dict):
      yield from leaf_paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def kernel_paths(params: nnx.State) -> list[tuple]:
  """Paths (tuples of keys) of every Linear/Conv kernel in an NNX params state."""
  return [p for p, v in leaf_paths(nnx.to_pure_dict(params))
          if p[-1] == "kernel" and jnp.ndim(v) in (2, 4)]


@jax.jit(static_argnums=(1, 2, 3, 4))
def _quantize_kernels(kernels, bits, method, num_candidates, step):
  return tuple(quantize_weight(w, bits=b, method=method, num_candidates=num_candidates,
                               step=step) for w, b in zip(kernels, bits))


def quantize_unet_weights(params: nnx.State, bits: int, *, method: str = "mse",
                          first_last_bits: int | None = 8,
                          first_last: Sequence[str] = ("conv_in", "conv_out"),
                          num_candidates: int = 80, step: float = 0.01) -> nnx.State:
  """Fake-quantizes every Linear/Conv kernel of a UNet state per output channel.

  Pure: returns a new state (biases, norms, embeddings untouched). Layers whose path starts
  with a name in `first_last` use `first_last_bits` (None: `bits`), PTQ4DM's 8-bit head and
  stem rule.

  Args:
    params: NNX state of the float model (e.g. from `models.unet.init_unet`).
    bits: weight bit width of the other layers.
    method, num_candidates, step: scale search, as in `quant_params`.
    first_last_bits: bit width of the first and last layer (None: `bits`).
    first_last: top-level module names of those layers.

  Returns:
    A state of the same structure and dtypes.
  """
  pure = nnx.to_pure_dict(params)
  paths = kernel_paths(params)
  bits_each = tuple(first_last_bits if first_last_bits is not None and p[0] in first_last
                    else bits for p in paths)

  def get(p):
    node = pure
    for k in p:
      node = node[k]
    return node

  # One program for all kernels: one compile instead of one per kernel shape.
  quantized = _quantize_kernels(tuple(get(p) for p in paths), bits_each, method,
                                num_candidates, step)
  for p, w in zip(paths, quantized):
    get(p[:-1])[p[-1]] = w
  out = jax.tree.map(lambda x: x, params)  # fresh Variables; `params` is left untouched
  nnx.replace_by_pure_dict(out, pure)
  return out


class ActQuant(nnx.Module):
  """Wraps a Linear/Conv: fake-quantizes its input per tensor, then applies it.

  Static attributes (in the graphdef): `bits`, `symmetric`, `mode` (one of `MODES`) and the
  MSE grid; variables: `scale`/`zero_point` (`ActScale`) and `lo`/`hi`/`err` (`ActStat`).
  """

  def __init__(self, inner: nnx.Module, *, bits: int, symmetric: bool = True,
               num_candidates: int = 80, step: float = 0.01):
    int_range(bits, symmetric)
    self.inner = inner
    self.bits = bits
    self.symmetric = symmetric
    self.mode = "fp"
    self.alphas = tuple(float(a) for a in shrink_factors(num_candidates, step))
    self.scale = ActScale(jnp.ones((), jnp.float32))
    self.zero_point = ActScale(jnp.zeros((), jnp.float32))
    self.lo = ActStat(jnp.full((), jnp.inf, jnp.float32))
    self.hi = ActStat(jnp.full((), -jnp.inf, jnp.float32))
    self.err = ActStat(jnp.zeros((num_candidates,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., in] (NHWC for Conv) -> the inner layer's output on the (quantized) input."""
    if self.mode == "quant":
      x = fake_quant(x, self.scale[...], self.zero_point[...], bits=self.bits,
                     symmetric=self.symmetric)
    elif self.mode == "observe_range":
      xf = jnp.asarray(x, jnp.float32)
      self.lo[...] = jnp.minimum(self.lo[...], jnp.min(xf))
      self.hi[...] = jnp.maximum(self.hi[...], jnp.max(xf))
    elif self.mode == "observe_mse":
      self.err[...] = self.err[...] + candidate_errors(
          x, self.lo[...], self.hi[...], self.alphas, bits=self.bits, symmetric=self.symmetric,
          reduce_axes=tuple(range(jnp.ndim(x))))
    return self.inner(x)

  def finalize(self, method: str = "mse") -> None:
    """Sets scale/zero_point from the observed range (minmax) or the best candidate (mse)."""
    lo, hi = self.lo[...], self.hi[...]
    if method == "mse":
      alpha = jnp.asarray(self.alphas)[jnp.argmin(self.err[...])]
      lo, hi = alpha * lo, alpha * hi
    scale, zp = range_to_qparams(lo, hi, bits=self.bits, symmetric=self.symmetric)
    self.scale[...], self.zero_point[...] = scale, zp


def _is_quantizable(m) -> bool:
  return isinstance(m, (nnx.Linear, nnx.Conv))


def add_act_quant(graphdef: nnx.GraphDef, params: nnx.State, bits: int, *,
                  bits_for: Callable[[tuple], int | None] | None = None,
                  symmetric: bool = True, num_candidates: int = 80, step: float = 0.01
                  ) -> tuple[nnx.GraphDef, nnx.State]:
  """Wraps every nnx.Linear/nnx.Conv of a model in an `ActQuant` (input quantization).

  The wrapped model has the same methods (`encode`, `decode`, `__call__` for the UNet), so
  `models.unet.make_model_fn(*add_act_quant(...))` is a drop-in model. Wrappers start in
  mode "fp" (bit-identical to the float model) and move a kernel `k` to `k.inner.kernel`.

  Args:
    graphdef, params: the split float model.
    bits: activation bit width.
    bits_for: optional `path -> bits` override (None keeps `bits`; e.g. 8 for the first
      layer's path ("conv_in",)).
    symmetric: signed per-tensor grid (PTQ4DM) or unsigned with a zero point.
    num_candidates, step: the MSE grid for `calibrate_activations`.

  Returns:
    (graphdef, state) of the wrapped model.
  """
  model = nnx.merge(graphdef, params)
  targets = [(p, m) for p, m in nnx.iter_modules(model) if _is_quantizable(m) and p]
  for path, layer in targets:
    parent = model
    for k in path[:-1]:
      parent = parent[k] if isinstance(k, int) else getattr(parent, k)
    b = bits_for(tuple(path)) if bits_for is not None else None
    wrapped = ActQuant(layer, bits=bits if b is None else b, symmetric=symmetric,
                       num_candidates=num_candidates, step=step)
    if isinstance(path[-1], int):
      parent[path[-1]] = wrapped
    else:
      setattr(parent, path[-1], wrapped)
  return nnx.split(model)


def act_quant_paths(graphdef: nnx.GraphDef, state: nnx.State) -> list[tuple]:
  """Paths of the `ActQuant` layers of a wrapped model, in module-graph order."""
  return [tuple(p) for p, m in nnx.iter_modules(nnx.merge(graphdef, state))
          if isinstance(m, ActQuant)]


def set_act_mode(graphdef: nnx.GraphDef, state: nnx.State, mode: str) -> nnx.GraphDef:
  """The graphdef with every `ActQuant` in `mode` ("fp", "quant", ...); state unchanged."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; choose one of {MODES}")
  model = nnx.merge(graphdef, state)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, ActQuant):
      m.mode = mode
  return nnx.split(model)[0]


@jax.jit(static_argnums=(0, 3))
def _observe(graphdef, state, batch, forward):
  """One observation forward; graphdef and forward are static, so equal models (same
  structure, bits and mode) share one compilation across calibration runs."""
  model = nnx.merge(graphdef, state)
  forward(model, batch)
  return nnx.state(model)


def calibrate_activations(graphdef: nnx.GraphDef, state: nnx.State, batches: Iterable[Any],
                          forward: Callable[[nnx.Module, Any], Any], *,
                          method: str = "mse") -> tuple[nnx.GraphDef, nnx.State]:
  """Calibrates every activation step on float activations; returns the "quant" model.

  Pass 1 records each input's range over all batches; pass 2 (method "mse") sums each
  candidate's squared error over all batches; `ActQuant.finalize` picks the step. Both
  passes are jitted per batch shape and store no activations.

  Args:
    graphdef, state: a model from `add_act_quant`.
    batches: iterable (re-iterated for the second pass: use a list) of model inputs.
    forward: `forward(model, batch)` runs the merged model on one batch; a hashable,
      long-lived callable (e.g. a module-level function), as it is a static jit argument.
    method: "minmax" or "mse".

  Returns:
    (graphdef in mode "quant", calibrated state).
  """
  if method not in SCALE_METHODS:
    raise ValueError(f"method={method!r}; choose one of {SCALE_METHODS}")
  batches = list(batches)
  if not batches:
    raise ValueError("batches must hold at least one calibration batch")
  # Reset the statistics so a state can be re-calibrated.
  model = nnx.merge(graphdef, state)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, ActQuant):
      m.lo[...] = jnp.full((), jnp.inf)
      m.hi[...] = jnp.full((), -jnp.inf)
      m.err[...] = jnp.zeros_like(m.err[...])
  graphdef, state = nnx.split(model)
  for mode in ("observe_range", "observe_mse")[:1 + (method == "mse")]:
    g = set_act_mode(graphdef, state, mode)
    for batch in batches:
      state = _observe(g, state, batch, forward)
  model = nnx.merge(graphdef, state)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, ActQuant):
      m.finalize(method)
      m.mode = "quant"
  return nnx.split(model)


# ------------------------------------------------------------- time-wise activation steps


class TimeIndex(nnx.Variable):
  """Per-sample timestep index (int32 [B]) read by a `TimewiseActQuant`; set per call."""


class TimewiseActQuant(ActQuant):
  """An `ActQuant` with one step (and zero point) per sampler timestep (QuEST).

  Variables: `scale`/`zero_point` [S] (`ActScale`), `lo`/`hi` [S] and `err` [S, K]
  (`ActStat`), `t_index` int32 [B] (`TimeIndex`). Sample b of a batch is quantized with
  step `scale[t_index[b]]`, so one batch may mix timesteps. With all S steps equal the
  layer is the per-tensor `ActQuant` exactly.
  """

  def __init__(self, inner: nnx.Module, *, bits: int, num_steps: int, symmetric: bool = True,
               num_candidates: int = 80, step: float = 0.01):
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
      raise ValueError(f"num_steps must be an int >= 1; got {num_steps!r}")
    super().__init__(inner, bits=bits, symmetric=symmetric, num_candidates=num_candidates,
                     step=step)
    self.num_steps = int(num_steps)
    self.scale = ActScale(jnp.ones((num_steps,), jnp.float32))
    self.zero_point = ActScale(jnp.zeros((num_steps,), jnp.float32))
    self.lo = ActStat(jnp.full((num_steps,), jnp.inf, jnp.float32))
    self.hi = ActStat(jnp.full((num_steps,), -jnp.inf, jnp.float32))
    self.err = ActStat(jnp.zeros((num_steps, num_candidates), jnp.float32))
    self.t_index = TimeIndex(jnp.zeros((1,), jnp.int32))

  def _per_sample(self, v: jax.Array, x: jax.Array) -> jax.Array:
    """v [S] gathered at each sample's index and shaped [B, 1, ..., 1] to broadcast on x."""
    idx = jnp.broadcast_to(self.t_index[...], (x.shape[0],))
    return v[idx].reshape((x.shape[0],) + (1,) * (x.ndim - 1))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, ..., in] -> the inner layer's output on the (per-timestep quantized) input."""
    if self.mode == "fp":
      return self.inner(x)
    idx = jnp.broadcast_to(self.t_index[...], (x.shape[0],))
    axes = tuple(range(1, x.ndim))
    if self.mode == "quant":
      x = fake_quant(x, self._per_sample(self.scale[...], x),
                     self._per_sample(self.zero_point[...], x), bits=self.bits,
                     symmetric=self.symmetric)
    elif self.mode == "observe_range":
      xf = jnp.asarray(x, jnp.float32)
      # Empty segments give +inf / -inf: the running extremes are left as they were.
      self.lo[...] = jnp.minimum(self.lo[...], jax.ops.segment_min(
          jnp.min(xf, axis=axes), idx, num_segments=self.num_steps))
      self.hi[...] = jnp.maximum(self.hi[...], jax.ops.segment_max(
          jnp.max(xf, axis=axes), idx, num_segments=self.num_steps))
    elif self.mode == "observe_mse":
      lo, hi = self._observed_range()
      errs = candidate_errors(x, self._per_sample(lo, x), self._per_sample(hi, x), self.alphas,
                              bits=self.bits, symmetric=self.symmetric, reduce_axes=axes)
      self.err[...] = self.err[...] + jax.ops.segment_sum(errs.T, idx,
                                                          num_segments=self.num_steps)
    return self.inner(x)

  def _observed_range(self) -> tuple[jax.Array, jax.Array]:
    """Per-step ranges; steps never observed fall back to the range over all steps."""
    lo, hi = self.lo[...], self.hi[...]
    seen = jnp.isfinite(lo) & jnp.isfinite(hi)
    all_lo = jnp.min(jnp.where(seen, lo, jnp.inf))
    all_hi = jnp.max(jnp.where(seen, hi, -jnp.inf))
    # Nothing observed at all: an arbitrary finite range (the step is never used).
    all_lo, all_hi = jnp.where(jnp.any(seen), all_lo, -1.0), jnp.where(jnp.any(seen), all_hi, 1.)
    return jnp.where(seen, lo, all_lo), jnp.where(seen, hi, all_hi)

  def finalize(self, method: str = "mse") -> None:
    """Sets every step's scale/zero_point from its range (minmax) or best candidate (mse)."""
    lo, hi = self._observed_range()
    if method == "mse":
      alpha = jnp.asarray(self.alphas)[jnp.argmin(self.err[...], axis=1)]
      lo, hi = alpha * lo, alpha * hi
    scale, zp = range_to_qparams(lo, hi, bits=self.bits, symmetric=self.symmetric)
    self.scale[...], self.zero_point[...] = scale, zp


def _set_child(model: nnx.Module, path: tuple, child: nnx.Module) -> None:
  parent = model
  for k in path[:-1]:
    parent = parent[k] if isinstance(k, int) else getattr(parent, k)
  if isinstance(path[-1], int):
    parent[path[-1]] = child
  else:
    setattr(parent, path[-1], child)


def to_timewise(graphdef: nnx.GraphDef, state: nnx.State, num_steps: int
                ) -> tuple[nnx.GraphDef, nnx.State]:
  """Replaces every per-tensor `ActQuant` by a `TimewiseActQuant` with S = num_steps steps.

  Each new step table starts as S copies of the layer's current step and zero point (and
  the same mode), so a calibrated model keeps its outputs exactly until the steps are
  re-calibrated per timestep (`calibrate_activations`) or trained.

  Args:
    graphdef, state: a model from `add_act_quant` (calibrated or not).
    num_steps: S, the number of sampler timesteps.

  Returns:
    (graphdef, state) of the time-wise model; set the index with `set_time_index`.
  """
  model = nnx.merge(graphdef, state)
  targets = [(tuple(p), m) for p, m in nnx.iter_modules(model)
             if type(m) is ActQuant]  # pylint: disable=unidiomatic-typecheck
  if not targets:
    raise ValueError("the model has no per-tensor ActQuant layer (use add_act_quant first)")
  for path, m in targets:
    grid_step = m.alphas[0] - m.alphas[1] if len(m.alphas) > 1 else 0.01
    tw = TimewiseActQuant(m.inner, bits=m.bits, num_steps=num_steps, symmetric=m.symmetric,
                          num_candidates=len(m.alphas), step=grid_step)
    tw.alphas = m.alphas  # exactly the same MSE grid
    tw.mode = m.mode
    tw.scale[...] = jnp.broadcast_to(m.scale[...], (num_steps,))
    tw.zero_point[...] = jnp.broadcast_to(m.zero_point[...], (num_steps,))
    _set_child(model, path, tw)
  return nnx.split(model)


def set_time_index(model: nnx.Module, t_index: jax.Array) -> None:
  """Sets the timestep index (int [B] or a scalar) of every `TimewiseActQuant` in place."""
  t_index = jnp.atleast_1d(jnp.asarray(t_index, jnp.int32))
  if t_index.ndim != 1:
    raise ValueError(f"t_index must be a scalar or [B]; got shape {t_index.shape}")
  for _, m in nnx.iter_modules(model):
    if isinstance(m, TimewiseActQuant):
      m.t_index.set_value(t_index)


def timestep_index(t: jax.Array, timesteps: jax.Array) -> jax.Array:
  """Index of the grid entry nearest to each t: int32 [B] for t [B] and a grid [S]."""
  t = jnp.asarray(t)
  grid = jnp.asarray(timesteps)
  return jnp.argmin(jnp.abs(grid[None, :].astype(jnp.float32)
                            - t.reshape(-1, 1).astype(jnp.float32)), axis=1).astype(jnp.int32)
