"""Structured width/depth gates on the toy UNet as parameter masks, and their FLOPs.

The prunable structure of APTP (Ganjdanesh, Shirkavand, Gao, Huang, "Not All Prompts Are Made
Equal: Prompt-based Pruning of Text-to-Image Diffusion Models", 2024, arXiv:2406.12042; the
router, codes and losses live in `jaxrepro.algorithms.diffusion.aptp`) on the shared UNet of
`jaxrepro.models.unet`, without touching the model: every gate is a scale on parameters.

Gates (a flat vector m of `Structure.num_gates` entries in [0, 1], widths first then depths,
the order of the official `StructureVectorQuantizer`):

* ResBlock width: the hidden channels of each ResBlock, in the G = `num_groups` GroupNorm
  groups of `norm2`. `conv2(SiLU(GN(y)) * m)` equals conv2 with the input rows of its kernel
  scaled by m; gating whole GN groups keeps the other groups' statistics unchanged, so m_g = 0
  is exactly the block with that group's channels sliced out of conv1, time_proj, norm2, conv2.
* Attention heads (self and cross separately): head h's rows of the output projection W_o.
* FFN width: the 4 d hidden units of the token MLP in G groups (rows of `mlp_down`).
* Depth: one gate per ResBlock and per AttnBlock. d = 0 zeroes the residual branch's last
  layer (kernel and bias of `conv2` / `proj_out`): ResBlock(h) -> skip(h), AttnBlock(h) -> h.
  Width gates are multiplied by their block's depth gate.

All gates = 1 leaves every parameter unchanged (exactly the dense UNet), and gradients reach
m through the scaled parameters (`gate_params`: one mask, e.g. to export an expert).
Training needs a different mask per sample; `gated_apply` runs the same gates as activation
masks in one batched pass (hidden channels, head outputs and FFN units times their gates,
residual branches times their depth gate), equal per sample to `gate_params` + the UNet.

MACs (multiply-adds per image, from shapes). A block's prunable MACs are linear in its gates:
  MACs_b(m) = d_b (C_b + sum_{g in b} c_g m_g),
with c_g the MACs that disappear with gate g in the sliced network (ResBlock group of k
channels: 9 HW in k + T k + 9 HW k out; head: its q/k/v/out projection columns and its score
and value matmuls; FFN group: 2 N d k) and C_b the rest of the block (the AttnBlock's 1x1
in/out projections). Fixed MACs (conv_in, resampling convs, skips, time MLP, conv_out) are
not prunable. The resource ratio is, as in the official trainer, the prunable ratio
r = sum_b MACs_b(m) / sum_b MACs_b(1).

Differences from the paper / official code (`rezashkv/diffusion_pruning`, pdm/models/unet):
* The official gates multiply activations inside re-written diffusers blocks; with an
  unmodified model we scale parameters (equivalent for the forward pass, see above).
* Granularity: ResBlock/FFN widths in GroupNorm-sized groups (the official code gates SD's
  ResNet channels per GN group too), heads singly; every ResBlock and AttnBlock has a depth
  gate (the official structure marks only some blocks as depth-prunable).
* MACs are counted analytically (convs, linears, attention matmuls); the official code
  counts them with a hooked op counter, including element-wise ops we ignore.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrepro.models import unet as unet_lib
from jaxrepro.models.attention import attention_with_lse

KINDS = ("res", "self_heads", "cross_heads", "ffn")


@dataclasses.dataclass(frozen=True)
class GateSet:
  """One group of width gates of one block.

  Attributes:
    kind: one of `KINDS`.
    block: index into `Structure.blocks` (whose depth gate multiplies these gates).
    offset: position of the first gate in the flat mask vector.
    size: number of gates.
    unit: parameter rows controlled by one gate (channels per group, head dim, ...).
    macs_per_gate: MACs per image that disappear with one gate of this set (c_g).
  """
  kind: str
  block: int
  offset: int
  size: int
  unit: int
  macs_per_gate: float


@dataclasses.dataclass(frozen=True)
class Block:
  """A ResBlock or AttnBlock with its depth gate.

  Attributes:
    kind: "res" or "attn".
    path: keys of the block in the UNet's pure-dict parameters.
    depth_index: position of its depth gate in the flat mask vector.
    const_macs: prunable MACs not controlled by a width gate (C_b).
  """
  kind: str
  path: tuple
  depth_index: int
  const_macs: float


@dataclasses.dataclass(frozen=True)
class Structure:
  """The gate layout of one UNet config (hashable: a static jit argument).

  Attributes:
    gate_sets: width gate sets, in mask order.
    blocks: depth-gated blocks; gate `num_width + i` is block i's depth gate.
    num_width: number of width gates.
    fixed_macs: non-prunable MACs per image.
    context_len: prompt length L the attention MACs were counted for.
  """
  gate_sets: tuple[GateSet, ...]
  blocks: tuple[Block, ...]
  num_width: int
  fixed_macs: float
  context_len: int

  @property
  def num_gates(self) -> int:
    return self.num_width + len(self.blocks)

  @property
  def full_prunable_macs(self) -> float:
    return float(sum(b.const_macs for b in self.blocks)
                 + sum(s.size * s.macs_per_gate for s in self.gate_sets))

  @property
  def full_macs(self) -> float:
    return self.fixed_macs + self.full_prunable_macs

  def set_sizes(self) -> np.ndarray:
    """int [num_gates]: size of the gate set each gate belongs to (1 for depth gates)."""
    out = np.ones(self.num_gates, np.int64)
    for s in self.gate_sets:
      out[s.offset:s.offset + s.size] = s.size
    return out

  def width_block(self) -> np.ndarray:
    """int [num_width]: the block index of each width gate."""
    out = np.zeros(self.num_width, np.int64)
    for s in self.gate_sets:
      out[s.offset:s.offset + s.size] = s.block
    return out

  def gate_macs(self) -> np.ndarray:
    """float [num_gates]: c_g for width gates, the block's full prunable MACs for depth."""
    out = np.zeros(self.num_gates, np.float64)
    per_block = np.array([b.const_macs for b in self.blocks], np.float64)
    for s in self.gate_sets:
      out[s.offset:s.offset + s.size] = s.macs_per_gate
      per_block[s.block] += s.size * s.macs_per_gate
    out[self.num_width:] = per_block
    return out

  def set_macs(self) -> np.ndarray:
    """float [num_gates]: total prunable MACs of the gate set of each gate (the official
    `prunable_flops_template`: a set's flops, repeated over its gates; depth gates get
    their block's)."""
    out = self.gate_macs()
    for s in self.gate_sets:
      out[s.offset:s.offset + s.size] = s.size * s.macs_per_gate
    return out


def _resblock_macs(hw: int, cin: int, cout: int, temb: int) -> tuple[float, float]:
  """(MACs per hidden channel, non-prunable skip MACs) of a ResBlock."""
  per_channel = 9 * hw * cin + temb + 9 * hw * cout
  skip = hw * cin * cout if cin != cout else 0
  return per_channel, skip


def make_structure(cfg: unet_lib.UNetConfig, context_len: int) -> Structure:
  """The gate layout and MAC counts of a `UNet(cfg)` for prompts of `context_len` tokens.

  Args:
    cfg: the UNet config (LoRA adapters must be merged or absent: `lora_rank` 0).
    context_len: L of the cross-attention context.

  Returns:
    `Structure`.
  """
  if cfg.lora_rank:
    raise ValueError(f"cfg.lora_rank={cfg.lora_rank}: merge the adapters "
                     "(`unet.merge_lora`) and use a rank-0 config")
  if context_len < 1:
    raise ValueError(f"context_len must be >= 1; got {context_len}")
  _, state = nnx.split(nnx.eval_shape(lambda: unet_lib.UNet(cfg, rngs=nnx.Rngs(0))))
  pure = nnx.to_pure_dict(state)
  sizes, temb, g, heads = cfg.resolutions, cfg.temb_dim, cfg.num_groups, cfg.num_heads
  n_levels = len(sizes)

  def resolution(path):
    if path[0] == "down":
      return sizes[path[1]]
    if path[0] == "up":
      return sizes[n_levels - 1 - path[1]]
    return sizes[-1]

  # Block paths in forward order (ResBlock before its AttnBlock).
  paths = []
  for name in ("down", "mid", "up"):
    if name == "mid":
      paths += [("mid_res1",), ("mid_attn",), ("mid_res2",)]
      continue
    for i in sorted(pure[name]):
      for j in sorted(pure[name][i]):
        paths.append((name, i, j, "res"))
        if pure[name][i][j].get("attn"):
          paths.append((name, i, j, "attn"))

  def get(path):
    node = pure
    for k in path:
      node = node[k]
    return node

  gate_sets, blocks = [], []
  offset, fixed = 0, 0.0
  for path in paths:
    node = get(path)
    hw = resolution(path) ** 2
    b = len(blocks)
    if "conv1" in node:
      cin, cout = node["conv1"]["kernel"].shape[2:]
      per_channel, skip = _resblock_macs(hw, cin, cout, temb)
      fixed += skip
      gate_sets.append(GateSet("res", b, offset, g, cout // g, per_channel * (cout // g)))
      offset += g
      blocks.append(Block("res", path, -1, 0.0))
    else:
      d = node["proj_in"]["base"]["kernel"].shape[0]
      ctx = node["cross_attn"]["key"]["base"]["kernel"].shape[0]
      dh, n, ell = d // heads, hw, context_len
      self_head = 3 * n * d * dh + 2 * n * n * dh + n * dh * d
      cross_head = n * d * dh + 2 * ell * ctx * dh + 2 * n * ell * dh + n * dh * d
      ffn_unit = 4 * d // g
      for kind, size, unit, macs in (("self_heads", heads, dh, self_head),
                                     ("cross_heads", heads, dh, cross_head),
                                     ("ffn", g, ffn_unit, 2 * n * d * ffn_unit)):
        gate_sets.append(GateSet(kind, b, offset, size, unit, float(macs)))
        offset += size
      blocks.append(Block("attn", path, -1, float(2 * n * d * d)))
  blocks = tuple(dataclasses.replace(blk, depth_index=offset + i) for i, blk in enumerate(blocks))

  # Fixed MACs: time MLP, conv_in, resampling convs, conv_out (skips added above).
  fixed += cfg.channels * temb + temb * temb
  fixed += 9 * sizes[0] ** 2 * cfg.in_channels * cfg.widths[0]
  for i, w in enumerate(cfg.widths[:-1]):
    fixed += 9 * sizes[i + 1] ** 2 * w * w  # stride-2 conv: output at the next level
  for j in range(n_levels - 1):
    w = cfg.widths[n_levels - 1 - j]
    fixed += 9 * sizes[n_levels - 2 - j] ** 2 * w * w  # conv after nearest upsampling
  fixed += 9 * sizes[0] ** 2 * cfg.widths[0] * (cfg.out_channels or cfg.in_channels)
  return Structure(tuple(gate_sets), blocks, offset, float(fixed), context_len)


def _check_mask(structure: Structure, mask: jax.Array, batched: bool = False):
  want = 2 if batched else 1
  if mask.ndim != want or mask.shape[-1] != structure.num_gates:
    raise ValueError(f"mask must have shape {'[..., ' if batched else '['}"
                     f"{structure.num_gates}]; got {mask.shape}")


def prunable_macs(structure: Structure, mask: jax.Array) -> jax.Array:
  """Prunable MACs per image of the network gated by `mask` (differentiable in the mask).

  Args:
    structure: from `make_structure`.
    mask: float [..., num_gates] in [0, 1].

  Returns:
    float32 [...].
  """
  if mask.shape[-1] != structure.num_gates:
    raise ValueError(f"mask must have shape [..., {structure.num_gates}]; got {mask.shape}")
  mask = jnp.asarray(mask, jnp.float32)
  width, depth = mask[..., :structure.num_width], mask[..., structure.num_width:]
  # Gate MACs are ~1e5-1e7; scale to the full count so float32 sums stay exact enough.
  scale = structure.full_prunable_macs
  c = jnp.asarray(structure.gate_macs()[:structure.num_width] / scale, jnp.float32)
  const = jnp.asarray([b.const_macs / scale for b in structure.blocks], jnp.float32)
  blk = structure.width_block()
  per_block = jnp.zeros(depth.shape, jnp.float32).at[..., blk].add(width * c) + const
  return jnp.sum(per_block * depth, axis=-1) * scale


def resource_ratio(structure: Structure, mask: jax.Array) -> jax.Array:
  """r = prunable MACs(mask) / prunable MACs(all ones), float32 [...] in [0, 1]."""
  return prunable_macs(structure, mask) / structure.full_prunable_macs


def total_macs_ratio(structure: Structure, mask: jax.Array) -> jax.Array:
  """(fixed + prunable MACs(mask)) / full MACs: the whole network's ratio, float32 [...]."""
  return ((structure.fixed_macs + prunable_macs(structure, mask))
          / structure.full_macs)


def gate_params(structure: Structure, params: nnx.State, mask: jax.Array) -> nnx.State:
  """The UNet parameters with every gate of `mask` applied (pure; jit- and grad-friendly).

  Args:
    structure: from `make_structure` for the params' config.
    params: the UNet's `nnx.State` (LoRA-free).
    mask: float [num_gates]; 1 keeps a unit, 0 prunes it.

  Returns:
    A state of the same structure; with mask = 1 every leaf equals the input.
  """
  _check_mask(structure, mask)
  pure = nnx.to_pure_dict(params)
  width, depth = mask[:structure.num_width], mask[structure.num_width:]

  def rows(kernel, gates, unit, axis):
    # Scale `unit` consecutive rows per gate along `axis` of the kernel.
    scale = jnp.repeat(gates, unit).astype(kernel.dtype)
    shape = [1] * kernel.ndim
    shape[axis] = scale.shape[0]
    return kernel * scale.reshape(shape)

  # Rebuild only the touched sub-dicts (copies), so `params` is never mutated.
  def replace(path, fn):
    parent = pure
    for k in path[:-1]:
      parent[k] = dict(parent[k])
      parent = parent[k]
    parent[path[-1]] = fn(dict(parent[path[-1]]))

  for i, blk in enumerate(structure.blocks):
    d = depth[i]
    sets = [s for s in structure.gate_sets if s.block == i]
    gates = {s.kind: width[s.offset:s.offset + s.size] * d for s in sets}
    units = {s.kind: s.unit for s in sets}
    if blk.kind == "res":
      def res_fn(node, gates=gates, units=units, d=d):
        conv2 = dict(node["conv2"])
        conv2["kernel"] = rows(conv2["kernel"], gates["res"], units["res"], axis=2)
        conv2["bias"] = conv2["bias"] * d
        return dict(node, conv2=conv2)
      replace(blk.path, res_fn)
    else:
      def attn_fn(node, gates=gates, units=units, d=d):
        node = dict(node)
        if "lora_a" in node["proj_out"]:
          raise ValueError("gate_params needs LoRA-free parameters (merge_lora first)")
        for name, kind in (("self_attn", "self_heads"), ("cross_attn", "cross_heads")):
          attn = dict(node[name])
          out = dict(attn["out"])
          base = dict(out["base"])
          base["kernel"] = rows(base["kernel"], gates[kind], units[kind], axis=0)
          out["base"] = base
          attn["out"] = out
          node[name] = attn
        down = dict(node["mlp_down"])
        down["kernel"] = rows(down["kernel"], gates["ffn"], units["ffn"], axis=0)
        node["mlp_down"] = down
        proj = dict(node["proj_out"])
        base = dict(proj["base"])
        base["kernel"], base["bias"] = base["kernel"] * d, base["bias"] * d
        proj["base"] = base
        node["proj_out"] = proj
        return node
      replace(blk.path, attn_fn)
  out = jax.tree.map(lambda x: x, params)  # fresh Variables: `params` stays untouched
  nnx.replace_by_pure_dict(out, pure)
  return out


def describe(structure: Structure) -> str:
  """A one-line summary: gate counts per kind and the prunable share of the MACs."""
  counts = {k: sum(s.size for s in structure.gate_sets if s.kind == k) for k in KINDS}
  share = structure.full_prunable_macs / structure.full_macs
  return (", ".join(f"{k} {v}" for k, v in counts.items()) + f", depth {len(structure.blocks)}"
          f"; {structure.full_macs / 1e6:.2f} M MACs/image, {100 * share:.1f}% prunable"
          f" (log10 {math.log10(structure.full_macs):.2f})")


# ------------------------------------------------------------------ per-sample gated forward


def _unit_mask(structure: Structure, mask: jax.Array, block: int, kind: str) -> jax.Array:
  """[B, units] per-sample multipliers of one gate set (width gate times depth gate)."""
  s = next(g for g in structure.gate_sets if g.block == block and g.kind == kind)
  gates = mask[:, s.offset:s.offset + s.size] * mask[:, structure.blocks[block].depth_index,
                                                      None]
  return jnp.repeat(gates, s.unit, axis=1)


def _gated_attention(attn, x, context, heads_mask):
  """`Attention.__call__` with head h's output scaled by heads_mask [B, heads * dh]."""
  context = x if context is None else context
  split = lambda y: y.reshape(y.shape[0], y.shape[1], attn.num_heads, -1)
  q, k, v = split(attn.query(x)), split(attn.key(context)), split(attn.value(context))
  o, _ = attention_with_lse(q, k, v)
  o = o.reshape(x.shape[0], x.shape[1], -1) * heads_mask[:, None, :].astype(o.dtype)
  return attn.out(o)


def _gated_res(structure, res, b, h, temb, mask):
  y = res.conv1(jax.nn.silu(res.norm1(h)))
  y = y + res.time_proj(jax.nn.silu(temb))[:, None, None, :]
  m = _unit_mask(structure, mask, b, "res")[:, None, None, :].astype(y.dtype)
  d = mask[:, structure.blocks[b].depth_index][:, None, None, None].astype(y.dtype)
  # conv2(a * m * d) + d * bias == d * conv2(a * m) since d is one scalar per sample.
  y = d * res.conv2(jax.nn.silu(res.norm2(y)) * m)
  return (h if res.skip is None else res.skip(h)) + y


def _gated_attn_block(structure, blk, b, h, context, mask):
  bsz, hh, ww, c = h.shape
  u = blk.proj_in(blk.norm(h)).reshape(bsz, hh * ww, c)
  u = u + _gated_attention(blk.self_attn, blk.ln_self(u), None,
                           _unit_mask(structure, mask, b, "self_heads"))
  u = u + _gated_attention(blk.cross_attn, blk.ln_cross(u), context,
                           _unit_mask(structure, mask, b, "cross_heads"))
  f = jax.nn.gelu(blk.mlp_up(blk.ln_mlp(u))) * _unit_mask(structure, mask, b, "ffn")[:, None]
  u = u + blk.mlp_down(f.astype(u.dtype))
  d = mask[:, structure.blocks[b].depth_index][:, None, None, None]
  return h + d * blk.proj_out(u).reshape(bsz, hh, ww, c).astype(h.dtype)


def gated_apply(structure: Structure, graphdef: nnx.GraphDef, params: nnx.State,
                x: jax.Array, t: jax.Array, context: jax.Array, mask: jax.Array) -> jax.Array:
  """The UNet with a different gate mask per sample, as activation masks (use in jit).

  Computes, for every sample i, `apply_unet(gate_params(params, mask[i]))(x[i])` in one
  batched pass: hidden ResBlock channels, head outputs and FFN units are multiplied by their
  (width x depth) gates and residual branches by their depth gate. The network's own layers
  are reused; only the block-level composition of `models/unet.py` is restated here.

  Args:
    structure: from `make_structure` for the params' config.
    graphdef, params: the UNet (LoRA-free).
    x: float [B, H, W, C]; t: [B] timesteps; context: [B, L] int tokens or [B, L, D].
    mask: float [B, num_gates].

  Returns:
    float32 [B, H, W, C_out].
  """
  _check_mask(structure, mask, batched=True)
  if mask.shape[0] != x.shape[0]:
    raise ValueError(f"mask has {mask.shape[0]} rows for a batch of {x.shape[0]}")
  model = nnx.merge(graphdef, params)
  index = {blk.path: i for i, blk in enumerate(structure.blocks)}
  mask = mask.astype(jnp.float32)
  model._check_x(x, t)
  temb, ctx = model.time_embed(t), model.embed_context(context)

  def stage(path, st, h):
    h = _gated_res(structure, st.res, index[path + ("res",)], h, temb, mask)
    if st.attn is not None:
      h = _gated_attn_block(structure, st.attn, index[path + ("attn",)], h, ctx, mask)
    return h

  h = model.conv_in(x.astype(jnp.dtype(model.cfg.dtype)))
  skips = [h]
  for i, level in enumerate(model.down):
    for j, st in enumerate(level):
      h = stage(("down", i, j), st, h)
      skips.append(h)
    if i < len(model.downsample):
      h = model.downsample[i](h)
      skips.append(h)
  h = _gated_res(structure, model.mid_res1, index[("mid_res1",)], h, temb, mask)
  h = _gated_attn_block(structure, model.mid_attn, index[("mid_attn",)], h, ctx, mask)
  h = _gated_res(structure, model.mid_res2, index[("mid_res2",)], h, temb, mask)
  for j, level in enumerate(model.up):
    for k, st in enumerate(level):
      h = stage(("up", j, k), st, jnp.concatenate([h, skips.pop()], axis=-1))
    if j < len(model.upsample):
      b, hh, ww, c = h.shape
      h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), method="nearest")
      h = model.upsample[j](h)
  return model.conv_out(jax.nn.silu(model.norm_out(h))).astype(jnp.float32)
