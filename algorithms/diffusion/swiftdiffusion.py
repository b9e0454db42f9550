"""SwiftDiffusion's serving-side model mechanics: bounded asynchronous LoRA, split ControlNet,
latent-parallel classifier-free guidance.

Li, Suyi, Lingyun Yang, Xiaoxiao Jiang, Hanfeng Lu, Dakai An, Zhipeng Di, Weiyi Lu, Jiawei
Chen, Kan Liu, Yinghao Yu, Tao Lan, Guodong Yang, Lin Qu, Liping Zhang and Wei Wang,
"SwiftDiffusion: Efficient Diffusion Model Serving with Add-on Modules", 2024,
arXiv:2407.02031 (v1 and v2; later at ATC'25 as "Katz"). No public code exists; this module
follows the paper's text and the spec card `diffusion.md` section 3. The serving simulator
that turns these mechanics into latency and throughput lives in `serving_sim.py`.

Method (the three ML-visible pieces of the system; the rest is scheduling):

* Bounded asynchronous LoRA loading (BAL). The request starts denoising with the base UNet
  while its LoRA weights load, and patches them in once loaded, no later than step k. In the
  UNet every adapted layer computes y = x W + b + s (x A) B (`models.unet.LoRALinear`), so
  patching is a per-step gate g_i = [i >= k] on the adapter:

      y_i = x W + b + s (x A) (g_i B),      eps_i = eps_theta(x_{t_i}, t_i, c; g_i),

  inside the jitted `lax.scan` sampler (`jnp.where(i >= k, B, 0)`; k is a traced value, so
  one compiled program serves every k). k = 0 is the always-on LoRA, k >= N the base model.
  Because the DDIM grid is strictly decreasing, i >= k is the same as t_i <= t_k, so the gate
  is applied from the timestep the shared samplers already pass to `model_fn`.
* ControlNet-as-a-service. A ControlNet (Zhang et al., "Adding Conditional Control to
  Text-to-Image Diffusion Models", 2023, arXiv:2302.05543) is a trainable copy of the UNet
  encoder E' that also sees a hint image z through a zero-initialised conv Z_in; zero 1x1
  convs Z_j map its outputs to residuals added to the base UNet's skips and bottleneck:

      (h', s'_1..s'_m) = E'(x, t, c; conv_in'(x) + Z_in(z)),
      eps = D(h + Z_mid(h'), (s_j + Z_j(s'_j))_j, t, c),   (h, s) = E(x, t, c).

  The residuals do not depend on the base UNet, so SwiftDiffusion computes them on separate
  GPUs in parallel with E and ships them to the base UNet's decoder each step. Here
  `controlnet_residuals` is its own jitted function that can run on another device, and
  `unet_with_residuals` adds what it receives; the result equals the in-graph ControlNet.
  Several ControlNets sum their residuals (diffusers' MultiControlNet).
* Latent parallelism. Classifier-free guidance eps = u + w (c - u) needs the unconditional
  and the conditional branch; instead of one batch of 2B on one GPU the two branches run on
  the two devices of a mesh axis `cfg` (`jax.shard_map`), each on B latents.

Differences from the paper:
* Toy scale: the 16x16 pixel-space UNet of the family (`models.unet`), not SDXL / SD-1.5.
* The ControlNet copies the toy UNet's encoder (conv_in, down levels, mid block) with the
  same block classes; its hint path is one 3x3 conv + SiLU + a zero 3x3 conv at full
  resolution (SD's ControlNet uses an 8-conv hint encoder down to latent resolution).
* "Patching" a LoRA here gates the unmerged adapter branch (exactly the LoRA function); the
  paper patches merged weights in place with its own kernels. `models.unet.merge_lora`
  gives the merged form; the tests check both are the same function.
* Kernel-level optimisations of the paper (fused kernels, CUDA graphs) are out of scope.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrepro.algorithms.diffusion import samplers
from jaxrepro.models import unet as unet_lib

# --------------------------------------------------------------------------- BAL (LoRA)


def _is_lora_b(path) -> bool:
  return any(getattr(k, "key", None) == "lora_b" for k in path)


def gate_lora(params: nnx.State, on: jax.Array | bool) -> nnx.State:
  """The UNet state with every adapter switched on (`on` true) or off (exactly the base).

  Zeroing B removes the adapter branch s (x A) B exactly, so "off" is bit-for-bit the base
  model's function and "on" leaves the state unchanged.

  Args:
    params: a UNet state (`init_unet`), adapters included.
    on: bool scalar (may be traced).

  Returns:
    A state of the same structure and dtypes.
  """
  on = jnp.asarray(on)
  if on.shape != ():
    raise ValueError(f"on must be a scalar; got shape {on.shape}")
  return jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.where(on, v, jnp.zeros_like(v)) if _is_lora_b(path) else v, params)


def lora_switch_timestep(timesteps: jax.Array, lora_start_step: jax.Array | int) -> jax.Array:
  """The timestep t_k from which the adapter is on; -1 (never) when k >= N.

  Args:
    timesteps: int32 [N] strictly decreasing sampling grid.
    lora_start_step: int scalar k >= 0 (may be traced).

  Returns:
    int32 scalar: step i has the adapter on iff timesteps[i] <= the returned value.
  """
  timesteps = jnp.asarray(timesteps, jnp.int32)
  n = timesteps.shape[0]
  k = jnp.asarray(lora_start_step, jnp.int32)
  return jnp.where(k < n, timesteps[jnp.clip(k, 0, n - 1)], -1).astype(jnp.int32)


def bal_model_fn(graphdef: nnx.GraphDef, params: nnx.State, switch_t: jax.Array):
  """`model_fn(x, t, cond)` whose LoRA adapters are on iff t <= switch_t.

  Args:
    graphdef, params: a UNet with adapters (`lora_rank > 0`).
    switch_t: int32 scalar from `lora_switch_timestep`.

  Returns:
    model_fn(x [B, H, W, C], t int32 [B] (one value per call, as the samplers pass it),
    cond) -> eps [B, H, W, C] float32.
  """
  def model_fn(x, t, cond):
    return unet_lib.apply_unet(graphdef, gate_lora(params, t[0] <= switch_t), x, t, cond)
  return model_fn


def _check_decreasing(timesteps):
  try:
    ts = jax.device_get(timesteps)
  except jax.errors.ConcretizationTypeError:
    return  # traced grid: the caller vouches for it
  if ts.ndim != 1 or ts.shape[0] < 1 or (ts[1:] >= ts[:-1]).any():
    raise ValueError(f"timesteps must be a strictly decreasing [N] grid; got {ts}")


def bal_ddim(graphdef: nnx.GraphDef, params: nnx.State, x_init: jax.Array, cond: Any,
             alphas_cumprod: jax.Array, timesteps: jax.Array, lora_start_step, *,
             guidance: float | None = None, null_cond: Any = None,
             clip_x0: float | None = None) -> jax.Array:
  """DDIM (eta 0) with the LoRA patched in from step `lora_start_step` (BAL).

  One `lax.scan` (`samplers.ddim`); jit at the call site. `lora_start_step` may be traced,
  so a single compilation serves every k.

  Args:
    graphdef, params: the UNet with its (trained) adapters.
    x_init: float32 [B, H, W, C] initial noise.
    cond: the prompt (int32 tokens [B, L] or float context [B, L, D]).
    alphas_cumprod: float32 [T].
    timesteps: int32 [N] strictly decreasing grid (`schedules.make_timesteps`).
    lora_start_step: int k >= 0; k = 0 is always-on LoRA, k >= N the base model.
    guidance: CFG scale (None: no guidance).
    null_cond: the empty prompt for CFG (required with `guidance`).
    clip_x0: clip x_0 predictions to [-clip_x0, clip_x0] (None: off).

  Returns:
    float32 [B, H, W, C] samples.
  """
  _check_decreasing(timesteps)
  if isinstance(lora_start_step, int) and lora_start_step < 0:
    raise ValueError(f"lora_start_step must be >= 0; got {lora_start_step}")
  fn = bal_model_fn(graphdef, params, lora_switch_timestep(timesteps, lora_start_step))
  if guidance is not None:
    if null_cond is None:
      raise ValueError("null_cond is required when guidance is set")
    fn = samplers.cfg(fn, guidance, null_cond)
  return samplers.ddim(fn, x_init, cond, alphas_cumprod, timesteps, clip_x0=clip_x0)


# --------------------------------------------------------------------------- ControlNet


class Residuals(NamedTuple):
  """ControlNet outputs added to the base UNet: `mid` like the bottleneck [B, h, w, c] and
  `skips`, a tuple shaped like `UNet.encode`'s skips."""
  mid: jax.Array
  skips: tuple[jax.Array, ...]


def _zero_conv(cin: int, cout: int, kernel: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  # Zhang et al.'s zero convolution: weight and bias start at zero, so a fresh ControlNet
  # leaves the base model unchanged.
  return nnx.Conv(cin, cout, kernel_size=(kernel, kernel), padding="SAME", dtype=dtype,
                  kernel_init=nnx.initializers.zeros, bias_init=nnx.initializers.zeros,
                  rngs=rngs)


class ControlNet(nnx.Module):
  """A trainable copy of the UNet encoder with a hint input and zero-conv outputs.

  Its encoder sub-modules carry the UNet's attribute names (`conv_in`, `down`, `downsample`,
  `mid_res1`, `mid_attn`, `mid_res2`, `time_in`, `time_out`, token embeddings), so
  `controlnet_from_unet` can copy the base weights into it, as Zhang et al. initialise it.
  """

  def __init__(self, cfg: unet_lib.UNetConfig, *, hint_channels: int = 1,
               hint_width: int = 16, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    # The UNet's own encoder constructor: same attribute names and parameter paths.
    skip_dims = unet_lib.build_encoder(self, cfg, rngs)
    prev = cfg.widths[-1]
    conv = dict(kernel_size=(3, 3), padding="SAME", dtype=dtype, rngs=rngs)
    self.hint_conv = nnx.Conv(hint_channels, hint_width, **conv)
    self.hint_out = _zero_conv(hint_width, cfg.widths[0], 3, dtype, rngs)
    self.zero_skips = nnx.List([_zero_conv(d, d, 1, dtype, rngs) for d in skip_dims])
    self.zero_mid = _zero_conv(prev, prev, 1, dtype, rngs)

  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array,
               hint: jax.Array) -> Residuals:
    """x [B, H, W, C], t [B], context (as `UNet.encode`), hint [B, H, W, hint_channels]."""
    cfg = self.cfg
    if hint.ndim != 4 or hint.shape[:3] != x.shape[:3]:
      raise ValueError(f"hint must be [B, H, W, hint_channels] matching x {x.shape}; got "
                       f"{hint.shape}")
    hint_h = self.hint_out(jax.nn.silu(self.hint_conv(hint.astype(jnp.dtype(cfg.dtype)))))
    h, skips = unet_lib.run_encoder(self, x, t, context, inject=hint_h)
    return Residuals(self.zero_mid(h), tuple(z(s) for z, s in zip(self.zero_skips, skips)))


def init_controlnet(cfg: unet_lib.UNetConfig, key: jax.Array, *, hint_channels: int = 1
                    ) -> tuple[nnx.GraphDef, nnx.State]:
  """A randomly initialised ControlNet, split: (graphdef, params)."""
  return nnx.split(ControlNet(cfg, hint_channels=hint_channels, rngs=nnx.Rngs(params=key)))


def controlnet_from_unet(cn_params: nnx.State, unet_params: nnx.State) -> nnx.State:
  """ControlNet params whose encoder copy holds the base UNet's weights (Zhang et al.).

  Every entry of `cn_params` that also exists in the UNet (same path and shape) is replaced;
  the hint path and the zero convs are kept.
  """
  cn = nnx.to_pure_dict(cn_params)
  base = nnx.to_pure_dict(unet_params)

  def copy(c, b):
    if isinstance(c, dict):
      return {k: copy(v, b[k]) if isinstance(b, dict) and k in b else v for k, v in c.items()}
    return b if getattr(b, "shape", None) == c.shape else c

  out = jax.tree.map(lambda v: v, cn_params)
  nnx.replace_by_pure_dict(out, copy(cn, base))
  return out


def controlnet_residuals(cn_graphdef: nnx.GraphDef, cn_params: nnx.State, x: jax.Array,
                         t: jax.Array, context: jax.Array, hint: jax.Array,
                         scale: float | jax.Array = 1.0) -> Residuals:
  """Functional ControlNet: residuals for the base UNet (scaled by the conditioning scale)."""
  r = nnx.merge(cn_graphdef, cn_params)(x, t, context, hint)
  return jax.tree.map(lambda a: scale * a, r)


def sum_residuals(residuals: list[Residuals]) -> Residuals:
  """Sum of several ControlNets' residuals (diffusers' MultiControlNet)."""
  if not residuals:
    raise ValueError("residuals must hold at least one Residuals")
  return jax.tree.map(lambda *a: sum(a[1:], a[0]), *residuals)


def unet_with_residuals(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array,
                        t: jax.Array, context: jax.Array,
                        residuals: Residuals | None) -> jax.Array:
  """The base UNet with ControlNet residuals added to its bottleneck and skips.

  Args:
    graphdef, params: the base UNet.
    x, t, context: as `UNet.__call__`.
    residuals: from `controlnet_residuals` (possibly computed elsewhere) or None.

  Returns:
    [B, H, W, C_out] float32 prediction.
  """
  h, skips = unet_lib.unet_encode(graphdef, params, x, t, context)
  if residuals is not None:
    if len(residuals.skips) != len(skips):
      raise ValueError(f"residuals has {len(residuals.skips)} skips; the UNet has "
                       f"{len(skips)}")
    h = h + residuals.mid.astype(h.dtype)
    skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, residuals.skips))
  return unet_lib.unet_decode(graphdef, params, h, skips, t, context)


def controlnet_model_fn(graphdef: nnx.GraphDef, params: nnx.State,
                        controlnets: list[tuple[nnx.GraphDef, nnx.State]], hints: list,
                        scale: float = 1.0):
  """In-graph `model_fn(x, t, cond)`: base UNet plus every ControlNet in one program.

  This is the baseline's "load-then-run on one GPU" computation; `remote_controlnet_step`
  splits it across devices with the same result.
  """
  if len(controlnets) != len(hints):
    raise ValueError(f"got {len(controlnets)} controlnets but {len(hints)} hints")

  def model_fn(x, t, cond):
    res = None
    if controlnets:
      res = sum_residuals([controlnet_residuals(g, p, x, t, cond, z, scale)
                           for (g, p), z in zip(controlnets, hints)])
    return unet_with_residuals(graphdef, params, x, t, cond, res)
  return model_fn


def remote_controlnet_step(graphdef: nnx.GraphDef, cn_graphdef: nnx.GraphDef,
                           unet_device: jax.Device, controlnet_device: jax.Device):
  """ControlNet-as-a-service for one denoising step: two jitted programs on two devices.

  Returns `step(params, cn_params, x, t, context, hint, scale) -> eps`: the residuals are
  computed by a jitted ControlNet whose inputs are placed on `controlnet_device`, shipped to
  `unet_device` (`jax.device_put`) and added by the jitted base UNet there. JAX dispatches
  asynchronously, so the two programs can overlap when the caller issues the next request's
  work; the point here is that the result equals `controlnet_model_fn`.
  """
  residuals = jax.jit(lambda p, x, t, c, z, s: controlnet_residuals(cn_graphdef, p, x, t, c,
                                                                   z, s))
  unet = jax.jit(lambda p, x, t, c, r: unet_with_residuals(graphdef, p, x, t, c, r))

  def step(params, cn_params, x, t, context, hint, scale=1.0):
    on_cn = jax.device_put((cn_params, x, t, context, hint, jnp.float32(scale)),
                           controlnet_device)
    res = jax.device_put(residuals(*on_cn), unet_device)
    on_unet = jax.device_put((params, x, t, context), unet_device)
    return unet(on_unet[0], on_unet[1], on_unet[2], on_unet[3], res)
  return step


# ------------------------------------------------------------------ latent parallelism


def latent_parallel_cfg(model_fn, scale: float | jax.Array, null_cond: Any,
                        mesh: jax.sharding.Mesh, axis_name: str = "cfg"):
  """Classifier-free guidance with the two branches on the two devices of `axis_name`.

  Same contract as `samplers.cfg` (eps = u + w (c - u)), but instead of one call on 2B
  latents, device 0 of the axis evaluates the unconditional branch and device 1 the
  conditional one, each on B latents (`jax.shard_map`); the combination reads both results.

  Args:
    model_fn: `model_fn(x, t, cond)`; may close over (replicated) parameters.
    scale: guidance weight w.
    null_cond: the empty condition (broadcast to cond's shapes).
    mesh: a mesh with an axis `axis_name` of size 2.
    axis_name: the mesh axis of the two branches.

  Returns:
    guided `model_fn(x, t, cond)`.
  """
  if axis_name not in mesh.shape or mesh.shape[axis_name] != 2:
    raise ValueError(f"mesh must have an axis {axis_name!r} of size 2; got {dict(mesh.shape)}")

  def branch(x, t, c):
    # Each device holds one leading slot of size 1: its own branch.
    out = model_fn(x[0], t[0], jax.tree.map(lambda a: a[0], c))
    return out[None]

  run = jax.shard_map(branch, mesh=mesh, in_specs=P(axis_name), out_specs=P(axis_name),
                      axis_names={axis_name})

  def guided(x, t, cond):
    null = jax.tree.map(lambda nc, c: jnp.broadcast_to(nc, c.shape).astype(c.dtype),
                        null_cond, cond)
    both = jax.tree.map(lambda nc, c: jnp.stack([nc, c]), null, cond)
    # Branch b of every input lives on device b of the axis (the "ship to GPU b" step).
    split = lambda a: jax.sharding.reshard(a, NamedSharding(mesh, P(axis_name)))
    out = run(*jax.tree.map(split, (jnp.stack([x, x]), jnp.stack([t, t]), both)))
    # Ship both branches' predictions back (an all-gather of B latents) and combine.
    out = jax.sharding.reshard(out, NamedSharding(mesh, P()))
    u, c = out[0], out[1]
    return u + scale * (c - u)
  return guided
