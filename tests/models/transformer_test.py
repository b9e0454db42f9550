"""Tests of the NNX transformer: shapes, causal / bidirectional dependence, attention oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrepro.models import transformer as tfm

L, VOCAB = 8, 11


@pytest.fixture(scope="module", params=[False, True], ids=["bidirectional", "causal"])
def model(request):
  cfg = tfm.TransformerConfig(vocab_size=VOCAB, max_len=L, num_layers=2, d_model=32,
                              num_heads=4, causal=request.param, output_size=VOCAB - 1)
  graphdef, params = tfm.init_transformer(cfg, jax.random.key(0))
  apply = jax.jit(lambda p, x: tfm.apply_transformer(graphdef, p, x))
  return cfg, params, apply


def test_shapes_and_dtype(model):
  cfg, params, apply = model
  x = jax.random.randint(jax.random.key(1), (3, L), 0, VOCAB)
  out = apply(params, x)
  assert out.shape == (3, L, VOCAB - 1) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  # Shorter sequences use the first rows of the position table.
  assert apply(params, x[:, :5]).shape == (3, 5, VOCAB - 1)


def test_dependence_structure(model):
  cfg, params, apply = model
  x = jax.random.randint(jax.random.key(2), (1, L), 0, VOCAB)
  base = np.asarray(apply(params, x))[0]
  for j in range(L):
    y = x.at[0, j].set((x[0, j] + 1) % VOCAB)
    diff = np.abs(np.asarray(apply(params, y))[0] - base).max(-1)  # [L]
    if cfg.causal:
      # Outputs before j cannot see token j; outputs at and after j must.
      assert np.all(diff[:j] == 0.0), j
      assert np.all(diff[j:] > 1e-6), j
    else:
      assert np.all(diff > 1e-6), j


def test_batch_rows_are_independent(model):
  _, params, apply = model
  x = jax.random.randint(jax.random.key(3), (4, L), 0, VOCAB)
  full = np.asarray(apply(params, x))
  for b in range(4):
    np.testing.assert_allclose(np.asarray(apply(params, x[b:b + 1]))[0], full[b],
                               rtol=1e-5, atol=1e-5)


def test_attention_matches_numpy_reference():
  rngs = nnx.Rngs(params=jax.random.key(4))
  attn = tfm.MultiHeadAttention(16, 4, dtype=jnp.float32, rngs=rngs)
  h = np.asarray(jax.random.normal(jax.random.key(5), (2, 6, 16)))
  mask = np.asarray(tfm.causal_mask(6))
  out = np.asarray(attn(jnp.asarray(h), jnp.asarray(mask)))

  def dense(layer, z):
    return z @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])

  q, k, v = (dense(m, h).reshape(2, 6, 4, 4) for m in (attn.query, attn.key, attn.value))
  ref = np.zeros((2, 6, 4, 4))
  for b in range(2):
    for head in range(4):
      s = q[b, :, head] @ k[b, :, head].T / 2.0
      s = np.where(mask[0, 0], s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      ref[b, :, head] = (w / w.sum(-1, keepdims=True)) @ v[b, :, head]
  ref = dense(attn.out, ref.reshape(2, 6, 16))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_no_shared_submodules_and_param_count():
  cfg = tfm.TransformerConfig(vocab_size=VOCAB, max_len=L, num_layers=3, d_model=16,
                              num_heads=2, d_ff=24)
  _, params = tfm.init_transformer(cfg, jax.random.key(6))
  leaves = jax.tree.leaves(params)
  assert len({id(x) for x in leaves}) == len(leaves)
  d, f = 16, 24
  per_block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
  expected = VOCAB * d + L * d + 3 * per_block + 2 * d + d * VOCAB + VOCAB
  assert sum(x.size for x in leaves) == expected


def test_bfloat16_runs():
  cfg = tfm.TransformerConfig(vocab_size=VOCAB, max_len=L, d_model=16, num_heads=2,
                              dtype="bfloat16")
  graphdef, params = tfm.init_transformer(cfg, jax.random.key(7))
  out = tfm.apply_transformer(graphdef, params, jnp.zeros((2, L), jnp.int32))
  assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=3), "num_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(dtype="float16"), "dtype"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tfm.TransformerConfig(vocab_size=VOCAB, max_len=L, **kwargs)


def test_too_long_input_raises():
  cfg = tfm.TransformerConfig(vocab_size=VOCAB, max_len=4, d_model=16, num_heads=2)
  graphdef, params = tfm.init_transformer(cfg, jax.random.key(8))
  with pytest.raises(ValueError, match="max_len"):
    tfm.apply_transformer(graphdef, params, jnp.zeros((1, 5), jnp.int32))


# --------------------------------------------------------------------------------- KV cache

CAUSAL = tfm.TransformerConfig(vocab_size=VOCAB, max_len=16, num_layers=2, d_model=32,
                               num_heads=4, causal=True)
_GRAPHDEF, _PARAMS = tfm.init_transformer(CAUSAL, jax.random.key(11))
_full_jit = jax.jit(lambda x: tfm.apply_transformer(_GRAPHDEF, _PARAMS, x, return_hidden=True))


def _full(x):
  """Full causal recomputation; sequences are padded to max_len so one compile serves all
  (outputs at a position never depend on later tokens)."""
  n = x.shape[1]
  logits, hidden = _full_jit(jnp.pad(x, ((0, 0), (0, CAUSAL.max_len - n))))
  return logits[:, :n], hidden[:, :n]
_cached = jax.jit(lambda c, x, pos, m: tfm.apply_cached(_GRAPHDEF, _PARAMS, c, x, pos, m))
_cached_default = jax.jit(lambda c, x: tfm.apply_cached(_GRAPHDEF, _PARAMS, c, x))


def _tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def test_prefill_then_single_steps_equal_full_recomputation():
  x = _tokens(20, (2, 12))
  logits, hidden = _full(x)
  out = _cached_default(tfm.init_cache(CAUSAL, 2), x[:, :5])
  got_l, got_h, cache = [out.logits], [out.hidden], out.cache
  for t in range(5, 12):
    out = _cached_default(cache, x[:, t:t + 1])
    got_l.append(out.logits)
    got_h.append(out.hidden)
    cache = out.cache
  np.testing.assert_allclose(np.concatenate(got_l, 1), logits, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.concatenate(got_h, 1), hidden, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(cache.lengths, [12, 12])
  assert cache.k.shape == (2, 2, 4, 16, 8)  # [layers, B, H, T_max, Dh]


def test_chunks_of_several_sizes_and_ragged_rows():
  x = _tokens(21, (2, 14))
  ref = np.asarray(_full(x)[0])
  cache = tfm.init_cache(CAUSAL, 2, max_len=15)
  # Row 1 keeps one token fewer after the prefill (rollback), so rows sit at different
  # lengths and positions from then on.
  out = _cached_default(cache, x[:, :4])
  cache = out.cache._replace(lengths=jnp.array([4, 3], jnp.int32))
  np.testing.assert_allclose(out.logits[0], ref[0, :4], atol=2e-5, rtol=1e-5)
  pos = {0: 4, 1: 3}
  for size in (3, 1, 4, 2):
    chunk = jnp.stack([x[b, pos[b]:pos[b] + size] for b in (0, 1)])
    out = _cached_default(cache, chunk)
    cache = out.cache
    for b in (0, 1):
      np.testing.assert_allclose(out.logits[b], ref[b, pos[b]:pos[b] + size], atol=2e-5,
                                 rtol=1e-5)
      pos[b] += size
  np.testing.assert_array_equal(cache.lengths, [14, 13])


def test_rollback_then_new_tokens_equal_fresh_sequence():
  x = _tokens(22, (1, 10))
  y = x.at[0, 6:].set((x[0, 6:] + 3) % VOCAB)
  out = _cached_default(tfm.init_cache(CAUSAL, 1), x)  # writes all 10 slots
  cache = out.cache._replace(lengths=jnp.array([6], jnp.int32))  # reject the last 4
  got = _cached_default(cache, y[:, 6:]).logits
  np.testing.assert_allclose(got, _full(y)[0][:, 6:], atol=2e-5, rtol=1e-5)
  assert np.abs(np.asarray(got) - np.asarray(out.logits[:, 6:])).max() > 1e-3


def _random_tree(rng, n):
  """Parents of n nodes (node 0 is the root, parent -1) and the ancestor-or-self mask."""
  parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
  mask = np.zeros((n, n), bool)
  depth = np.zeros(n, int)
  for i in range(n):
    j = i
    while j >= 0:
      mask[i, j] = True
      j = parents[j]
    depth[i] = mask[i].sum() - 1
  return parents, mask, depth


def _path(parents, i):
  path = []
  while i >= 0:
    path.append(i)
    i = parents[i]
  return path[::-1]


def test_tree_attention_equals_sequential_paths():
  rng = np.random.default_rng(0)
  prefix = _tokens(23, (1, 5))
  n = 7
  parents, mask, depth = _random_tree(rng, n)
  nodes = jnp.asarray(rng.integers(0, VOCAB, n), jnp.int32)[None]
  cache = _cached_default(tfm.init_cache(CAUSAL, 1), prefix).cache
  positions = jnp.asarray(5 + depth, jnp.int32)[None]
  out = _cached(cache, nodes, positions, jnp.asarray(mask)[None])
  seqs = [np.concatenate([prefix[0], nodes[0, _path(parents, i)]]) for i in range(n)]
  padded = jnp.asarray([np.pad(q, (0, CAUSAL.max_len - len(q))) for q in seqs])
  ref = np.asarray(_full_jit(padded)[0])
  for i in range(n):
    np.testing.assert_allclose(out.logits[0, i], ref[i, len(seqs[i]) - 1], atol=2e-5,
                               rtol=1e-5, err_msg=f"node {i}")
  # A chain-shaped tree's mask is the causal mask: same logits as the default path.
  chain = jnp.asarray(np.tril(np.ones((n, n), bool)))
  np.testing.assert_allclose(_cached(cache, nodes, None, chain).logits,
                             _cached_default(cache, nodes).logits, atol=1e-6)


def test_compacting_an_accepted_tree_path_gives_the_sequential_cache():
  rng = np.random.default_rng(1)
  prefix = _tokens(24, (1, 4))
  parents, mask, depth = _random_tree(rng, 6)
  nodes = jnp.asarray(rng.integers(0, VOCAB, 6), jnp.int32)[None]
  cache = _cached_default(tfm.init_cache(CAUSAL, 1), prefix).cache
  out = _cached(cache, nodes, jnp.asarray(4 + depth, jnp.int32)[None], jnp.asarray(mask)[None])
  leaf = int(np.argmax(depth))
  path = _path(parents, leaf)
  idx = np.arange(6)
  idx[:len(path)] = path
  compact = tfm.compact_cache(out.cache, jnp.array([4]), jnp.asarray(idx)[None])
  compact = compact._replace(lengths=jnp.array([4 + len(path)], jnp.int32))
  nxt = _tokens(25, (1, 2))
  got = _cached_default(compact, nxt).logits
  seq = jnp.concatenate([prefix, nodes[:, path], nxt], axis=1)
  np.testing.assert_allclose(got, _full(seq)[0][:, -2:], atol=2e-5, rtol=1e-5)


def test_layer_split_and_soft_embeddings():
  x = _tokens(26, (2, 6))
  ref = _cached_default(tfm.init_cache(CAUSAL, 2), x)

  @jax.jit
  def split(x):
    cache = tfm.init_cache(CAUSAL, 2)
    onehot = jax.nn.one_hot(x, VOCAB)
    emb = tfm.embed_soft(_GRAPHDEF, _PARAMS, onehot)
    h = tfm.add_positions(_GRAPHDEF, _PARAMS, emb, jnp.broadcast_to(jnp.arange(6), (2, 6)))
    h, cache = tfm.run_layers(_GRAPHDEF, _PARAMS, h, cache, start=0, stop=1)
    h, cache = tfm.run_layers(_GRAPHDEF, _PARAMS, h, cache, start=1, stop=2)
    return tfm.head(_GRAPHDEF, _PARAMS, h), cache, emb, tfm.embed(_GRAPHDEF, _PARAMS, x)

  (logits, hidden), cache, soft, hard = split(x)
  np.testing.assert_array_equal(soft, hard)  # one-hot mixtures are exact lookups
  np.testing.assert_allclose(logits, ref.logits, atol=1e-6)
  np.testing.assert_allclose(hidden, ref.hidden, atol=1e-6)
  np.testing.assert_allclose(cache.k, ref.cache.k, atol=1e-6)
  np.testing.assert_array_equal(cache.lengths, [0, 0])  # run_layers does not commit
  # embed_soft is linear in the weights.
  w1, w2 = (jax.random.uniform(jax.random.key(s), (3, VOCAB)) for s in (27, 28))
  f = lambda w: tfm.embed_soft(_GRAPHDEF, _PARAMS, w)
  np.testing.assert_allclose(f(2 * w1 - w2), 2 * f(w1) - f(w2), atol=1e-5)
  # Feeding embeddings instead of tokens gives the same cached forward.
  out = tfm.apply_cached(_GRAPHDEF, _PARAMS, tfm.init_cache(CAUSAL, 2), embeds=soft)
  np.testing.assert_allclose(out.logits, ref.logits, atol=1e-6)


def test_cache_argument_errors():
  cache = tfm.init_cache(CAUSAL, 1)
  with pytest.raises(ValueError, match="mask"):
    tfm.apply_cached(_GRAPHDEF, _PARAMS, cache, jnp.zeros((1, 3), jnp.int32),
                     mask=jnp.ones((2, 2), bool))
  with pytest.raises(ValueError, match="exactly one"):
    tfm.apply_cached(_GRAPHDEF, _PARAMS, cache)
  with pytest.raises(ValueError, match="start"):
    tfm.run_layers(_GRAPHDEF, _PARAMS, jnp.zeros((1, 1, 32)), cache, start=1, stop=3)
  bidir = tfm.TransformerConfig(vocab_size=VOCAB, max_len=8, d_model=16, num_heads=2)
  g, p = tfm.init_transformer(bidir, jax.random.key(0))
  with pytest.raises(ValueError, match="causal"):
    tfm.apply_cached(g, p, tfm.init_cache(bidir, 1), jnp.zeros((1, 2), jnp.int32))
