"""QuEST: low-bit diffusion quantization by time-wise activation steps and selective fine-tuning.

Wang, Shang, Yuan, Wu & Yan, "QuEST: Low-bit Diffusion Model Quantization via Efficient
Selective Finetuning", 2024, arXiv:2402.03666; official code `hatchetProject/QuEST`
(`qdiff/post_layer_recon_{imagenet,uncond,sd}.py`, `qdiff/quant_layer.py`), built on
Q-Diffusion. The quantizers are the shared `fake_quant` module (block B5); the baseline is
PTQ4DM/Q-Diffusion-style PTQ (`ptq4dm.quantize_unet`).

Method. Start from a PTQ model (weights per output channel, activations per tensor, steps by
MSE, calibrated on the float sampler's trajectory). Then:

1. Time-wise activation quantizers (TimewiseUniformQuantizer): every activation quantizer gets
   one step Delta_t (and zero point) per sampler timestep t,
     x_q = Delta_t clip(round(x / Delta_t), q_min, q_max),
   initialised by the per-timestep MSE search on the calibration states of that timestep
   (`fake_quant.TimewiseActQuant`, `calibrate_timewise`).
2. Stage 1 (temporal information): fine-tune only the time-embedding layers (weights,
   biases) and their activation steps by distillation from the float model,
     L_1 = mean_k MSE(e_k^q(t), e_k^fp(t)) + MSE(eps_q(x_t, t), eps_fp(x_t, t)),
   where e_k are the outputs of the time-embedding projections (`time_proj`, LDM's
   `emb_layers`), one batch per calibration timestep.
3. Stage 2 (sensitive layers): fine-tune the attention/feed-forward weights named by the
   card (`STAGE2_LAYERS`) with Adam lr_w and, with Adam lr_delta, the per-timestep steps of
   every activation quantizer except the time-embedding ones,
     L_2 = MSE(eps_q(x_t, t), eps_fp(x_t, t)),
   cycling over the calibration timesteps (one batch per timestep).
Trained weights stay fake-quantized in the forward pass, W_q = fake_quant(W, s_w) with the
PTQ step s_w fixed, and get the straight-through gradient (`fake_quant.round_ste`); the
steps Delta_t get the LSQ gradient. Selection is an `optax.multi_transform` over labels
"weight" / "delta" / "frozen" with `optax.set_to_zero` on "frozen", so every other value of
the model is bit-identical after training.

Parameters are a pure dict (`nnx.to_pure_dict` of the Param and ActScale variables of the
quantized model); trainable kernels hold their float weights, frozen ones their quantized
values. `QuantSpec` (static: graphdef, paths of the float kernels, bits) rebuilds the model.

Differences from the paper / official code (checked against `post_layer_recon_*.py`):
* Stage-2 layers follow the class-conditional LDM code (`post_layer_recon_imagenet.py`):
  `ff.net` (our `mlp_up`/`mlp_down`), every `to_q` (self and cross `query`) and the
  self-attention `to_k`/`to_v`. `"qkv"` (unconditional LDM) and `"ff"` (the SD file) are the
  alternatives. Only the output MSE is used in stage 2, as in the LDM files (the hooked-layer
  MSE is commented out there; the SD file keeps it).
* Stage 1 trains `time_proj` (LDM `emb_layers`) and, by default, also the global time MLP
  (`time_in`, `time_out`), which the official code leaves in float/frozen; `STAGE1_LAYERS`
  selects. The code's AdaRound `alpha` of the embedding layers is not trained (weights are
  rounded to nearest, not by AdaRound), and the per-layer MSE is averaged over layers where
  the code sums it and adds the output MSE once per layer (a constant rescaling, which Adam
  ignores).
* The official stage 1 runs all its epochs (50-400) at one timestep before the next; here
  both stages cycle over the timesteps, one step per timestep batch, for a few epochs
  (CPU budget). Gradients are averaged over a mini-batch instead of accumulated per sample.
* Activations are quantized at the inputs of Linear/Conv layers (B5's placement); softmax
  and the attention matmuls stay in float (the paper quantizes them, with 16-bit softmax
  for SD). No token-wise (channel-wise) activation quantizers.
* Fake quantization only: no integer kernels, so no speed or memory is measured.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrepro.algorithms.diffusion import fake_quant as fq
from jaxrepro.algorithms.diffusion import ptq4dm, samplers

# Time-embedding layers (stage 1) of `models.unet`: each ResBlock's `time_proj` is LDM's
# `emb_layers`; `time_in`/`time_out` form the global time MLP.
STAGE1_LAYERS = {
    "emb_layers": (("time_proj",),),
    "time_mlp": (("time_proj",), ("time_in",), ("time_out",)),
}
# Sensitive layers (stage 2), as contiguous pieces of a module path.
STAGE2_LAYERS = {
    "ldm_cond": (("mlp_up",), ("mlp_down",), ("self_attn", "query"),
                 ("cross_attn", "query"), ("self_attn", "key"), ("self_attn", "value")),
    "qkv": (("query",), ("key",), ("value",)),
    "ff": (("mlp_up",), ("mlp_down",)),
}
STAGES = ("stage1", "stage2")
LABELS = ("weight", "delta", "frozen")


def _matches(path: Sequence, pieces: Sequence[tuple]) -> bool:
  """Whether some piece occurs as a contiguous run of keys in `path`."""
  path = tuple(path)
  for piece in pieces:
    n = len(piece)
    if any(path[i:i + n] == tuple(piece) for i in range(len(path) - n + 1)):
      return True
  return False


def _layer_pieces(table: dict, name: str, arg: str) -> tuple:
  if name not in table:
    raise ValueError(f"{arg}={name!r}; choose one of {tuple(table)}")
  return table[name]


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Static description of a fine-tunable quantized UNet (hashable: a jit static argument).

  Attributes:
    graphdef: graphdef of the model with `TimewiseActQuant` layers, split as (graphdef,
      Param + ActScale state, rest).
    w_paths: paths, in the params pure dict, of the kernels that are stored in float and
      fake-quantized in the forward pass (the trainable ones).
    w_bits: their bit width.
    timesteps: the sampler grid [S] as a tuple of ints (the step table's index).
  """
  graphdef: nnx.GraphDef
  w_paths: tuple
  w_bits: int
  timesteps: tuple


def _get(tree: dict, path: Sequence) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: Sequence, value) -> dict:
  """A copy of the nested dict with `path` set (the input is not modified)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out


def trajectory_calibration(traj: samplers.Trajectory, cond: Any) -> ptq4dm.CalibSet:
  """Q-Diffusion's calibration set: every state of n float sampler trajectories.

  Args:
    traj: `Trajectory` of an N-step run on n samples (x [N, n, ...], t [N]).
    cond: [n, ...] the runs' conditioning.

  Returns:
    `CalibSet` of N n inputs, timestep-major (rows j n .. (j + 1) n - 1 are at t[j]).
  """
  n_steps, n = traj.x.shape[:2]
  x = traj.x.reshape((n_steps * n,) + traj.x.shape[2:])
  t = jnp.repeat(jnp.asarray(traj.t, jnp.int32), n)
  cond = jax.tree.map(lambda c: jnp.tile(c, (n_steps,) + (1,) * (c.ndim - 1)), cond)
  return ptq4dm.CalibSet(x, t, cond)


def timewise_forward(model: nnx.Module, batch: tuple) -> jax.Array:
  """`forward` of `fake_quant.calibrate_activations`: batch = (x, t, cond, t_index)."""
  x, t, cond, t_index = batch
  fq.set_time_index(model, t_index)
  return model(x, t, cond)


def calibrate_timewise(graphdef: nnx.GraphDef, state: nnx.State, calib: ptq4dm.CalibSet,
                       timesteps, *, batch_size: int, method: str = "mse"
                       ) -> tuple[nnx.GraphDef, nnx.State]:
  """Per-timestep MSE (or min-max) activation steps of a time-wise model.

  Args:
    graphdef, state: a model from `fake_quant.to_timewise` (weights already quantized).
    calib: calibration inputs whose t lie on `timesteps`.
    timesteps: int [S] the sampler grid; step j of each table belongs to timesteps[j].
    batch_size: calibration batch size.
    method: "mse" or "minmax".

  Returns:
    (graphdef in mode "quant", state with [S] step tables).
  """
  idx = fq.timestep_index(calib.t, jnp.asarray(timesteps))
  batches = [b + (i,) for b, i in zip(ptq4dm.calib_batches(calib, batch_size),
                                      _split(idx, batch_size))]
  return fq.calibrate_activations(graphdef, state, batches, timewise_forward, method=method)


def _split(a: jax.Array, size: int) -> list[jax.Array]:
  return [a[s:s + size] for s in range(0, a.shape[0] - size + 1, size)]


def make_finetunable(graphdef: nnx.GraphDef, state: nnx.State, fp_params: nnx.State, *,
                     w_bits: int, timesteps, layers: Sequence[tuple],
                     method: str = "mse", num_candidates: int = 80, step: float = 0.01
                     ) -> tuple[QuantSpec, dict, nnx.State, tuple]:
  """Splits a calibrated time-wise model for fine-tuning; float weights for `layers`.

  The kernels of layers matching `layers` are replaced by their float values (from
  `fp_params`) and fake-quantized in the forward pass with the same per-channel MSE step as
  the PTQ weights, so the returned model computes exactly what the input model does.

  Args:
    graphdef, state: quantized time-wise model (`to_timewise` + calibration).
    fp_params: the float model's state (same module tree, without the wrappers).
    w_bits: weight bits of those layers.
    timesteps: int [S] the grid of the step tables.
    layers: path pieces (e.g. `STAGE1_LAYERS[...] + STAGE2_LAYERS[...]`).
    method, num_candidates, step: the weight step search (`fake_quant.quant_params`).

  Returns:
    (spec, params: pure dict of Param and ActScale values, rest: the other variables,
    w_scales: tuple of per-channel weight steps, one per `spec.w_paths`).
  """
  model = nnx.merge(graphdef, state)
  # The index is set on every call; a fixed placeholder makes models stackable.
  fq.set_time_index(model, jnp.zeros((1,), jnp.int32))
  g, params, rest = nnx.split(model, (nnx.Param, fq.ActScale), ...)
  pure = nnx.to_pure_dict(params)
  fp = nnx.to_pure_dict(fp_params)
  w_paths = [path for path, _ in fq.leaf_paths(pure)
             if path[-1] == "kernel" and "inner" in path and _matches(path, layers)]
  if not w_paths:
    raise ValueError(f"layers={layers!r} match no quantized kernel")
  kernels = tuple(jnp.asarray(_get(fp, tuple(k for k in path if k != "inner")))
                  for path in w_paths)
  w_scales = _weight_scales(kernels, int(w_bits), method, num_candidates, step)
  for path, w in zip(w_paths, kernels):
    pure = _set(pure, path, w)
  # Device arrays throughout (a checkpoint may hold NumPy leaves), so a jitted step sees the
  # same argument kinds before and after its first update and compiles once.
  pure = jax.tree.map(jnp.asarray, pure)
  rest = jax.tree.map(jnp.asarray, rest)
  spec = QuantSpec(g, tuple(w_paths), int(w_bits),
                   tuple(int(t) for t in np.asarray(timesteps)))
  return spec, pure, rest, tuple(w_scales)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _weight_scales(kernels, bits, method, num_candidates, step):
  """Per-output-channel MSE steps of several kernels in one program (one compile)."""
  return tuple(fq.quant_params(w, bits=bits, channel_axis=-1, method=method,
                               num_candidates=num_candidates, step=step)[0] for w in kernels)


def quantized_weights(spec: QuantSpec, params: dict, w_scales: Sequence[jax.Array]) -> dict:
  """params with each float kernel of `spec.w_paths` fake-quantized (STE, fixed step)."""
  for path, s in zip(spec.w_paths, w_scales):
    w = _get(params, path)
    params = _set(params, path, fq.fake_quant(w, jax.lax.stop_gradient(s), bits=spec.w_bits))
  return params


def merge(spec: QuantSpec, params: dict, rest: nnx.State, w_scales, t: jax.Array,
          timewise: jax.Array | bool = True) -> nnx.Module:
  """The quantized model with the time index of t set (index 0 when `timewise` is False).

  `timewise` may be a traced boolean, so the per-tensor ablation (only Delta_0 used and
  trained) shares the compiled programs of the time-wise model.
  """
  rest = jax.tree.map(lambda a: a, rest)  # fresh Variables: set_time_index mutates them
  model = nnx.merge(spec.graphdef, quantized_weights(spec, params, w_scales), rest)
  idx = fq.timestep_index(t, jnp.asarray(spec.timesteps, jnp.int32))
  fq.set_time_index(model, jnp.where(timewise, idx, 0))
  return model


def make_model_fn(spec: QuantSpec, params: dict, rest: nnx.State, w_scales,
                  timewise: jax.Array | bool = True) -> Callable:
  """`model_fn(x, t, cond) -> eps` of the quantized model for `samplers`."""
  def fn(x, t, cond):
    return merge(spec, params, rest, w_scales, t, timewise)(x, t, cond)
  return fn


def time_embedding_outputs(model: nnx.Module, t: jax.Array) -> tuple[jax.Array, ...]:
  """Outputs of every ResBlock's `time_proj` (LDM `emb_layers`) at t: tuple of [B, C_k]."""
  temb = jax.nn.silu(model.time_embed(t))
  return tuple(m(temb) for p, m in nnx.iter_modules(model) if p and p[-1] == "time_proj")


def labels(params: dict, stage: str, stage1_layers: Sequence[tuple],
           stage2_layers: Sequence[tuple]) -> dict:
  """The `optax.multi_transform` labels of a stage: "weight", "delta" or "frozen".

  Stage 1: the weights and biases of `stage1_layers` and the steps (`scale`) of their input
  quantizers. Stage 2: the weights and biases of `stage2_layers` and the steps of every
  activation quantizer outside `stage1_layers`. Zero points, norms, embeddings and the
  other layers stay frozen.
  """
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r}; choose one of {STAGES}")
  w_layers = stage1_layers if stage == "stage1" else stage2_layers

  def label(path):
    if path[-1] in ("kernel", "bias") and "inner" in path and _matches(path, w_layers):
      return "weight"
    parent = _get(params, path[:-1])
    if path[-1] == "scale" and "zero_point" in parent and "inner" in parent:
      # An ActQuant's step table (a norm's `scale` has no `zero_point`/`inner` sibling).
      in_time = _matches(path, stage1_layers)
      if in_time == (stage == "stage1"):
        return "delta"
    return "frozen"

  out = {}
  for path, _ in fq.leaf_paths(params):
    out = _set_new(out, path, label(path))
  return out


def _set_new(tree: dict, path: Sequence, value) -> dict:
  node = tree
  for k in path[:-1]:
    node = node.setdefault(k, {})
  node[path[-1]] = value
  return tree


def optimizer(label_tree: dict, lr_w: float, lr_delta: float) -> optax.GradientTransformation:
  """Adam(lr_w) on "weight", Adam(lr_delta) on "delta", exact zeros on "frozen"."""
  return optax.multi_transform({"weight": optax.adam(lr_w), "delta": optax.adam(lr_delta),
                                "frozen": optax.set_to_zero()}, label_tree)


def stage_loss(spec: QuantSpec, params: dict, rest: nnx.State, w_scales, batch: dict,
               stage: str, timewise: jax.Array | bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_1 (stage 1) or L_2 (stage 2) on one batch of FP-labelled calibration inputs.

  Args:
    spec, params, rest, w_scales: the fine-tunable model (`make_finetunable`).
    batch: dict with x [B, H, W, C], t int32 [B], cond [B, ...], eps [B, H, W, C] (the
      float model's prediction) and, for stage 1, emb: tuple of the float `time_proj`
      outputs [B, C_k] (`time_embedding_outputs` of the float model).
    stage: "stage1" or "stage2".
    timewise: False uses step 0 of every table (the per-tensor ablation).

  Returns:
    (loss, metrics with eps_mse and, for stage 1, emb_mse).
  """
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r}; choose one of {STAGES}")
  model = merge(spec, params, rest, w_scales, batch["t"], timewise)
  eps_mse = jnp.mean((model(batch["x"], batch["t"], batch["cond"]) - batch["eps"]) ** 2)
  if stage == "stage2":
    return eps_mse, {"eps_mse": eps_mse}
  emb = time_embedding_outputs(model, batch["t"])
  emb_mse = jnp.mean(jnp.stack([jnp.mean((e - r) ** 2) for e, r in zip(emb, batch["emb"])]))
  return emb_mse + eps_mse, {"eps_mse": eps_mse, "emb_mse": emb_mse}


def count_trained(params: dict, label_trees: Sequence[dict]) -> dict[str, int]:
  """Numbers of values trained in any stage: {"weight": .., "delta": .., "total": ..}."""
  kinds = {}
  for tree in label_trees:
    for path, lab in fq.leaf_paths(tree):
      if lab != "frozen":
        kinds[path] = lab
  out = {"weight": 0, "delta": 0}
  for path, v in fq.leaf_paths(params):
    if path in kinds:
      out[kinds[path]] += int(np.prod(np.shape(v)))
  out["total"] = out["weight"] + out["delta"]
  return out
