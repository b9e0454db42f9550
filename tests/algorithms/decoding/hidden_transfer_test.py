"""Oracle tests of hidden transfer, Medusa heads, candidate trees and greedy tree decoding.

Oracles (spec card 4.5): tree-attention logits against running every root-to-node path as
an ordinary sequence through the uncached model (dense reference); pseudo-state drafts
against a dense forward with a hand-built attention mask; a chain tree's mask is causal; a
small tree's mask and the pseudo-state mask against hand-written ones; appending pseudo
states leaves the tokens' logits unchanged; greedy tree decoding equals greedy
autoregressive decoding token for token for random and zero transfer weights and random
Medusa heads; tree verification and the sparse tree against brute force.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrepro.algorithms.decoding import hidden_transfer as ht
from jaxrepro.algorithms.decoding import sampling, speculative
from jaxrepro.models import transformer as tfm

CFG = tfm.TransformerConfig(vocab_size=8, max_len=48, num_layers=3, d_model=32, num_heads=4,
                            d_ff=64, causal=True)
K = 3
LAYER = 1


# The cached forward, jitted once for the module (the graphdef is static).
_apply_cached = jax.jit(tfm.apply_cached, static_argnums=0)


@pytest.fixture(scope="module")
def target():
  return tfm.init_transformer(CFG, jax.random.key(0))


def _pad(seqs):
  """Sequences of different lengths, padded at the end: ([n, L] int32, [n] lengths)."""
  width = max(len(q) for q in seqs)
  out = np.zeros((len(seqs), width), np.int32)
  for i, q in enumerate(seqs):
    out[i, :len(q)] = q
  return jnp.asarray(out), np.asarray([len(q) for q in seqs])


def _dense_logits(graphdef, params, seqs):
  """[n, V] logits at the last token of each sequence, from the uncached causal forward
  (padding after a sequence cannot change its positions' logits)."""
  tokens, lengths = _pad(seqs)
  logits = jax.jit(tfm.apply_transformer, static_argnums=0)(graphdef, params, tokens)
  return np.asarray(logits)[np.arange(len(seqs)), lengths - 1]


def _dense_pseudo_drafts(graphdef, params, tgd, tparams, seqs, layer):
  """[n, K, V] drafts of the last token of each sequence from an explicit dense forward
  with hand-built masks: tokens causal, pseudo state i sees the sequence's tokens and
  pseudo states j <= i (never the padding)."""
  tokens, lengths = _pad(seqs)
  n, width = tokens.shape
  mask = np.zeros((n, width + K, width + K), bool)
  for b, length in enumerate(lengths):
    for i in range(width):
      mask[b, i, :i + 1] = True
    for i in range(K):
      mask[b, width + i, :length] = True
      mask[b, width + i, width:width + i + 1] = True

  @jax.jit
  def run(params, tparams, tokens, mask):
    model, maps = nnx.merge(graphdef, params), nnx.merge(tgd, tparams)
    h = model.embed(tokens) + model.pos_embed(jnp.arange(width))[None]
    for block in model.blocks[:layer]:
      h = block(h, mask[:, None, :width, :width])
    last = h[jnp.arange(n), jnp.asarray(lengths) - 1]  # [n, D]
    pseudo = jnp.einsum("nd,kde->nke", last, maps.kernel[...]) + maps.bias[...]
    h = jnp.concatenate([h, pseudo], axis=1)
    for block in model.blocks[layer:]:
      h = block(h, mask[:, None])
    return model.output(h[:, width:])[0]
  return np.asarray(run(params, tparams, tokens, jnp.asarray(mask)))


# ---------------------------------------------------------------------------------- masks


def test_small_tree_mask_matches_hand_built():
  tree = ht.make_tree([(1,), (0,), (0, 1), (0, 0), (1, 0)])
  assert tree.paths == ((), (0,), (1,), (0, 0), (0, 1), (1, 0))
  expected = np.array([[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 0, 1, 0, 0, 0],
                       [1, 1, 0, 1, 0, 0],
                       [1, 1, 0, 0, 1, 0],
                       [1, 0, 1, 0, 0, 1]], bool)
  np.testing.assert_array_equal(tree.mask, expected)
  np.testing.assert_array_equal(tree.parent, [-1, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(tree.depth, [0, 1, 1, 2, 2, 2])


def test_chain_tree_mask_is_causal():
  tree = ht.chain_tree(5)
  np.testing.assert_array_equal(tree.mask, np.tril(np.ones((6, 6), bool)))


def test_pseudo_mask_matches_hand_built():
  mask = jnp.asarray(np.tril(np.ones((3, 3), bool)))[None]
  out = np.asarray(ht.pseudo_mask(mask, jnp.asarray([[2, 0]]), 2))[0]
  # Rows/cols: tokens 0..2, then (source 2: pseudo 0, 1), (source 0: pseudo 0, 1).
  expected = np.array([[1, 0, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 1, 0, 0],
                       [1, 0, 0, 0, 0, 1, 0],
                       [1, 0, 0, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------- tree attention


def test_tree_attention_logits_equal_sequential_paths(target):
  graphdef, params = target
  rng = np.random.default_rng(0)
  tree = ht.make_tree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0)])
  prefix = rng.integers(0, CFG.vocab_size, 7)
  nodes = rng.integers(0, CFG.vocab_size, tree.num_nodes)
  cache = tfm.init_cache(CFG, 1, 32)
  cache = _apply_cached(graphdef, params, cache, jnp.asarray(prefix[:-1])[None]).cache
  start = len(prefix) - 1
  nodes[0] = prefix[-1]  # the root is the last prefix token
  out = _apply_cached(graphdef, params, cache, jnp.asarray(nodes)[None],
                         jnp.asarray(start + tree.depth)[None], jnp.asarray(tree.mask)[None])
  seqs = [list(prefix[:-1]) + [nodes[a] for a in row if a >= 0] for row in tree.ancestors]
  np.testing.assert_allclose(out.logits[0], _dense_logits(graphdef, params, seqs),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["random", "identity"])
def test_transfer_forward_tree_equals_dense_references(target, init):
  """Node logits are the plain model's (pseudo states invisible to tokens); node drafts
  are the dense hand-masked forward's on the node's path."""
  graphdef, params = target
  tgd, tparams = ht.init_transfer(CFG.d_model, K, jax.random.key(3), init=init)
  rng = np.random.default_rng(1)
  tree = ht.product_tree([2, 2])
  prefix = rng.integers(0, CFG.vocab_size, 6)
  nodes = rng.integers(0, CFG.vocab_size, tree.num_nodes)
  nodes[0] = prefix[-1]
  cache = tfm.init_cache(CFG, 1, 64)
  cache = _apply_cached(graphdef, params, cache, jnp.asarray(prefix[:-1])[None]).cache
  forward = jax.jit(ht.transfer_forward, static_argnums=(0, 2), static_argnames="layer")
  out = forward(graphdef, params, tgd, tparams, cache, jnp.asarray(nodes)[None],
                            jnp.asarray(len(prefix) - 1 + tree.depth)[None],
                            jnp.asarray(tree.mask)[None], layer=LAYER)
  assert out.drafts.shape == (1, tree.num_nodes, K, CFG.vocab_size)
  assert int(out.cache.lengths[0]) == len(prefix) - 1 + tree.num_nodes
  seqs = [list(prefix[:-1]) + [nodes[a] for a in row if a >= 0] for row in tree.ancestors]
  np.testing.assert_allclose(out.logits[0], _dense_logits(graphdef, params, seqs),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out.drafts[0], _dense_pseudo_drafts(
      graphdef, params, tgd, tparams, seqs, LAYER), atol=1e-4, rtol=1e-4)


def test_teacher_forced_drafts_match_cached_forward(target):
  graphdef, params = target
  tgd, tparams = ht.init_transfer(CFG.d_model, K, jax.random.key(4), init="random")
  tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, CFG.vocab_size)
  cuts = jnp.asarray([[3, 7], [0, 8]])
  dense = jax.jit(ht.transfer_drafts, static_argnums=(0, 2), static_argnames="layer")(
      graphdef, params, tgd, tparams, tokens, cuts, layer=2)
  seqs = [list(np.asarray(tokens[b, :int(cuts[b, c]) + 1])) for b in range(2) for c in range(2)]
  ref = _dense_pseudo_drafts(graphdef, params, tgd, tparams, seqs, 2)
  np.testing.assert_allclose(np.asarray(dense).reshape(4, K, -1), ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(ht.future_targets(tokens, cuts, K)[1, 0], tokens[1, 2:5])


def test_medusa_heads_start_as_the_lm_head(target):
  graphdef, params = target
  hgd, hparams = ht.init_medusa_heads(graphdef, params, K, jax.random.key(6))
  tokens = jax.random.randint(jax.random.key(7), (2, 10), 0, CFG.vocab_size)
  drafts = jax.jit(ht.medusa_drafts, static_argnums=(0, 2))(
      graphdef, params, hgd, hparams, tokens, jnp.asarray([[2, 9]] * 2))
  logits = jax.jit(tfm.apply_transformer, static_argnums=0)(graphdef, params, tokens)
  for i in range(K):
    np.testing.assert_allclose(drafts[:, 0, i], logits[:, 2], atol=1e-5)
    np.testing.assert_allclose(drafts[:, 1, i], logits[:, 9], atol=1e-5)


# ----------------------------------------------------------------------------- verification


def _brute_verify(tree, tokens, logits):
  """Deepest node whose whole path matches the parents' argmax (first in BFS order)."""
  pred = np.argmax(logits, axis=-1)
  best = 0
  for i, path in enumerate(tree.paths):
    ok = all(tokens[tree.paths.index(path[:d])] == pred[tree.paths.index(path[:d - 1])]
             for d in range(1, len(path) + 1))
    if ok and len(path) > len(tree.paths[best]):
      best = i
  return best, int(pred[best])


def test_verify_tree_greedy_matches_brute_force():
  tree = ht.product_tree([3, 2, 2])
  rng = np.random.default_rng(2)
  for _ in range(30):
    logits = rng.normal(size=(tree.num_nodes, 4)).astype(np.float32)
    tokens = rng.integers(0, 4, tree.num_nodes)
    v = ht.verify_tree_greedy(tree, jnp.asarray(tokens), jnp.asarray(logits))
    node, nxt = _brute_verify(tree, tokens, logits)
    assert int(v.node) == node and int(v.next_token) == nxt
    assert int(v.num_accepted) == len(tree.paths[node])
    path = np.asarray(v.path)[:int(v.num_accepted) + 1]
    np.testing.assert_array_equal(path, [tree.paths.index(tree.paths[node][:d])
                                         for d in range(len(tree.paths[node]) + 1)])


def test_sparse_tree_is_top_scoring_paths():
  # With accuracies decreasing in rank, path scores fall along every path, so the greedy
  # tree is exactly the M highest-scoring paths (brute force over all paths).
  acc = np.array([[0.5, 0.2, 0.1], [0.4, 0.15, 0.05], [0.3, 0.2, 0.1]])
  m = 9
  tree = ht.sparse_tree(acc, m)
  scores = {p: np.prod([acc[d, r] for d, r in enumerate(p)])
            for depth in range(1, 4) for p in itertools.product(range(3), repeat=depth)}
  best = sorted(scores, key=lambda p: -scores[p])[:m]
  assert set(tree.paths) - {()} == set(best)
  assert ht.expected_accepted(tree, acc) == pytest.approx(sum(scores[p] for p in best))


# ---------------------------------------------------------------------------- tree decoding


MAX_NEW, PROMPT_LEN = 20, 8


@pytest.fixture(scope="module")
def decode_case(target):
  """Prompts of several lengths and their greedy autoregressive continuations."""
  graphdef, params = target
  ar = speculative.make_autoregressive_decoder(speculative.transformer_lm(CFG, graphdef),
                                               prompt_len=PROMPT_LEN, max_new=MAX_NEW,
                                               config=sampling.GREEDY)
  prompts = jax.random.randint(jax.random.key(10), (4, PROMPT_LEN), 0, CFG.vocab_size)
  lengths = jnp.asarray([8, 2, 5, 7])
  ref = jax.jit(jax.vmap(ar, in_axes=(None, 0, 0, None)))(params, prompts, lengths,
                                                          jax.random.key(0)).tokens
  return prompts, lengths, np.asarray(ref)


@pytest.mark.parametrize("method", ["transfer_random", "transfer_zeros", "medusa_random"])
def test_greedy_tree_decoding_equals_autoregressive(target, decode_case, method):
  graphdef, params = target
  prompts, lengths, ref = decode_case
  if method.startswith("transfer"):
    dgd, dparams = ht.init_transfer(CFG.d_model, K, jax.random.key(8),
                                    init=method.split("_")[1])
    lm = ht.hidden_transfer_lm(CFG, graphdef, dgd, num_future=K, layer=LAYER)
  else:
    dgd, dparams = ht.init_medusa_heads(graphdef, params, K, jax.random.key(9),
                                        copy_lm_head=False)
    lm = ht.medusa_lm(CFG, graphdef, dgd, num_heads=K)
  tree = ht.product_tree([4, 2, 2])
  dec = jax.jit(jax.vmap(ht.make_tree_decoder(lm, tree, prompt_len=PROMPT_LEN,
                                              max_new=MAX_NEW), in_axes=(None, 0, 0)))
  out = dec((params, dparams), prompts, lengths)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)
  log = np.asarray(out.accepted)
  done = np.where(log >= 0, log + 1, 0).sum(axis=1)
  np.testing.assert_array_equal(np.asarray(out.num_generated), done)
  assert np.all(done >= MAX_NEW)
  if method != "transfer_zeros":
    # Some drafts were accepted, so the cache compaction of deep paths was exercised.
    assert np.sum(np.maximum(log, 0)) > 0


# ------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise(target):
  graphdef, params = target
  with pytest.raises(ValueError, match="no parent"):
    ht.make_tree([(0, 1)])
  with pytest.raises(ValueError, match="duplicates"):
    ht.make_tree([(0,), (0,)])
  with pytest.raises(ValueError, match="init must be one of"):
    ht.init_transfer(8, 2, jax.random.key(0), init="ones")
  with pytest.raises(ValueError, match="num_future"):
    ht.init_transfer(8, 0, jax.random.key(0))
  tgd, _ = ht.init_transfer(CFG.d_model, 2, jax.random.key(0))
  lm = ht.hidden_transfer_lm(CFG, graphdef, tgd, num_future=2, layer=1)
  with pytest.raises(ValueError, match="num_drafts"):
    ht.make_tree_decoder(lm, ht.chain_tree(3), prompt_len=4, max_new=4)
  with pytest.raises(ValueError, match="layer"):
    ht.hidden_transfer_lm(CFG, graphdef, tgd, num_future=2, layer=CFG.num_layers + 1)
  with pytest.raises(ValueError, match="max_len"):
    ht.make_tree_decoder(lm, ht.chain_tree(2), prompt_len=40, max_new=20)


def test_driver_rejects_inconsistent_config():
  from jaxrepro.configs import hidden_transfer as config_lib
  from jaxrepro.configs.common import ConfigError
  from jaxrepro.launch.experiments import hidden_transfer as driver
  driver.check_config(config_lib.get_config("smoke"))
  for field, value, match in (("transfer.layer", 9, "transfer.layer"),
                              ("data.seq_len", 6, "data.seq_len"),
                              ("decode.max_new", 190, "decode.prompt_len")):
    config = config_lib.get_config("smoke")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=match):
      driver.check_config(config)
