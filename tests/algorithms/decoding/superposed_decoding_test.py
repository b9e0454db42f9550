"""Oracle tests of Superposed Decoding (spec card 2.5).

Oracles: a NumPy re-implementation of the whole decoding loop (float64 scoring, n-gram
probabilities counted with Python dicts, brute-force candidate ranking, and a one-shot
forward over the full superposed embedding sequence instead of the incremental KV cache);
greedy decoding of the core autoregressive decoder (k = 1, alpha = 0); a brute-force
enumeration of the k x V candidate grid; hand-computed n-gram probabilities of a tiny
corpus; the weighted sum of embedding rows computed in NumPy; layer 0 of the linearity
probe (embeddings are exactly linear).
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.decoding import sampling, speculative
from jaxrepro.algorithms.decoding import superposed_decoding as sd
from jaxrepro.models import transformer as tfm

V, P, T = 8, 4, 5
CFG = tfm.TransformerConfig(vocab_size=V, max_len=16, num_layers=2, d_model=16,
                            num_heads=2, d_ff=32, causal=True)
GRAPHDEF, PARAMS = tfm.init_transformer(CFG, jax.random.key(0))
LM = sd.transformer_lm(CFG, GRAPHDEF)
PROMPT = jnp.array([1, 2, 0, 5], jnp.int32)
# Tokens 0..5 only: contexts holding 6 or 7 are unseen, which exercises the fallbacks.
CORPUS = np.random.default_rng(0).integers(0, 6, size=(30, 6))


def _embedding_matrix():
  return np.asarray(tfm.embed(GRAPHDEF, PARAMS, jnp.arange(V)), np.float64)  # [V, D]


def _ngram_reference(corpus, order):
  """p(v | context) by counting windows with dicts: {context tuple: [V] probabilities}."""
  counts = collections.defaultdict(lambda: np.zeros(V))
  for row in np.asarray(corpus):
    for i in range(len(row) - order + 1):
      counts[tuple(row[i:i + order - 1])][row[i + order - 1]] += 1
  return {c: n / n.sum() for c, n in counts.items()}


@jax.jit
def _forward_embeds(x):
  """Last-layer logits [L, V] of one full embedding sequence x [L, D] (no incremental cache)."""
  cache = tfm.init_cache(CFG, 1, x.shape[0])
  return tfm.apply_cached(GRAPHDEF, PARAMS, cache, embeds=x[None]).logits[0]


def _reference_decode(prompt, max_new, config, corpus):
  """Superposed Decoding in NumPy; the model is run once over the full embedding sequence.

  Returns (alive tokens [k, T], alive scores [k], finished list of (score, tokens), mixing
  vectors [T - 1, V]).
  """
  k, m, alpha = config.n_drafts, config.n_token_sample, config.alpha
  emb = _embedding_matrix()
  tables = [_ngram_reference(corpus, c + 1) for c in config.context_lengths]
  prompt = [int(t) for t in prompt]
  drafts, scores = [list(prompt)] * k, np.zeros(k)
  finished, mixtures = [], []
  inputs = [emb[t] for t in prompt]
  for step in range(max_new):
    # Zero-padded to one length (one compile): causal attention ignores the padding.
    x = np.zeros((P + max_new, emb.shape[1]))
    x[:len(inputs)] = np.stack(inputs)
    logits = _forward_embeds(jnp.asarray(x, jnp.float32))
    z = np.asarray(logits[len(inputs) - 1], np.float64) / config.temperature
    top = np.argsort(-z, kind="stable")[:m]
    p_tilde = np.zeros(V)
    p_tilde[top] = np.exp(z[top] - z[top].max())
    p_tilde /= p_tilde.sum()
    log_p = np.full((k, V), -np.inf)
    for j, seq in enumerate(drafts):
      p_ng = np.zeros(V)
      for c, (table, weight) in enumerate(zip(tables, config.ngram_weights), start=1):
        context = tuple(seq[-c:])
        if len(seq) >= c and context in table:
          p_ng += weight * table[context]
      for v in range(V):
        if p_tilde[v] == 0:
          continue
        if alpha == 0:
          log_p[j, v] = np.log(p_tilde[v])
        elif p_ng[v] > 0:
          log_p[j, v] = (1 - alpha) * np.log(p_tilde[v]) + alpha * np.log(p_ng[v])
      if alpha > 0 and np.all(np.isinf(log_p[j])):
        log_p[j] = np.where(p_tilde > 0, (1 - alpha) * np.log(np.where(p_tilde > 0, p_tilde, 1))
                            - config.penalty, -np.inf)
    rows = [0] if step == 0 else range(k)
    cands = [(scores[j] + log_p[j, v], j * V + v, j, v) for j in rows for v in range(V)]
    cands.sort(key=lambda c: (-c[0], c[1]))  # ties: the lower candidate index
    top2k = cands[:2 * k]
    is_eos = lambda c: config.eos_id is not None and c[3] == config.eos_id
    alive = [c for c in top2k if not is_eos(c)][:k]
    finished += [(c[0], drafts[c[2]][P:] + [c[3]]) for c in top2k if is_eos(c)]
    finished = sorted(finished, key=lambda f: -f[0])[:k]
    drafts = [drafts[c[2]] + [c[3]] for c in alive]
    scores = np.array([c[0] for c in alive])
    if step < max_new - 1:
      w = np.exp(scores - scores.max())
      w /= w.sum()
      mix = np.zeros(V)
      for j in range(k):
        mix[drafts[j][-1]] += w[j]
      mix /= mix.sum()
      mixtures.append(mix)
      inputs.append(mix @ emb)
  return np.array([d[P:] for d in drafts]), scores, finished, np.array(mixtures)


CASES = {
    "k3_ngram": sd.SuperposedConfig(n_drafts=3, n_token_sample=6, temperature=0.7, alpha=0.5,
                                    ngram_weights=(0.3, 0.5)),
    "k2_eos": sd.SuperposedConfig(n_drafts=2, n_token_sample=5, temperature=1.5, alpha=0.4,
                                  ngram_weights=(0.2, 0.6), eos_id=3),
    "k3_no_ngram": sd.SuperposedConfig(n_drafts=3, n_token_sample=7, temperature=1.0,
                                       alpha=0.0),
    "k2_ngram_only": sd.SuperposedConfig(n_drafts=2, n_token_sample=4, temperature=1.0,
                                         alpha=1.0, ngram_weights=(0.5, 0.5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decoder_matches_numpy_reference(name):
  config = CASES[name]
  tables = (sd.build_ngram_tables(CORPUS, config.context_lengths, V, dense_limit=V ** 2)
            if config.alpha > 0 else ())  # the trigram table is stored sparse
  out = sd.make_decoder(LM, prompt_len=P, max_new=T, config=config)(PARAMS, tables, PROMPT)
  tokens, scores, finished, mixtures = _reference_decode(PROMPT, T, config, CORPUS)
  np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
  np.testing.assert_allclose(np.asarray(out.scores), scores, rtol=1e-4, atol=1e-3)
  # The superposed input of every step: the score-weighted one-hot mixture.
  np.testing.assert_allclose(np.asarray(out.mixtures), mixtures, atol=1e-5)
  fin = np.asarray(out.fin_scores)
  assert np.sum(np.isfinite(fin)) == len(finished)
  for i, (score, seq) in enumerate(finished):
    np.testing.assert_allclose(fin[i], score, rtol=1e-4, atol=1e-3)
    assert int(out.fin_lengths[i]) == len(seq)
    np.testing.assert_array_equal(np.asarray(out.fin_tokens[i, :len(seq)]), seq)
  # Bookkeeping: alive drafts are distinct, never end in EOS, and T calls serve all k.
  assert len({tuple(t) for t in tokens}) == config.n_drafts
  if config.eos_id is not None:
    assert not np.any(np.asarray(out.tokens)[:, -1] == config.eos_id)
  assert int(out.forwards) == T and int(out.row_forwards) == T


def test_beam_mode_matches_reference_with_k_rows():
  """`superpose=False` (k cache rows) with k = 1 is the same decode as superposed k = 1."""
  config = sd.SuperposedConfig(n_drafts=1, n_token_sample=3, temperature=0.8, alpha=0.5,
                               ngram_weights=(0.4, 0.2))
  tables = sd.build_ngram_tables(CORPUS, config.context_lengths, V)
  out = sd.make_decoder(LM, prompt_len=P, max_new=T, config=config, superpose=False)(
      PARAMS, tables, PROMPT)
  tokens, scores, _, _ = _reference_decode(PROMPT, T, config, CORPUS)
  np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
  np.testing.assert_allclose(np.asarray(out.scores), scores, rtol=1e-4, atol=1e-3)
  k3 = sd.SuperposedConfig(n_drafts=3, n_token_sample=6, alpha=0.0)
  beam = sd.make_decoder(LM, prompt_len=P, max_new=T, config=k3, superpose=False)(
      PARAMS, (), PROMPT)
  assert int(beam.forwards) == T and int(beam.row_forwards) == 3 * T


def test_k1_without_ngrams_is_greedy():
  config = sd.SuperposedConfig(n_drafts=1, n_token_sample=2, temperature=1.0, alpha=0.0)
  max_new = 10
  out = sd.make_decoder(LM, prompt_len=P, max_new=max_new, config=config)(PARAMS, (), PROMPT)
  greedy = speculative.make_autoregressive_decoder(
      speculative.transformer_lm(CFG, GRAPHDEF), prompt_len=P, max_new=max_new,
      config=sampling.GREEDY)(PARAMS, PROMPT, P, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out.tokens[0]), np.asarray(greedy.tokens))


def test_superposed_embedding_is_the_weighted_sum():
  scores = jnp.array([-0.3, -1.7, -0.9, -4.0])
  tokens = jnp.array([2, 6, 2, 0])  # drafts 0 and 2 share their last token
  mix = sd.superposition_weights(scores, tokens, V)
  w = np.exp(np.asarray(scores, np.float64))
  w /= w.sum()
  expected = np.zeros(V)
  np.add.at(expected, np.asarray(tokens), w)
  np.testing.assert_allclose(np.asarray(mix), expected, atol=1e-6)
  emb = _embedding_matrix()
  np.testing.assert_allclose(np.asarray(tfm.embed_soft(GRAPHDEF, PARAMS, mix)),
                             sum(w[j] * emb[int(t)] for j, t in enumerate(tokens)),
                             atol=1e-5)


@pytest.mark.parametrize("first,eos", [(False, None), (False, 4), (True, 4)])
def test_expand_matches_brute_force(first, eos):
  k, vocab, pos = 3, 7, 3
  rng = np.random.default_rng(int(first) + 2 * (eos or 0))
  log_probs = np.log(rng.dirichlet(np.ones(vocab), k)).astype(np.float32)
  log_probs[1, 2] = -np.inf  # a token off the support
  prev = sd.Drafts(
      tokens=jnp.asarray(rng.integers(0, vocab, (k, 6)), jnp.int32),
      scores=jnp.asarray(np.sort(rng.normal(size=k))[::-1] - 2, jnp.float32),
      fin_tokens=jnp.zeros((k, 6), jnp.int32),
      fin_scores=jnp.array([-1.5, -np.inf, -np.inf], jnp.float32),
      fin_lengths=jnp.array([2, 0, 0], jnp.int32))
  new, parents = sd.expand(prev, jnp.asarray(log_probs), jnp.int32(pos), first=first,
                           eos_id=eos, prompt_len=2)
  s = np.asarray(prev.scores, np.float64)
  rows = [0] if first else range(k)
  grid = [(s[j] + log_probs[j, v], j, v) for j in rows for v in range(vocab)]
  # Brute force: the alive drafts are the best k non-EOS candidates of the whole grid.
  alive = sorted([g for g in grid if g[2] != eos], key=lambda g: -g[0])[:k]
  np.testing.assert_allclose(np.asarray(new.scores), [g[0] for g in alive], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(parents), [g[1] for g in alive])
  np.testing.assert_array_equal(np.asarray(new.tokens)[:, pos], [g[2] for g in alive])
  np.testing.assert_array_equal(np.asarray(new.tokens)[:, :pos],
                                np.asarray(prev.tokens)[[g[1] for g in alive], :pos])
  # Finished: the old list merged with the EOS candidates among the top 2k.
  top2k = sorted(grid, key=lambda g: -g[0])[:2 * k]
  fin = sorted([-1.5] + [g[0] for g in top2k if g[2] == eos], reverse=True)[:k]
  got = np.asarray(new.fin_scores)
  np.testing.assert_allclose(got[:len(fin)], fin, rtol=1e-6)
  assert np.all(np.isneginf(got[len(fin):]))


def test_ngram_tables_hand_computed():
  corpus = np.array([[0, 1, 2, 1, 2], [1, 2, 0, 1, 1]])
  # Bigram contexts: after 1 come 2, 2, 2, 1 -> p(2|1) = 3/4, p(1|1) = 1/4; after 2 come
  # 1, 0 -> 1/2 each; after 0 comes 1 twice. Trigram: (1, 2) -> 1, 0 (1/2 each).
  for dense_limit in (1 << 22, 0):
    bi, tri = sd.build_ngram_tables(corpus, (1, 2), 3, dense_limit=dense_limit)
    assert bi.dense == (dense_limit > 0)
    probs, seen = sd.ngram_lookup(bi, jnp.array([[1], [2], [0]]))
    np.testing.assert_allclose(np.asarray(probs),
                               [[0, 0.25, 0.75], [0.5, 0.5, 0], [0, 1, 0]], atol=1e-7)
    assert np.all(np.asarray(seen))
    probs, seen = sd.ngram_lookup(tri, jnp.array([[1, 2], [2, 2]]))
    np.testing.assert_allclose(np.asarray(probs), [[0.5, 0.5, 0], [0, 0, 0]], atol=1e-7)
    np.testing.assert_array_equal(np.asarray(seen), [True, False])
    # Interpolation (2) with lambda = (0.2, 0.6) after the drafts "..1 2" and "..0 2".
    history = jnp.array([[0, 1, 2, 9], [1, 0, 2, 9]])
    mix = sd.ngram_mixture((bi, tri), (0.2, 0.6), history, jnp.int32(3))
    np.testing.assert_allclose(np.asarray(mix), [[0.2 * 0.5 + 0.6 * 0.5, 0.2 * 0.5 + 0.3, 0],
                                                 [0.1, 0.1, 0]], atol=1e-7)
    # With one token of history the trigram cannot apply.
    mix = sd.ngram_mixture((bi, tri), (0.2, 0.6), history, jnp.int32(1))
    np.testing.assert_allclose(np.asarray(mix)[0], [0, 0.2, 0], atol=1e-7)


def test_interpolation_hand_computed():
  p_tilde = jnp.array([0.5, 0.3, 0.2, 0.0])
  p_ng = jnp.array([[0.2, 0.0, 0.4, 0.9],  # no support on token 1
                    [0.0, 0.0, 0.0, 0.7]])  # no n-gram support at all on p~'s support
  out = np.asarray(sd.interpolate(p_tilde, p_ng, 0.25, 200.0))
  expected0 = [0.75 * np.log(0.5) + 0.25 * np.log(0.2), -np.inf,
               0.75 * np.log(0.2) + 0.25 * np.log(0.4), -np.inf]
  expected1 = [0.75 * np.log(0.5) - 200, 0.75 * np.log(0.3) - 200,
               0.75 * np.log(0.2) - 200, -np.inf]
  np.testing.assert_allclose(out, [expected0, expected1], rtol=1e-6)
  # alpha = 1: the n-gram ranking on p~'s support, never NaN.
  out = np.asarray(sd.interpolate(p_tilde, p_ng, 1.0, 200.0))
  np.testing.assert_allclose(out[0], [np.log(0.2), -np.inf, np.log(0.4), -np.inf], rtol=1e-6)
  assert not np.any(np.isnan(out))
  # alpha = 0: log p~ for every draft.
  out = np.asarray(sd.interpolate(p_tilde, p_ng, 0.0, 200.0))
  np.testing.assert_allclose(out[1, :3], np.log([0.5, 0.3, 0.2]), rtol=1e-6)


def test_truncated_probs():
  logits = jnp.array([1.0, 3.0, 2.0, 0.5, 2.0])
  out = np.asarray(sd.truncated_probs(logits, 0.5, 3))
  z = np.array([3.0, 2.0, 2.0]) / 0.5
  np.testing.assert_allclose(out[[1, 2, 4]], np.exp(z) / np.exp(z).sum(), rtol=1e-6)
  assert out[0] == 0 and out[3] == 0


def test_linearity_probe_exact_at_the_embedding_layer():
  drafts = jnp.array([[3, 4, 1], [6, 4, 2]])
  probe_fn = jax.jit(lambda *a: sd.linearity_probe(CFG, GRAPHDEF, PARAMS, *a))
  probe = probe_fn(PROMPT, drafts, jnp.array([0.7, 0.3]))
  assert probe.cosine.shape == (CFG.num_layers + 1,)
  np.testing.assert_allclose(float(probe.cosine[0]), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(probe.superposed[0]), np.asarray(probe.combined[0]),
                             atol=1e-5)
  # One draft: every layer is exactly linear.
  one = probe_fn(PROMPT, drafts[:1], jnp.array([1.0]))
  np.testing.assert_allclose(np.asarray(one.cosine), 1.0, atol=1e-5)


def test_bad_inputs():
  with pytest.raises(ValueError, match="n_token_sample"):
    sd.SuperposedConfig(n_drafts=3, n_token_sample=5)
  with pytest.raises(ValueError, match="alpha"):
    sd.SuperposedConfig(alpha=1.5)
  with pytest.raises(ValueError, match="temperature"):
    sd.SuperposedConfig(temperature=0.0)
  with pytest.raises(ValueError, match="order"):
    sd.count_ngrams(CORPUS, 1, V)
  with pytest.raises(ValueError, match="corpus"):
    sd.count_ngrams(CORPUS + 10, 2, V)
  with pytest.raises(ValueError, match="max_len"):
    sd.make_decoder(LM, prompt_len=10, max_new=10)
  decode = sd.make_decoder(LM, prompt_len=P, max_new=2,
                           config=sd.SuperposedConfig(ngram_weights=(0.5, 0.5)))
  with pytest.raises(ValueError, match="n-gram tables"):
    decode(PARAMS, (), PROMPT)
  with pytest.raises(ValueError, match="prompt"):
    decode(PARAMS, (), PROMPT[:2])


def test_driver_config_checks():
  from jaxrepro.configs import superposed_decoding as configs
  from jaxrepro.configs.common import ConfigError
  from jaxrepro.launch.experiments import superposed_decoding as driver
  for variant in ("smoke", "demo", "paper"):
    driver.check_config(configs.get_config(variant))
  bad = {"superposed.n_token_sample": 5, "eval.baselines": "greedy,nucleus",
         "eval.max_new": 200, "superposed.temperatures": "0.1,0", "eval.prompt_len": 1}
  for path, value in bad.items():
    config = configs.get_config("smoke")
    section, field = path.split(".")
    config[section][field] = value
    with pytest.raises(ConfigError, match=field):
      driver.check_config(config)
