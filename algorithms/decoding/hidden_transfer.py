"""Hidden Transfer: pseudo hidden states for future tokens, verified by tree attention.

Paper: Wu, Liu, Gong, Wang, Li, Wang, Cai, Zhao, "Parallel Decoding via Hidden Transfer for
Lossless Large Language Model Acceleration", 2024, arXiv:2404.12022. Baseline: Medusa-1
heads (Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple
Decoding Heads", 2024, arXiv:2401.10774, code FasterDecoding/Medusa).

Hidden transfer. A frozen causal LM with blocks 0..L-1 reads a context x_0..x_n. At an
intermediate layer t the residual states h^t_0..h^t_n of the context are *transferred* to
pseudo hidden states of the next k positions by trainable linear maps,

  h~^t_{n+i} = W_i h^t_n + b_i,   i = 1..k,

which are appended to the sequence and pass blocks t..L-1 together with the context. The
attention mask lets the context stay causal (so its logits are unchanged) and lets pseudo
state i attend to the context x_<=n and to the pseudo states j <= i; the LM head on
pseudo state i then gives a draft distribution for the token after the next one,

  q_i(v | x_<=n) = softmax(W_out LN(h~^L_{n+i}) + b_out)_v   ~  p(x_{n+1+i} = v | x_<=n).

Training keeps the LM frozen and minimises the cross-entropy of the true future tokens,

  L(W) = - 1/(|C| k) sum_{n in C} sum_{i=1..k} log q_i(x_{n+1+i} | x_<=n),

over cut points C of training sequences (all cuts of a sequence share one forward: each
cut's pseudo states see only its own prefix, `pseudo_mask`).

Medusa-1 heads (the baseline) read the LM's final hidden state h^L_n instead:

  q_i = softmax(W2_i (h^L_n + SiLU(W1_i h^L_n + c_i)) + d_i),  W1_i = 0, W2_i = W_out at init.

Tree decoding (greedy, lossless). A static candidate tree (Medusa's "choices") is a set of
rank paths (r_1..r_d), closed under prefixes; the node (r_1..r_d) carries the r_d-th most
likely token of q_d. With L committed tokens the cache holds L - 1 of them; one round feeds
the root x_{L-1} and every node in ONE target forward, with the ancestor-or-self mask and
position ids (L - 1) + depth (tree attention), and, for hidden transfer, k pseudo states
per node (each node's pseudo states see the node's path). Greedy verification accepts the
deepest node whose every path token equals the target's argmax at its parent, commits its
path plus the argmax at that node (the bonus token), compacts the path's cache slots behind
the prefix, and takes the next round's drafts from that node's pseudo states (hidden
transfer) or its final hidden state (Medusa). So every committed token is the target's
argmax given its prefix: the output equals greedy autoregressive decoding token for token,
whatever the transfer weights, and a round costs one target forward for a + 1 tokens.

Trees. `sparse_tree` builds Medusa's sparse tree: given per-offset rank accuracies
acc[d, r] = P(the true token at offset d + 2 is the rank-r draft), it greedily adds the
node of largest path score prod_j acc[j, r_j] whose parent is in the tree; the expected
number of accepted drafts of a tree under independent offsets is the sum of its nodes'
path scores (`expected_accepted`). `product_tree` is the full Cartesian tree.

What was checked. No official code exists (the card searched by title and method name; so
did we) and the paper's body could not be read through the search tools: only its abstract
(arXiv, paperswithcode and mirrors). The abstract confirms the core of the card: the
intermediate hidden states of the previous context are transferred to pseudo hidden states
of future tokens, which then pass the following layers, and tree attention generates and
verifies several candidate sequences in one forward, losslessly; the baselines are Medusa
and Self-Speculative decoding. Everything the card marks "(verify)" stays unverified, and
we follow the card on each point:

Differences from the paper (or unverified choices, all from the card):
* Transfer from the last context state only, at one layer t, with identity-initialised maps
  (pseudo state i starts as a copy of h^t_n, the analogue of Medusa's zero-initialised
  residual); whether the paper uses more context states ("hidden states of the previous
  context", plural, in the abstract) or several transfer layers is unverified.
* Cross-entropy on the data's future tokens only; no auxiliary alignment of pseudo to true
  hidden states and no self-distillation.
* Pseudo states get no position embedding: the model adds learned absolute positions at
  layer 0 only, below the injection layer.
* The verification forward carries k pseudo states for every tree node (we do not know the
  accepted node in advance), so it is N (1 + k) slots wide for N tree nodes; Medusa's is N.
* Greedy acceptance only (no typical acceptance or sampling). Self-Speculative decoding
  (layer skipping) is not reimplemented; Medusa-1 is the only baseline.
* Our LM head has a bias; Medusa's copies of it keep the bias (Medusa's heads have none).
* Training (`transfer_drafts`) runs the full sequence uncached with the pseudo states of
  many cut points appended at once (`pseudo_mask` keeps each cut's states on its own
  prefix); decoding (`transfer_forward`) is the cached version of the same computation,
  and the tests check the two against a dense forward with a hand-built mask.
"""

import dataclasses
import functools
import heapq
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxrepro.algorithms.decoding import speculative
from jaxrepro.models import transformer as tfm

PyTree = Any
TRANSFER_INITS = ("identity", "zeros", "random")


# ---------------------------------------------------------------------------------- modules


class TransferMaps(nnx.Module):
  """k linear maps d -> d from one hidden state to k pseudo hidden states."""

  def __init__(self, d_model: int, num_future: int, *, rngs: nnx.Rngs,
               init: str = "identity"):
    """Args: d_model: D; num_future: k >= 1; rngs: for `init="random"`; init: one of
    `TRANSFER_INITS` (identity copies h^t_n, zeros gives zero pseudo states, random is
    N(0, 1/D))."""
    if num_future < 1 or d_model < 1:
      raise ValueError(f"TransferMaps needs d_model >= 1 and num_future >= 1; got {d_model}, "
                       f"{num_future}")
    if init == "identity":
      kernel = jnp.broadcast_to(jnp.eye(d_model), (num_future, d_model, d_model))
    elif init == "zeros":
      kernel = jnp.zeros((num_future, d_model, d_model))
    elif init == "random":
      kernel = jax.random.normal(rngs.params(), (num_future, d_model, d_model))
      kernel = kernel / np.sqrt(d_model)
    else:
      raise ValueError(f"init must be one of {TRANSFER_INITS}; got {init!r}")
    self.kernel = nnx.Param(jnp.asarray(kernel, jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_future, d_model), jnp.float32))

  def __call__(self, h: jax.Array) -> jax.Array:
    """[..., D] float -> [..., k, D] float32 pseudo states (row i = W_i h + b_i)."""
    return jnp.einsum("...d,kde->...ke", h.astype(jnp.float32), self.kernel[...]) + self.bias[...]


class MedusaHeads(nnx.Module):
  """Medusa-1 heads: k residual SiLU blocks on the final hidden state, each with its head."""

  def __init__(self, d_model: int, vocab_size: int, num_heads: int, *, rngs: nnx.Rngs):
    if min(d_model, vocab_size, num_heads) < 1:
      raise ValueError(f"MedusaHeads needs positive sizes; got d_model={d_model}, "
                       f"vocab_size={vocab_size}, num_heads={num_heads}")
    # Zero residual weights: every head starts as the LM head itself (Medusa's init).
    self.res_kernel = nnx.Param(jnp.zeros((num_heads, d_model, d_model), jnp.float32))
    self.res_bias = nnx.Param(jnp.zeros((num_heads, d_model), jnp.float32))
    out = jax.random.normal(rngs.params(), (num_heads, d_model, vocab_size)) / np.sqrt(d_model)
    self.out_kernel = nnx.Param(out.astype(jnp.float32))
    self.out_bias = nnx.Param(jnp.zeros((num_heads, vocab_size), jnp.float32))

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """[..., D] final hidden states -> [..., k, V] float32 draft logits."""
    h = hidden.astype(jnp.float32)
    z = jnp.einsum("...d,kde->...ke", h, self.res_kernel[...]) + self.res_bias[...]
    z = h[..., None, :] + jax.nn.silu(z)
    return jnp.einsum("...kd,kdv->...kv", z, self.out_kernel[...]) + self.out_bias[...]


def init_transfer(d_model: int, num_future: int, key: jax.Array, *,
                  init: str = "identity") -> tuple[nnx.GraphDef, nnx.State]:
  """Builds `TransferMaps` and splits it: (graphdef, params)."""
  return nnx.split(TransferMaps(d_model, num_future, rngs=nnx.Rngs(params=key), init=init))


def init_medusa_heads(target_graphdef: nnx.GraphDef, target_params: nnx.State,
                      num_heads: int, key: jax.Array, *,
                      copy_lm_head: bool = True) -> tuple[nnx.GraphDef, nnx.State]:
  """Builds `MedusaHeads` for a target transformer: (graphdef, params).

  With `copy_lm_head` the output layer of every head starts as the target's LM head
  (kernel and bias), as in Medusa; otherwise it is random (for tests).
  """
  target = nnx.merge(target_graphdef, target_params)
  cfg = target.cfg
  heads = MedusaHeads(cfg.d_model, cfg.output_size or cfg.vocab_size, num_heads,
                      rngs=nnx.Rngs(params=key))
  if copy_lm_head:
    heads.out_kernel[...] = jnp.broadcast_to(target.head.kernel[...], heads.out_kernel.shape)
    heads.out_bias[...] = jnp.broadcast_to(target.head.bias[...], heads.out_bias.shape)
  return nnx.split(heads)


# ------------------------------------------------------------------------- forward passes


class TreeLMOutput(NamedTuple):
  """A cached forward that also drafts.

  Attributes:
    logits: [B, T, V] float32 next-token logits of the T new tokens.
    drafts: [B, S, k, V] float32 draft logits: row s, offset i is the draft for the token
      i + 1 places after the next token of source s (S = T unless sources were given).
    hidden: [B, T, D] final hidden states (after the final LayerNorm) of the new tokens.
    cache: the cache with `lengths` advanced by T (pseudo-state slots beyond are garbage).
  """
  logits: jax.Array
  drafts: jax.Array
  hidden: jax.Array
  cache: tfm.KVCache


def _new_mask(mask: jax.Array | None, batch: int, t: int) -> jax.Array:
  """[B, T, T] bool among the new tokens: causal when `mask` is None."""
  if mask is None:
    mask = jnp.tril(jnp.ones((t, t), bool))
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_ or mask.shape[-2:] != (t, t) or mask.ndim not in (2, 3):
    raise ValueError(f"mask must be bool [T, T] or [B, T, T] with T={t}; got {mask.dtype} "
                     f"{list(mask.shape)}")
  return jnp.broadcast_to(mask, (batch, t, t))


def pseudo_mask(mask: jax.Array, sources: jax.Array, num_future: int) -> jax.Array:
  """Attention among [T tokens; k pseudo states per source] (source-major, offset-minor).

  Token rows keep `mask` and never see pseudo states; pseudo state (s, i) sees the tokens
  that its source token s sees (itself included) and the pseudo states (s, j <= i).

  Args:
    mask: [B, T, T] bool among the tokens (True = attend).
    sources: [B, S] int, the token index each group of pseudo states is transferred from.
    num_future: k.

  Returns:
    [B, T + S k, T + S k] bool.
  """
  b, t, _ = mask.shape
  s, k = sources.shape[1], num_future
  rows = jnp.take_along_axis(mask, sources[:, :, None], axis=1)  # [B, S, T]
  bottom_left = jnp.repeat(rows, k, axis=1)
  same = np.eye(s, dtype=bool)[:, None, :, None] & np.tril(np.ones((k, k), bool))[None, :,
                                                                                 None, :]
  bottom_right = jnp.broadcast_to(same.reshape(s * k, s * k), (b, s * k, s * k))
  top = jnp.concatenate([mask, jnp.zeros((b, t, s * k), bool)], axis=2)
  return jnp.concatenate([top, jnp.concatenate([bottom_left, bottom_right], axis=2)], axis=1)


def transfer_forward(target_graphdef: nnx.GraphDef, target_params: nnx.State,
                     transfer_graphdef: nnx.GraphDef, transfer_params: nnx.State,
                     cache: tfm.KVCache, tokens: jax.Array,
                     positions: jax.Array | None = None, mask: jax.Array | None = None,
                     sources: jax.Array | None = None, *, layer: int) -> TreeLMOutput:
  """Cached forward of the frozen target with hidden transfer at `layer` (use in `jax.jit`).

  Blocks 0..layer-1 run on the T new tokens; the transfer maps turn the layer-`layer`
  states of the source tokens into k pseudo states each, appended after the tokens (slots
  lengths + T ..); blocks layer..L-1 run on both under `pseudo_mask`; the head reads all.

  Args:
    target_graphdef, target_params: the frozen causal `tfm.Transformer`.
    transfer_graphdef, transfer_params: `TransferMaps`.
    cache: KVCache with at least lengths + T (1 + k) slots (T + S k with `sources`).
    tokens: [B, T] int new tokens.
    positions: [B, T] int position ids (default lengths + 0..T-1).
    mask: bool [T, T] or [B, T, T] among the new tokens (default causal).
    sources: [B, S] int indices into the T new tokens that get pseudo states (default
      all T, in order).
    layer: static transfer layer t in 0..L (t = L: the maps feed the head directly).

  Returns:
    TreeLMOutput(logits [B, T, V], drafts [B, S, k, V], hidden [B, T, D], cache).
  """
  num_layers = nnx.merge(target_graphdef, target_params).cfg.num_layers
  if not 0 <= layer <= num_layers:
    raise ValueError(f"layer must be in 0..num_layers={num_layers}; got {layer}")
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, T]; got shape {list(tokens.shape)}")
  b, t = tokens.shape
  if positions is None:
    positions = cache.lengths[:, None] + jnp.arange(t)[None]
  if sources is None:
    sources = jnp.broadcast_to(jnp.arange(t), (b, t))
  new_mask = _new_mask(mask, b, t)
  h = tfm.add_positions(target_graphdef, target_params,
                        tfm.embed(target_graphdef, target_params, tokens), positions)
  h, cache = tfm.run_layers(target_graphdef, target_params, h, cache, start=0, stop=layer,
                            mask=new_mask)
  h_src = jnp.take_along_axis(h, sources[:, :, None], axis=1)  # [B, S, D]
  pseudo = nnx.merge(transfer_graphdef, transfer_params)(h_src)  # [B, S, k, D]
  s, k = pseudo.shape[1], pseudo.shape[2]
  h_all = jnp.concatenate([h, pseudo.reshape(b, s * k, -1).astype(h.dtype)], axis=1)
  h_all, cache = tfm.run_layers(target_graphdef, target_params, h_all, cache, start=layer,
                                stop=num_layers, mask=pseudo_mask(new_mask, sources, k))
  logits, hidden = tfm.head(target_graphdef, target_params, h_all)
  return TreeLMOutput(logits=logits[:, :t], drafts=logits[:, t:].reshape(b, s, k, -1),
                      hidden=hidden[:, :t], cache=cache._replace(lengths=cache.lengths + t))


def medusa_forward(target_graphdef: nnx.GraphDef, target_params: nnx.State,
                   heads_graphdef: nnx.GraphDef, heads_params: nnx.State, cache: tfm.KVCache,
                   tokens: jax.Array, positions: jax.Array | None = None,
                   mask: jax.Array | None = None) -> TreeLMOutput:
  """Cached forward of the target with Medusa heads on every new token's final hidden state.

  Returns:
    TreeLMOutput(logits [B, T, V], drafts [B, T, k, V], hidden [B, T, D], cache).
  """
  out = tfm.apply_cached(target_graphdef, target_params, cache, tokens, positions, mask)
  drafts = nnx.merge(heads_graphdef, heads_params)(out.hidden)
  return TreeLMOutput(out.logits, drafts, out.hidden, out.cache)


def transfer_drafts(target_graphdef: nnx.GraphDef, target_params: nnx.State,
                    transfer_graphdef: nnx.GraphDef, transfer_params: nnx.State,
                    tokens: jax.Array, cuts: jax.Array, *, layer: int) -> jax.Array:
  """Teacher-forced hidden-transfer drafts at chosen cut points (training, evaluation).

  The same computation as `transfer_forward` with `sources=cuts` on an empty cache, but
  without a cache: full-sequence blocks under an explicit mask, which is several times
  cheaper to differentiate than the cache writes.

  Args:
    tokens: [B, S] int sequences.
    cuts: [B, C] int positions n in 0..S-1; the drafts of cut n read x_<=n only.
    layer: the transfer layer t (static, 0..num_layers).

  Returns:
    [B, C, k, V] float32 logits; [b, c, i] drafts token cuts[b, c] + 2 + i.
  """
  model = nnx.merge(target_graphdef, target_params)
  if not 0 <= layer <= model.cfg.num_layers:
    raise ValueError(f"layer must be in 0..num_layers={model.cfg.num_layers}; got {layer}")
  b, s = tokens.shape
  h = model.add_positions(model.embed(tokens), jnp.broadcast_to(jnp.arange(s), (b, s)))
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (b, s, s))
  for block in model.blocks[:layer]:
    h = block(h, causal[:, None])
  h_src = jnp.take_along_axis(h, cuts[:, :, None], axis=1)  # [B, C, D]
  pseudo = nnx.merge(transfer_graphdef, transfer_params)(h_src)  # [B, C, k, D]
  c, k = pseudo.shape[1], pseudo.shape[2]
  h = jnp.concatenate([h, pseudo.reshape(b, c * k, -1).astype(h.dtype)], axis=1)
  mask = pseudo_mask(causal, cuts, k)[:, None]
  for block in model.blocks[layer:]:
    h = block(h, mask)
  logits, _ = model.output(h[:, s:])
  return logits.reshape(b, c, k, -1)


def medusa_drafts(target_graphdef: nnx.GraphDef, target_params: nnx.State,
                  heads_graphdef: nnx.GraphDef, heads_params: nnx.State, tokens: jax.Array,
                  cuts: jax.Array) -> jax.Array:
  """Teacher-forced Medusa drafts at cut points: [B, S] tokens, [B, C] cuts -> [B, C, k, V]."""
  _, hidden = tfm.apply_transformer(target_graphdef, target_params, tokens, return_hidden=True)
  hidden = jnp.take_along_axis(hidden, cuts[:, :, None], axis=1)
  return nnx.merge(heads_graphdef, heads_params)(hidden)


def future_targets(tokens: jax.Array, cuts: jax.Array, num_future: int) -> jax.Array:
  """The tokens the drafts of each cut predict: [B, S], [B, C] -> [B, C, k] (x_{n+2..n+k+1})."""
  idx = cuts[:, :, None] + 2 + jnp.arange(num_future)[None, None]
  return jnp.take_along_axis(tokens[:, None, :], idx, axis=2)


def draft_cross_entropy(drafts: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of draft logits [..., k, V] at targets [..., k]: (mean, [k] per offset)."""
  logp = jax.nn.log_softmax(drafts.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  per_offset = jnp.mean(nll.reshape(-1, nll.shape[-1]), axis=0)
  return jnp.mean(per_offset), per_offset


def target_ranks(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Rank of each target among the logits (0 = argmax; ties count in its favour).

  Args: logits [..., V]; targets [...] int. Returns [...] int32.
  """
  own = jnp.take_along_axis(logits, targets[..., None], axis=-1)
  return jnp.sum(logits > own, axis=-1).astype(jnp.int32)


def rank_accuracy(drafts: jax.Array, targets: jax.Array, num_ranks: int) -> jax.Array:
  """acc[i, r]: the fraction of targets that are the rank-r draft of offset i.

  Args: drafts [..., k, V]; targets [..., k]; num_ranks: s. Returns [k, s] float32.
  """
  ranks = target_ranks(drafts, targets).reshape(-1, drafts.shape[-2])
  hits = ranks[:, :, None] == jnp.arange(num_ranks)[None, None]
  return jnp.mean(hits.astype(jnp.float32), axis=0)


# ------------------------------------------------------------------------------------ trees


@dataclasses.dataclass(frozen=True)
class Tree:
  """A static candidate tree of rank paths (hashable; arrays are derived on demand).

  Attributes:
    paths: the nodes as rank paths in breadth-first order, the root `()` first; node
      (r_1..r_d) carries the r_d-th most likely draft of offset d.
  """
  paths: tuple[tuple[int, ...], ...]

  @property
  def num_nodes(self) -> int:
    """N, the root included."""
    return len(self.paths)

  @property
  def max_depth(self) -> int:
    return max(len(p) for p in self.paths)

  @property
  def max_rank(self) -> int:
    """The number of ranks s the tree reads per offset (1 + the largest rank)."""
    return 1 + max((p[-1] for p in self.paths if p), default=0)

  @functools.cached_property
  def depth(self) -> np.ndarray:
    """[N] int32 depth of each node (root 0)."""
    return np.asarray([len(p) for p in self.paths], np.int32)

  @functools.cached_property
  def rank(self) -> np.ndarray:
    """[N] int32 rank of each node's own token (root 0)."""
    return np.asarray([p[-1] if p else 0 for p in self.paths], np.int32)

  @functools.cached_property
  def parent(self) -> np.ndarray:
    """[N] int32 index of each node's parent (root -1)."""
    index = {p: i for i, p in enumerate(self.paths)}
    return np.asarray([index[p[:-1]] if p else -1 for p in self.paths], np.int32)

  @functools.cached_property
  def ancestors(self) -> np.ndarray:
    """[N, max_depth + 1] int32: column d is the ancestor at depth d (self at its depth),
    -1 below the node."""
    index = {p: i for i, p in enumerate(self.paths)}
    out = np.full((self.num_nodes, self.max_depth + 1), -1, np.int32)
    for i, p in enumerate(self.paths):
      for d in range(len(p) + 1):
        out[i, d] = index[p[:d]]
    return out

  @functools.cached_property
  def mask(self) -> np.ndarray:
    """[N, N] bool ancestor-or-self mask (tree attention)."""
    out = np.zeros((self.num_nodes, self.num_nodes), bool)
    for i, row in enumerate(self.ancestors):
      out[i, row[row >= 0]] = True
    return out


def make_tree(paths: Sequence[Sequence[int]]) -> Tree:
  """A `Tree` from rank paths (the root may be omitted; order does not matter).

  Raises:
    ValueError: a negative rank, a duplicate, or a path whose prefix is missing.
  """
  tuples = [tuple(int(r) for r in p) for p in paths]
  if any(r < 0 for p in tuples for r in p):
    raise ValueError(f"paths must hold ranks >= 0; got {list(paths)}")
  nonroot = [p for p in tuples if p]
  if len(set(nonroot)) != len(nonroot):
    raise ValueError(f"paths contain duplicates: {list(paths)}")
  nodes = set(nonroot) | {()}
  for p in nodes:
    if p and p[:-1] not in nodes:
      raise ValueError(f"path {p} has no parent {p[:-1]} in the tree (paths must be closed "
                       "under prefixes)")
  return Tree(tuple(sorted(nodes, key=lambda p: (len(p), p))))


def chain_tree(depth: int) -> Tree:
  """The single chain of top-1 drafts (ordinary one-draft-per-offset verification)."""
  if depth < 0:
    raise ValueError(f"depth must be >= 0; got {depth}")
  return make_tree([(0,) * d for d in range(1, depth + 1)])


def product_tree(widths: Sequence[int]) -> Tree:
  """Every combination of the top widths[d] drafts of offsets d = 1..len(widths)."""
  if not widths or min(widths) < 1:
    raise ValueError(f"widths must be a non-empty list of ints >= 1; got {widths}")
  paths = []
  for d in range(1, len(widths) + 1):
    paths += itertools.product(*[range(w) for w in widths[:d]])
  return make_tree(paths)


def sparse_tree(accuracy, num_candidates: int) -> Tree:
  """Medusa's sparse tree: greedily the frontier node of largest path score.

  Args:
    accuracy: [k, s] acc[d, r] = P(the true token at offset d + 2 is the rank-r draft).
    num_candidates: tree nodes besides the root (M >= 1).

  Returns:
    The tree maximising `expected_accepted` greedily (parents always enter first).
  """
  acc = np.asarray(accuracy, np.float64)
  if acc.ndim != 2 or num_candidates < 1:
    raise ValueError(f"accuracy must be [k, s] and num_candidates >= 1; got shape "
                     f"{acc.shape}, {num_candidates}")
  k, s = acc.shape
  frontier = [(-acc[0, r], (r,)) for r in range(s)]
  heapq.heapify(frontier)
  chosen = []
  while frontier and len(chosen) < num_candidates:
    neg_score, path = heapq.heappop(frontier)
    chosen.append(path)
    if len(path) < k:
      for r in range(s):
        heapq.heappush(frontier, (neg_score * acc[len(path), r], path + (r,)))
  return make_tree(chosen)


def expected_accepted(tree: Tree, accuracy) -> float:
  """Sum over non-root nodes of prod_d acc[d, r_d]: the mean accepted drafts per round if
  offsets were independent (one node per depth can be right)."""
  acc = np.asarray(accuracy, np.float64)
  if tree.max_depth > acc.shape[0] or tree.max_rank > acc.shape[1]:
    raise ValueError(f"tree needs accuracy of shape >= ({tree.max_depth}, {tree.max_rank}); "
                     f"got {acc.shape}")
  return float(sum(np.prod([acc[d, r] for d, r in enumerate(p)]) for p in tree.paths if p))


def tree_tokens(tree: Tree, root: jax.Array, drafts: jax.Array) -> jax.Array:
  """Tokens of the tree's nodes: root, then the rank-r_d draft of offset d per node.

  Args:
    tree: the static tree (depth <= k).
    root: int32 scalar, the last committed token.
    drafts: [k, V] draft logits for offsets 1..k.

  Returns:
    [N] int32.
  """
  _, top = lax.top_k(drafts, tree.max_rank)  # [k, s]
  depth, rank = jnp.asarray(tree.depth), jnp.asarray(tree.rank)
  tokens = top[jnp.maximum(depth - 1, 0), rank]
  return jnp.where(depth == 0, root, tokens).astype(jnp.int32)


class TreeVerdict(NamedTuple):
  """Outcome of greedy tree verification.

  Attributes:
    num_accepted: int32 scalar a, the depth of the deepest fully correct node.
    node: int32 scalar index of that node (0 = root when a = 0).
    next_token: int32 scalar, the target's argmax at that node (the bonus token).
    path: [max_depth + 1] int32 node indices root..node; entries j > a are j itself.
  """
  num_accepted: jax.Array
  node: jax.Array
  next_token: jax.Array
  path: jax.Array


def verify_tree_greedy(tree: Tree, tokens: jax.Array, logits: jax.Array) -> TreeVerdict:
  """Greedy verification of a token tree from the target's logits at every node.

  Args:
    tree: the static tree.
    tokens: [N] int32 node tokens (node 0 = root).
    logits: [N, V] target logits at each node (tree attention).

  Returns:
    TreeVerdict.
  """
  n = tree.num_nodes
  if tokens.shape != (n,) or logits.shape[:1] != (n,):
    raise ValueError(f"need tokens [{n}] and logits [{n}, V]; got {list(tokens.shape)}, "
                     f"{list(logits.shape)}")
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  parent = jnp.asarray(np.maximum(tree.parent, 0))
  correct = (tokens == pred[parent]) | (jnp.arange(n) == 0)
  anc = jnp.asarray(tree.ancestors)
  on_path = jnp.all(jnp.where(anc >= 0, correct[jnp.maximum(anc, 0)], True), axis=1)
  depth = jnp.asarray(tree.depth)
  node = jnp.argmax(jnp.where(on_path, depth, -1)).astype(jnp.int32)  # first deepest
  a = depth[node]
  steps = jnp.arange(tree.max_depth + 1, dtype=jnp.int32)
  path = jnp.where(steps <= a, anc[node], steps)
  return TreeVerdict(a, node, pred[node], path)


# ------------------------------------------------------------------------------ tree decode


class TreeLM(NamedTuple):
  """A target LM that drafts for tree decoding (pure functions; hashable).

  Attributes:
    init_cache: `(batch_size, num_slots) -> cache` with `.lengths [B]`.
    apply: `(params, cache, tokens [B, T], positions [B, T] | None, mask [B, T, T] | None)
      -> TreeLMOutput` with drafts for every new token ([B, T, k, V]).
    compact: `(cache, start [B], indices [B, N]) -> cache`, slot start + j <- start +
      indices[j] (`tfm.compact_cache` for the transformer).
    vocab_size: V.
    num_drafts: k, the offsets drafted per token.
    slots_per_token: cache slots one new token uses in `apply` (1 + k with pseudo states).
    max_len: positions must stay below this (None: unbounded).
  """
  init_cache: Callable
  apply: Callable[..., TreeLMOutput]
  compact: Callable
  vocab_size: int
  num_drafts: int
  slots_per_token: int = 1
  max_len: int | None = None


def hidden_transfer_lm(cfg: tfm.TransformerConfig, target_graphdef: nnx.GraphDef,
                       transfer_graphdef: nnx.GraphDef, *, num_future: int,
                       layer: int) -> TreeLM:
  """The target with hidden transfer as a `TreeLM`; params = (target, transfer) states."""
  if not cfg.causal or not 0 <= layer <= cfg.num_layers:
    raise ValueError(f"need a causal target and layer in 0..{cfg.num_layers}; got "
                     f"causal={cfg.causal}, layer={layer}")

  def apply(params, cache, tokens, positions=None, mask=None):
    target_params, transfer_params = params
    return transfer_forward(target_graphdef, target_params, transfer_graphdef,
                            transfer_params, cache, tokens, positions, mask, layer=layer)

  return TreeLM(lambda b, n: tfm.init_cache(cfg, b, n), apply, tfm.compact_cache,
                cfg.output_size or cfg.vocab_size, num_future, 1 + num_future, cfg.max_len)


def medusa_lm(cfg: tfm.TransformerConfig, target_graphdef: nnx.GraphDef,
              heads_graphdef: nnx.GraphDef, *, num_heads: int) -> TreeLM:
  """The target with Medusa heads as a `TreeLM`; params = (target, heads) states."""
  if not cfg.causal:
    raise ValueError("medusa_lm needs a causal TransformerConfig")

  def apply(params, cache, tokens, positions=None, mask=None):
    target_params, heads_params = params
    return medusa_forward(target_graphdef, target_params, heads_graphdef, heads_params,
                          cache, tokens, positions, mask)

  return TreeLM(lambda b, n: tfm.init_cache(cfg, b, n), apply, tfm.compact_cache,
                cfg.output_size or cfg.vocab_size, num_heads, 1, cfg.max_len)


def make_tree_decoder(lm: TreeLM, tree: Tree, *, prompt_len: int, max_new: int):
  """Builds the jitted greedy tree decoder (token-identical to greedy AR decoding).

  Prefill feeds the prompt buffer once (its drafts at position prompt_len - 2 seed the
  first tree) and keeps prompt_len - 1 slots; each round then costs one `lm.apply` over
  the tree (module docstring). Statistics follow `speculative.DecodeOutput`; `drafted[r]`
  is the number of candidate nodes scored in round r (N - 1) and `draft_calls` is 0.

  Args:
    lm: the drafting target.
    tree: the static candidate tree; its depth must not exceed `lm.num_drafts` and its
      ranks must stay below the vocabulary size.
    prompt_len: P >= 2, the static length of the prompt buffer.
    max_new: tokens to generate (>= 1).

  Returns:
    `decode(params, prompt [P] int, prompt_len int32 scalar in 2..P) -> DecodeOutput`.
  """
  if prompt_len < 2 or max_new < 1:
    raise ValueError(f"need prompt_len >= 2 and max_new >= 1; got {prompt_len}, {max_new}")
  depth, n = tree.max_depth, tree.num_nodes
  if depth < 1 or depth > lm.num_drafts or tree.max_rank > lm.vocab_size:
    raise ValueError(f"tree of depth {depth} and {tree.max_rank} ranks needs 1 <= depth <= "
                     f"num_drafts={lm.num_drafts} and ranks <= vocab_size={lm.vocab_size}")
  if lm.max_len is not None and prompt_len + max_new + depth - 1 > lm.max_len:
    raise ValueError(f"prompt_len {prompt_len} + max_new {max_new} + tree depth {depth} "
                     f"needs positions up to {prompt_len + max_new + depth - 2}, beyond "
                     f"max_len {lm.max_len}")
  buf = prompt_len + max_new + depth + 1
  spt = lm.slots_per_token
  slots = max(prompt_len * spt, prompt_len + max_new - 1 + n * spt)
  node_depth = jnp.asarray(tree.depth)
  mask = jnp.asarray(tree.mask)

  def decode(params, prompt, length):
    length = jnp.asarray(length, jnp.int32)
    tokens = jnp.zeros((buf,), jnp.int32).at[:prompt_len].set(prompt.astype(jnp.int32))
    out = lm.apply(params, lm.init_cache(1, slots), tokens[None, :prompt_len], None, None)
    # The last prompt token is the first round's root; the drafts of the one before it
    # predict the tokens after it.
    drafts = out.drafts[0, length - 2]
    cache = out.cache._replace(lengths=jnp.reshape(length - 1, (1,)))
    end = length + max_new

    def body(c):
      tokens, cur, cache, drafts, r, log = c
      nodes = tree_tokens(tree, tokens[cur - 1], drafts)
      out = lm.apply(params, cache, nodes[None], (cur - 1 + node_depth)[None], mask[None])
      v = verify_tree_greedy(tree, nodes, out.logits[0])
      # Accepted path tokens at cur.., then the bonus right after them; later slots hold
      # garbage that the next rounds overwrite.
      tokens = lax.dynamic_update_slice(tokens, nodes[v.path[1:]], (cur,))
      tokens = tokens.at[cur + v.num_accepted].set(v.next_token)
      cache = lm.compact(out.cache, jnp.reshape(cur - 1, (1,)), v.path[None])
      cache = cache._replace(lengths=jnp.reshape(cur + v.num_accepted, (1,)))
      return (tokens, cur + v.num_accepted + 1, cache, out.drafts[0, v.node], r + 1,
              log.at[r].set(v.num_accepted))

    minus = jnp.full((max_new,), -1, jnp.int32)
    tokens, cur, _, _, r, log = lax.while_loop(
        lambda c: c[1] < end, body, (tokens, length, cache, drafts, jnp.int32(0), minus))
    return speculative.DecodeOutput(
        tokens=lax.dynamic_slice(tokens, (length,), (max_new,)), num_generated=cur - length,
        target_calls=r, draft_calls=jnp.int32(0), rounds=r, accepted=log,
        drafted=jnp.where(log >= 0, n - 1, -1).astype(jnp.int32))

  return jax.jit(decode)
