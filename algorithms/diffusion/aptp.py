"""APTP: prompt-routed structured pruning of a text-to-image diffusion UNet.

Paper: Ganjdanesh, Shirkavand, Gao, Huang, "Not All Prompts Are Made Equal: Prompt-based
Pruning of Text-to-Image Diffusion Models", 2024, arXiv:2406.12042 (official code:
`rezashkv/diffusion_pruning`). The gate layout, parameter masking and MAC counts live in
`jaxrepro.algorithms.diffusion.aptp_gates`.

Method. A router r_psi maps a prompt embedding e (frozen encoder) to a continuous
architecture vector z in R^G (one logit per gate). A codebook of K codes c_k in R^G
(orthogonal init) holds the experts. Logits become 0/1 masks through the Gumbel-sigmoid
(temperature tau = 0.4, offset "base" b = 2) and a straight-through hard threshold:

  s = sigmoid((x + g + b) / tau),  g = -log(-log u), u ~ U(0, 1);   m = 1[s >= 1/2] (ST),

with every width set forced non-zero (if all of a set's gates are off, its first gate's s gets
+ 1/2). Before comparing, vectors are normalised ("width_depth_normalize"):
v = m_width * m_depth(block), v_i *= sqrt(1 / |set(i)|) * FLOPs(set(i)) (resource-aware), then
v / ||v||. Training assigns each prompt of the batch to a code by Sinkhorn-Knopp optimal
transport on S = u v^T (eps = 0.05, 3 iterations; Q = exp(S / eps)^T normalised to total 1,
then alternately rows to 1/K and columns to 1/B, finally Q *= B), idx_i = argmax_k Q_ik,
which balances code usage; inference uses argmax_k S_ik. With the chosen code's mask the
pruned UNet is distilled from the dense teacher (eps-MSE), plus

  resource loss  R(r) = log(r / p) if r > p else log(p / r),  r = mean_i FLOPs(m_idx_i)/FLOPs(1)
  contrastive    C = -mean_i sum_j softmax(E E^T / T_p)_ij log softmax(V V^T / T_a)_ij,

where E are the normalised prompt embeddings and V the normalised router vectors.
Gradient paths (as read in `pdm/models/vq/quantizer.py` and `pdm/training/trainer.py`): in
the main phase the assignment is computed without gradients, the distillation and resource
losses reach the codebook through the chosen code's Gumbel-sigmoid mask, and the router is
trained by the contrastive loss only. In the router pre-training phase (the trainer's
`hypernet_pretraining_steps`) each prompt's own router mask gates the UNet, so distillation
and resource gradients reach the router and the codes get none. The quantizer's `beta` (VQ
commitment) is unused there and here (`loss_weights.commit` must be 0).

Differences from the paper / official code:
* The frozen text encoder is a bag-of-words vector of the toy prompt (`toy_shapes` tokens)
  and the router an MLP on it (the official hypernetwork is a GRU + MLP on MPNet features).
* The UNet's weights stay frozen and the per-expert fine-tuning stage is not run: only the
  router and the codes learn, with distillation from the dense UNet as the quality term
  (the official SD config trains the UNet too, with the denoising loss, distillation weight
  0). Depth gates use the same Gumbel-sigmoid as widths (the code's depth gates use an
  "importance" cumulative-softmax ordering).
* The contrastive loss is the cross-entropy between the two row-softmaxes; the code passes
  the arch softmax as *logits* to `F.cross_entropy` (a second softmax), which is not
  minimised where the two matrices agree. The trainer's block, std and max losses (weight 0
  in its SD 2.1 configs) are omitted.
* The masks that gate the UNet are hard (straight-through) in training too; in the code the
  soft Gumbel-sigmoid values reach the gates of its re-written blocks.
* Settings follow the card and the quantizer's defaults (base 2, K = 4, resource-aware
  normalisation on); the official SD 2.1 config uses base 3, K = 8 and no resource-aware
  normalisation. Its contrastive temperatures (0.03) and resource weight (2) are the demo's.
* Inference routing draws the router's fixed Gumbel noise once per gate and shares it across
  the batch, so a prompt's expert does not depend on its batch position (the code's fixed
  seed draws a [B, G] sample). The experts' masks are a fixed-key draw of the codes; the
  code keeps the last training draw (`embedding_gs`) instead.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxrepro.algorithms.diffusion import aptp_gates
from jaxrepro.algorithms.diffusion import schedules as sch
from jaxrepro.models import mlp as mlp_lib
from jaxrepro.models import unet as unet_lib

RESOURCE_KINDS = ("log", "mae", "mse")


# ------------------------------------------------------------------------------ gates


def gumbel_sigmoid(logits: jax.Array, key: jax.Array, *, temperature: float = 0.4,
                   base: float = 2.0, structure: aptp_gates.Structure | None = None,
                   shared_noise: bool = False) -> jax.Array:
  """Soft gates sigmoid((x + g + base) / temperature), g ~ Gumbel(0, 1) (differentiable).

  Args:
    logits: float [..., G].
    key: typed key (a fixed key gives a deterministic result).
    temperature: tau > 0.
    base: the logit offset (2 biases gates towards on at initialisation).
    structure: when given, every width set whose hard gates are all off gets + 1/2 on its
      first gate (the official `force_width_non_zero`).
    shared_noise: draw one noise value per gate and share it across the leading axes, so a
      row's result does not depend on its position in the batch (inference routing).

  Returns:
    float32 [..., G] in (0, 1).
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0; got {temperature}")
  shape = logits.shape[-1:] if shared_noise else logits.shape
  u = jax.random.uniform(key, shape, jnp.float32)
  g = -jnp.log(-jnp.log(u + 1e-20) + 1e-20)
  s = jax.nn.sigmoid((logits + g + base) / temperature)
  if structure is None:
    return s
  if logits.shape[-1] != structure.num_gates:
    raise ValueError(f"logits must have shape [..., {structure.num_gates}]; got {logits.shape}")
  for gs in structure.gate_sets:
    on = jnp.any(s[..., gs.offset:gs.offset + gs.size] >= 0.5, axis=-1)
    s = s.at[..., gs.offset].add(jnp.where(on, 0.0, 0.5))
  return s


def hard_concrete(s: jax.Array) -> jax.Array:
  """1[s >= 1/2] in the forward pass, identity gradient (straight-through)."""
  hard = (s >= 0.5).astype(s.dtype)
  return s + jax.lax.stop_gradient(hard - s)


def width_depth_normalize(structure: aptp_gates.Structure, v: jax.Array, *,
                          resource_aware: bool = True) -> jax.Array:
  """Width gates times their block's depth gate, scaled by sqrt(1 / set size) and (resource
  aware) by the set's share of the prunable MACs. v: float [..., G] -> [..., G]."""
  nw = structure.num_width
  width, depth = v[..., :nw], v[..., nw:]
  width = width * depth[..., structure.width_block()]
  out = jnp.concatenate([width, depth], axis=-1)
  template = np.sqrt(1.0 / structure.set_sizes())
  if resource_aware:
    template = template * structure.set_macs() / structure.full_prunable_macs
  return out * jnp.asarray(template, out.dtype)


def _l2n(x: jax.Array) -> jax.Array:
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


# ----------------------------------------------------------------------------- sinkhorn


def sinkhorn(scores: jax.Array, *, epsilon: float = 0.05, iterations: int = 3) -> jax.Array:
  """Sinkhorn-Knopp assignment of B samples to K codes (SwAV's, as in the official code).

  Args:
    scores: float [B, K] similarities.
    epsilon: entropic temperature.
    iterations: number of (row, column) normalisation rounds (static).

  Returns:
    float32 [B, K] Q; each row (sample) sums to 1, each code's column sum tends to B / K.
  """
  if scores.ndim != 2:
    raise ValueError(f"scores must be [B, K]; got {scores.shape}")
  return _sinkhorn(scores, epsilon, iterations, None)


def _sinkhorn(scores, epsilon, iterations, axis_name):
  psum = (lambda x: x) if axis_name is None else (lambda x: jax.lax.psum(x, axis_name))
  pmax = (lambda x: x) if axis_name is None else (lambda x: jax.lax.pmax(x, axis_name))
  scores = scores.astype(jnp.float32)
  # The global max cancels in the first normalisation; it only keeps exp finite.
  q = jnp.exp((scores - pmax(jnp.max(scores))) / epsilon).T  # [K, B_local]
  k = q.shape[0]
  b = psum(jnp.asarray(q.shape[1], jnp.float32))
  q = q / psum(jnp.sum(q))

  def body(_, q):
    q = q / psum(jnp.sum(q, axis=1, keepdims=True)) / k  # each code's mass -> 1/K
    return q / jnp.sum(q, axis=0, keepdims=True) / b  # each sample's mass -> 1/B

  q = jax.lax.fori_loop(0, iterations, body, q)
  return (q * b).T


def sinkhorn_sharded(scores: jax.Array, mesh: jax.sharding.Mesh, axis_name: str = "data", *,
                     epsilon: float = 0.05, iterations: int = 3) -> jax.Array:
  """`sinkhorn` with the batch sharded over `axis_name` of `mesh` (the code's
  `distributed_sinkhorn`): code (row) sums and the total are `psum`-ed; sample (column)
  normalisation is local. scores [B, K] (B divisible by the axis size) -> Q [B, K], sharded
  the same way; equal to the single-device result."""
  if scores.ndim != 2 or scores.shape[0] % mesh.shape[axis_name]:
    raise ValueError(f"scores must be [B, K] with B divisible by mesh axis {axis_name!r} of "
                     f"size {mesh.shape[axis_name]}; got {scores.shape}")
  fn = jax.shard_map(lambda s: _sinkhorn(s, epsilon, iterations, axis_name), mesh=mesh,
                     in_specs=P(axis_name), out_specs=P(axis_name))
  return fn(scores)


# ------------------------------------------------------------------------ router / codes


def bag_of_words(tokens: jax.Array, vocab_size: int) -> jax.Array:
  """Frozen prompt embedding: L2-normalised word counts (padding id 0 ignored).

  tokens: int [B, L] -> float32 [B, vocab_size]."""
  counts = jax.nn.one_hot(tokens, vocab_size, dtype=jnp.float32).sum(axis=1)
  return _l2n(counts.at[:, 0].set(0.0))


class Params(NamedTuple):
  """Trainable APTP parameters: the router MLP (a pure dict) and the codebook [K, G]."""
  router: Any
  codes: jax.Array


def init(key: jax.Array, structure: aptp_gates.Structure, *, num_codes: int,
         embed_dim: int, hidden: int = 64) -> tuple[Any, Params]:
  """(router graphdef, Params): an MLP embed_dim -> hidden -> G and K orthogonal codes."""
  if num_codes < 1:
    raise ValueError(f"num_codes must be >= 1; got {num_codes}")
  k_router, k_codes = jax.random.split(key)
  graphdef, router = mlp_lib.init_mlp((embed_dim, hidden, structure.num_gates), k_router)
  codes = jax.nn.initializers.orthogonal()(k_codes, (num_codes, structure.num_gates))
  return graphdef, Params(router, codes)


class Assignment(NamedTuple):
  """Routing of a batch: code index [B] int32 and similarity [B, K]."""
  index: jax.Array
  similarity: jax.Array


ROUTE_OT, ROUTE_ARGMAX, ROUTE_STATIC = 0, 1, 2


def assign(structure: aptp_gates.Structure, arch_gates: jax.Array, code_gates: jax.Array, *,
           optimal_transport: bool = True, mode: jax.Array | None = None,
           epsilon: float = 0.05, iterations: int = 3, resource_aware: bool = True
           ) -> Assignment:
  """Code of each sample from cosine similarities of normalised hard masks (no gradient).

  Args:
    structure: the gate layout.
    arch_gates: float [B, G] Gumbel-sigmoid gates of the router vectors.
    code_gates: float [K, G] Gumbel-sigmoid gates of the codes.
    optimal_transport: Sinkhorn (training) or plain argmax (inference / the no-OT ablation).
    mode: optional int32 scalar overriding `optimal_transport`, possibly traced (one compiled
      program serves several variants): `ROUTE_OT`, `ROUTE_ARGMAX` or `ROUTE_STATIC` (every
      sample to code 0: the single-mask baseline).
    epsilon, iterations: Sinkhorn settings.
    resource_aware: weight gates by their set's MACs before the cosine.

  Returns:
    `Assignment`.
  """
  norm = lambda v: _l2n(width_depth_normalize(
      structure, hard_concrete(jax.lax.stop_gradient(v)), resource_aware=resource_aware))
  sim = norm(arch_gates) @ norm(code_gates).T
  if mode is None:
    q = sinkhorn(sim, epsilon=epsilon, iterations=iterations) if optimal_transport else sim
    return Assignment(jnp.argmax(q, axis=-1).astype(jnp.int32), sim)
  by_ot = jnp.argmax(sinkhorn(sim, epsilon=epsilon, iterations=iterations), axis=-1)
  index = jnp.where(mode == ROUTE_OT, by_ot, jnp.argmax(sim, axis=-1))
  index = jnp.where(mode == ROUTE_STATIC, 0, index)
  return Assignment(index.astype(jnp.int32), sim)


# -------------------------------------------------------------------------------- losses


def resource_loss(ratio: jax.Array, target: float, kind: str = "log") -> jax.Array:
  """log(r / p) if r > p else log(p / r) (`log`), |r - p| (`mae`) or (r - p)^2 (`mse`)."""
  if kind not in RESOURCE_KINDS:
    raise ValueError(f"kind={kind!r}; choose one of {RESOURCE_KINDS}")
  if kind == "mae":
    return jnp.abs(ratio - target)
  if kind == "mse":
    return (ratio - target) ** 2
  r = jnp.maximum(ratio, 1e-6)
  return jnp.where(r > target, jnp.log(r / target), jnp.log(target / r))


def contrastive_loss(prompt_emb: jax.Array, arch: jax.Array, *, arch_temperature: float = 1.0,
                     prompt_temperature: float = 1.0) -> jax.Array:
  """Cross-entropy of softmax(V V^T / T_a) against the target softmax(E E^T / T_p).

  Args:
    prompt_emb: float [B, E] prompt embeddings.
    arch: float [B, G] (normalised) architecture vectors.
    arch_temperature, prompt_temperature: T_a, T_p.

  Returns:
    scalar; for fixed prompts it is minimal (the target's entropy) when the two row-softmaxes
    agree.
  """
  e, v = _l2n(prompt_emb), _l2n(arch)
  target = jax.nn.softmax(e @ e.T / prompt_temperature, axis=-1)
  logp = jax.nn.log_softmax(v @ v.T / arch_temperature, axis=-1)
  return -jnp.mean(jnp.sum(target * logp, axis=-1))


# -------------------------------------------------------------------------- training loss


class Settings(NamedTuple):
  """Static hyper-parameters of the APTP loss (hashable)."""
  temperature: float = 0.4
  base: float = 2.0
  target_ratio: float = 0.6
  resource_kind: str = "log"
  epsilon: float = 0.05
  iterations: int = 3
  optimal_transport: bool = True
  resource_aware: bool = True
  distill_weight: float = 1.0
  resource_weight: float = 1.0
  contrastive_weight: float = 0.1
  arch_temperature: float = 1.0
  prompt_temperature: float = 1.0


def noisy_batch(x0: jax.Array, key: jax.Array, alphas_cumprod: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """(x_t [B, H, W, C], t int32 [B]): x0 forward-noised at uniform random timesteps."""
  k_t, k_eps = jax.random.split(key)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, alphas_cumprod.shape[0])
  return sch.q_sample(x0, t, jax.random.normal(k_eps, x0.shape, x0.dtype), alphas_cumprod), t


def student_loss(structure: aptp_gates.Structure, router_graphdef, unet_graphdef, unet_params,
                 settings: Settings, params: Params, x_t: jax.Array, t: jax.Array,
                 tokens: jax.Array, emb: jax.Array, teacher_eps: jax.Array, key: jax.Array,
                 mode: jax.Array | None = None, pretrain: jax.Array | bool = False
                 ) -> tuple[jax.Array, dict]:
  """The APTP loss of one router + codebook on a noised batch (differentiable in `params`).

  The frozen UNet runs once on the batch with each sample gated by its assigned code's mask
  (`aptp_gates.gated_apply`), so only the chosen code's mask gets that sample's gradient.

  Args:
    structure, router_graphdef: gate layout and router MLP graphdef.
    unet_graphdef, unet_params: the frozen UNet (teacher weights; students gate them).
    settings: `Settings`.
    params: `Params` (router, codes [K, G]).
    x_t: float [B, H, W, C] noisy inputs at timesteps t int [B].
    tokens: int [B, L] prompts; emb: float [B, E] their embeddings.
    teacher_eps: float [B, H, W, C] the dense UNet's prediction (no gradient).
    key: typed key of the Gumbel noise.
    mode: optional (traced) routing mode, see `assign`; default from `settings`.
    pretrain: (traced) bool; True is the code's router pre-training phase: each sample is
      gated by its own router vector's hard mask (distillation and resource gradients reach
      the router; the codes get none).

  Returns:
    (loss, metrics dict of scalars: distill, resource, contrastive, ratio, max_share).
  """
  s = settings
  k_codes, k_arch = jax.random.split(key)
  z = mlp_lib.apply_mlp(router_graphdef, params.router, emb)
  arch_gates = gumbel_sigmoid(z, k_arch, temperature=s.temperature, base=s.base,
                              structure=structure)
  code_gates = gumbel_sigmoid(params.codes, k_codes, temperature=s.temperature,
                              base=s.base, structure=structure)
  routing = assign(structure, arch_gates, code_gates, optimal_transport=s.optimal_transport,
                   mode=mode, epsilon=s.epsilon, iterations=s.iterations,
                   resource_aware=s.resource_aware)
  masks = hard_concrete(code_gates)  # [K, G]
  onehot = jax.nn.one_hot(routing.index, masks.shape[0], dtype=jnp.float32)  # [B, K]
  # Each sample's mask is its code's: the one-hot product routes its gradient to that code.
  # In pre-training it is the sample's own router mask instead (`where` sends no gradient
  # to the branch not taken).
  own = hard_concrete(arch_gates)
  sample_masks = jnp.where(pretrain, own, onehot @ masks)
  pred = aptp_gates.gated_apply(structure, unet_graphdef, unet_params, x_t, t, tokens,
                                sample_masks)
  err = jnp.mean((pred - jax.lax.stop_gradient(teacher_eps)) ** 2, axis=(1, 2, 3))
  distill = jnp.mean(err)
  ratio = jnp.mean(aptp_gates.resource_ratio(structure, sample_masks))
  res = resource_loss(ratio, s.target_ratio, s.resource_kind)
  # After pre-training the router learns only through the contrastive loss.
  arch = width_depth_normalize(structure, own, resource_aware=s.resource_aware)
  con = contrastive_loss(emb, arch, arch_temperature=s.arch_temperature,
                         prompt_temperature=s.prompt_temperature)
  loss = s.distill_weight * distill + s.resource_weight * res + s.contrastive_weight * con
  share = jnp.max(jnp.mean(onehot, axis=0))
  return loss, {"distill": distill, "resource": res, "contrastive": con, "ratio": ratio,
                "max_share": share}


def make_loss_fn(structure: aptp_gates.Structure, router_graphdef, unet_graphdef,
                 unet_params, alphas_cumprod: jax.Array, settings: Settings
                 ) -> Callable[[Params, Any, jax.Array], tuple[jax.Array, dict]]:
  """`loss_fn(params, batch, key) -> (loss, metrics)` for `train_loop.make_train_step`.

  `batch` = (x0 float [B, H, W, C] images in [-1, 1], tokens int [B, L], emb float [B, E]).
  """
  if settings.resource_kind not in RESOURCE_KINDS:
    raise ValueError(f"settings.resource_kind={settings.resource_kind!r}; choose one of "
                     f"{RESOURCE_KINDS}")

  def loss_fn(params: Params, batch, key):
    x0, tokens, emb = batch
    k_noise, k_gates = jax.random.split(key)
    x_t, t = noisy_batch(x0, k_noise, alphas_cumprod)
    teacher = unet_lib.apply_unet(unet_graphdef, unet_params, x_t, t, tokens)
    return student_loss(structure, router_graphdef, unet_graphdef, unet_params, settings,
                        params, x_t, t, tokens, emb, teacher, k_gates)

  return loss_fn


def route(structure: aptp_gates.Structure, router_graphdef, params: Params, emb: jax.Array,
          settings: Settings, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Inference routing: (code index int32 [B], expert masks [K, G]).

  Gumbel noise is drawn from a fixed key (default `key(0)`, the code's `fixed_seed`) and, for
  the router vectors, shared across the batch, so a prompt always gets the same expert
  wherever it sits in a batch; the assignment is the argmax cosine similarity.
  """
  key = jax.random.key(0) if key is None else key
  k_codes, k_arch = jax.random.split(key)
  z = mlp_lib.apply_mlp(router_graphdef, params.router, emb)
  s = settings
  arch_gates = gumbel_sigmoid(z, k_arch, temperature=s.temperature, base=s.base,
                              structure=structure, shared_noise=True)
  code_gates = gumbel_sigmoid(params.codes, k_codes, temperature=s.temperature, base=s.base,
                              structure=structure)
  routing = assign(structure, arch_gates, code_gates, optimal_transport=False,
                   resource_aware=s.resource_aware)
  return routing.index, jax.lax.stop_gradient(hard_concrete(code_gates))
