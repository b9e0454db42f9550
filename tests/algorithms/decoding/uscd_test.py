"""Tests of USCD: the uncertainty statistic, the contrastive rule and the two-stream decoder.

Oracles: hand-computed values of both uncertainty statistics; a NumPy reference of the
contrastive logits (with its plausibility mask); the card's identities (lambda = 0 and a
never-firing threshold give greedy decoding, token for token against the shared core's
single-stream greedy decoder; z_l = z_s leaves the argmax; implausible tokens are never
emitted); and an uncached NumPy reference decoder (full forward over the growing
sequences of both prompts) for always-on contrastive decoding and a selective threshold.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.decoding import sampling, speculative, uscd
from jaxrepro.models import transformer as tfm

V = 11
CFG = tfm.TransformerConfig(vocab_size=V, max_len=24, num_layers=2, d_model=32,
                            num_heads=4, causal=True)
GRAPHDEF, PARAMS = tfm.init_transformer(CFG, jax.random.key(0))
# Random-init logits are nearly flat; sharpen the output so that U spreads over [0, 1] and
# argmaxes are well separated (the reference and the cached decoder agree exactly).
PARAMS = jax.tree.map(lambda x: x * 3.0, PARAMS)
LM = speculative.transformer_lm(CFG, GRAPHDEF)
P, PL, MAX_NEW = 9, 5, 8
BETA = 0.1


def _prompts():
  rng = np.random.default_rng(0)
  n = 6
  std_len = rng.integers(2, P + 1, n).astype(np.int32)
  lame_len = rng.integers(1, PL + 1, n).astype(np.int32)
  std = rng.integers(0, V, (n, P)).astype(np.int32)
  lame = rng.integers(0, V, (n, PL)).astype(np.int32)
  return std, std_len, lame, lame_len


PROMPTS = _prompts()
DECODE = uscd.make_uscd_decoder(LM, prompt_len=P, lame_len=PL, max_new=MAX_NEW, beta=BETA)


# ------------------------------------------------------------------------------ references


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_contrastive(z_s, z_l, lam, beta):
  z_s, z_l = np.asarray(z_s, np.float64), np.asarray(z_l, np.float64)
  p = np.exp(_np_log_softmax(z_s))
  keep = p >= beta * p.max(-1, keepdims=True)
  return np.where(keep, (1 + lam) * z_s - lam * z_l, -np.inf)


def _np_std_topk(z, k):
  p = np.sort(np.exp(_np_log_softmax(z)))[::-1][:k]
  return 1 - np.std(p) / (np.sqrt(k - 1) / k)


@jax.jit
def _forward(x):
  return tfm.apply_transformer(GRAPHDEF, PARAMS, x[None])[0]


def _last_logits(seq):
  """Logits after the last token of `seq`, by one full causal forward (no cache).

  The sequence is right-padded to the model's max_len (one compile); causal attention
  makes the padding invisible to the positions that are read.
  """
  x = np.zeros(CFG.max_len, np.int32)
  x[:len(seq)] = seq
  return np.asarray(_forward(jnp.asarray(x)))[len(seq) - 1]


def _reference_decode(std, std_len, lame, lame_len, lam, threshold, topk=5):
  """Uncached reference: one full forward per step of each growing sequence."""
  seq_s, seq_l = list(std[:std_len]), list(lame[:lame_len])
  tokens, triggered = [], []
  for _ in range(MAX_NEW):
    z_s, z_l = (_last_logits(x) for x in (seq_s, seq_l))
    fire = _np_std_topk(z_s, topk) >= threshold
    z = _np_contrastive(z_s, z_l, lam, BETA) if fire else z_s
    token = int(np.argmax(z))
    tokens.append(token)
    triggered.append(fire)
    seq_s.append(token)
    seq_l.append(token)
  return np.array(tokens), np.array(triggered)


# ------------------------------------------------------------------------------ statistics


def test_uncertainty_matches_hand_computed_values():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.1, 0.1]))
  # top-3 = (0.5, 0.3, 0.1): std = sqrt(0.08 / 3); one-hot top-3 std = sqrt(2) / 3.
  expected = 1 - np.sqrt(0.08 / 3) / (np.sqrt(2) / 3)
  np.testing.assert_allclose(uscd.uncertainty(logits, "std_topk", 3), expected, rtol=1e-5)
  np.testing.assert_allclose(expected, 0.6535898, rtol=1e-6)
  entropy = -(0.5 * np.log(0.5) + 0.3 * np.log(0.3) + 0.2 * np.log(0.1))
  np.testing.assert_allclose(uscd.uncertainty(logits, "entropy"), entropy / np.log(4),
                             rtol=1e-5)
  np.testing.assert_allclose(entropy / np.log(4), 0.8427376, rtol=1e-6)


@pytest.mark.parametrize("kind", uscd.UNCERTAINTIES)
def test_uncertainty_ordering_one_hot_to_uniform(kind):
  one_hot = jnp.array([0.0, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf])
  uniform = jnp.zeros(6)
  peaked = jnp.array([3.0, 1.0, 0.0, 0.0, 0.0, 0.0])
  flatter = peaked / 3
  u = [float(uscd.uncertainty(z, kind, 4)) for z in (one_hot, peaked, flatter, uniform)]
  np.testing.assert_allclose([u[0], u[3]], [0.0, 1.0], atol=1e-6)
  assert u[0] < u[1] < u[2] < u[3]


def test_uncertainty_batched_matches_reference():
  z = np.random.default_rng(1).normal(size=(4, 7, V)) * 2
  got = np.asarray(uscd.uncertainty(jnp.asarray(z, jnp.float32), "std_topk", 5))
  want = np.vectorize(lambda i, j: _np_std_topk(z[i, j], 5))(*np.indices((4, 7)))
  np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------- the rule


def test_contrastive_logits_match_numpy_reference():
  rng = np.random.default_rng(2)
  z_s, z_l = rng.normal(size=(2, 5, V)) * 2
  for lam, beta in ((0.5, 0.1), (2.0, 0.3), (1.0, 0.0)):
    got = np.asarray(uscd.contrastive_logits(jnp.asarray(z_s, jnp.float32),
                                             jnp.asarray(z_l, jnp.float32), lam, beta))
    want = _np_contrastive(z_s, z_l, lam, beta)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_card_identities_of_the_rule():
  rng = np.random.default_rng(3)
  z_s = jnp.asarray(rng.normal(size=(50, V)) * 2, jnp.float32)
  z_l = jnp.asarray(rng.normal(size=(50, V)) * 2, jnp.float32)
  # z_l = z_s: the contrast leaves z_s on the plausible set, so the argmax is unchanged.
  same = uscd.contrastive_logits(z_s, z_s, 1.5, BETA)
  np.testing.assert_array_equal(np.argmax(same, -1), np.argmax(z_s, -1))
  # lambda = 0 or a threshold above every U: the standard logits.
  np.testing.assert_array_equal(np.argmax(uscd.uscd_logits(z_s, z_l, 0.0, 0.0).logits, -1),
                                np.argmax(z_s, -1))
  never = uscd.uscd_logits(z_s, z_l, 2.0, 1.01)
  assert not never.triggered.any()
  np.testing.assert_array_equal(never.logits, z_s)
  always = uscd.uscd_logits(z_s, z_l, 2.0, 0.0)
  assert always.triggered.all()
  np.testing.assert_array_equal(always.logits, uscd.contrastive_logits(z_s, z_l, 2.0, 0.1))
  # The chosen token is always plausible under p_s.
  p = np.asarray(jax.nn.softmax(z_s))
  pick = np.argmax(always.logits, -1)
  assert np.all(p[np.arange(50), pick] >= BETA * p.max(-1) - 1e-7)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="uncertainty"):
    uscd.uncertainty(jnp.zeros(4), "variance")
  with pytest.raises(ValueError, match="topk"):
    uscd.uncertainty(jnp.zeros(4), "std_topk", 1)
  with pytest.raises(ValueError, match="beta"):
    uscd.make_uscd_decoder(LM, prompt_len=P, lame_len=PL, max_new=4, beta=1.5)
  with pytest.raises(ValueError, match="max_len"):
    uscd.make_uscd_decoder(LM, prompt_len=P, lame_len=PL, max_new=20)
  with pytest.raises(ValueError, match="max_new"):
    uscd.make_uscd_decoder(LM, prompt_len=P, lame_len=PL, max_new=0)


# ---------------------------------------------------------------------------- the decoder


def test_never_firing_is_greedy_token_for_token():
  std, std_len, lame, lame_len = PROMPTS
  greedy = speculative.make_autoregressive_decoder(LM, prompt_len=P, max_new=MAX_NEW,
                                                   config=sampling.GREEDY)
  want = np.stack([np.asarray(greedy(PARAMS, std[i], std_len[i], jax.random.key(0)).tokens)
                   for i in range(len(std))])
  never = DECODE(PARAMS, std, std_len, lame, lame_len, 3.0, 2.0)
  np.testing.assert_array_equal(never.tokens, want)
  np.testing.assert_array_equal(never.standard_argmax, want)
  assert not np.asarray(never.triggered).any()
  # lambda = 0 with the contrast always on: the masked standard logits, same argmax.
  np.testing.assert_array_equal(DECODE(PARAMS, std, std_len, lame, lame_len, 0.0, 0.0).tokens,
                                want)


@pytest.mark.parametrize("threshold", [0.0, "median"])
def test_decoder_matches_uncached_reference(threshold):
  std, std_len, lame, lame_len = PROMPTS
  lam = 1.5
  if threshold == "median":
    # A threshold inside the observed range so that some steps fire and some do not.
    u = np.asarray(DECODE(PARAMS, std, std_len, lame, lame_len, lam, 0.0).uncertainty)
    threshold = float(np.median(u))
  out = DECODE(PARAMS, std, std_len, lame, lame_len, lam, threshold)
  fired = []
  for i in range(len(std)):
    tokens, triggered = _reference_decode(std[i], std_len[i], lame[i], lame_len[i], lam,
                                          threshold)
    np.testing.assert_array_equal(np.asarray(out.tokens[i]), tokens)
    np.testing.assert_array_equal(np.asarray(out.triggered[i]), triggered)
    fired.append(triggered)
  fired = np.concatenate(fired)
  if threshold == 0.0:
    assert fired.all()
  else:
    assert fired.any() and not fired.all()
  assert int(out.forward_calls[0]) == 2 * MAX_NEW


def test_always_firing_differs_from_greedy_somewhere():
  # A sanity check that the contrast is not a no-op on this model (else the oracles above
  # could pass vacuously).
  std, std_len, lame, lame_len = PROMPTS
  cd = DECODE(PARAMS, std, std_len, lame, lame_len, 1.5, 0.0)
  greedy = DECODE(PARAMS, std, std_len, lame, lame_len, 1.5, 2.0)
  assert not np.array_equal(cd.tokens, greedy.tokens)
