"""Tests of SpecDec++ (`algorithms.decoding.specdecpp`).

Oracles (decoding card 1.5): the decoder with the SpecDec++ stopping rule keeps the exact
target law (enumeration on table LMs), greedy decoding with the rule is token-identical to
greedy target decoding (shipped SynthLang models), the head, its loss and KL against NumPy
references, the stopping rule against a NumPy re-implementation of rule (1) with the
one-token lag and against the i.i.d. closed form, and the properties of card oracle 4.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrepro.algorithms.decoding import sampling, specdecpp, speculative
from jaxrepro.algorithms.decoding import table_lm as tl
from jaxrepro.configs import common
from jaxrepro.configs import specdecpp as specdecpp_config
from jaxrepro.launch import pretrained_lms as plm
from jaxrepro.launch.experiments import specdecpp as specdecpp_driver

V, ORDER, N = 4, 3, 3
TARGET = tl.random_table(jax.random.key(0), V, ORDER)
DRAFT = tl.mixed_draft(jax.random.key(1), TARGET, 0.5)
LM = tl.table_lm(V, ORDER)
PROMPT, PROMPT_LEN = jnp.array([1, 2, 0, 0], jnp.int32), 2
NUM_SAMPLES = 100_000


def _np_head(graphdef, params, z):
  """NumPy forward of the head: residual SiLU blocks, then the 2-way classifier."""
  m = nnx.merge(graphdef, params)
  z = np.asarray(z, np.float64)
  for i in range(m.num_layers):
    block = m.blocks[0 if m.shared_blocks else i].linear
    y = z @ np.asarray(block.kernel[...]) + np.asarray(block.bias[...])
    z = z + y / (1 + np.exp(-y))
  return z @ np.asarray(m.classifier.kernel[...]) + np.asarray(m.classifier.bias[...])


def _np_accept(logits):
  logits = logits - logits.max(-1, keepdims=True)
  e = np.exp(logits)
  return e[..., 1] / e.sum(-1)


def _np_drafted(a_hat, h, k_min, k_max):
  """Rule (1) by hand: a_hat[j] is the estimate read at draft step j (a_hat[0] unused)."""
  cum = 1.0
  for s in range(1, k_max + 1):
    if s > 1:
      cum *= a_hat[s - 1]
    if s >= k_max or (s >= k_min and 1 - cum > h):
      return s
  raise AssertionError("unreachable")


def _run_policy(policy, pp, hiddens):
  """Feeds one round of `DraftInfo`s (hidden states [K, H]) to a policy; returns the
  number of drafted tokens at which it first says stop (K if never)."""
  state = policy.init(pp)
  stop_fn = jax.jit(policy.stop)
  for j, hidden in enumerate(hiddens):
    info = speculative.DraftInfo(
        index=jnp.int32(j), token=jnp.int32(0), q=jnp.ones((V,)) / V, logits=jnp.zeros((V,)),
        hidden=hidden, fed_token=jnp.int32(0), position=jnp.int32(5 + j))
    stop, state = stop_fn(pp, state, info)
    if bool(stop):
      return j + 1
  return len(hiddens)


@pytest.mark.parametrize("shared", [True, False])
def test_head_matches_numpy(shared):
  graphdef, params = specdecpp.init_head(8, jax.random.key(3), num_layers=3,
                                         shared_blocks=shared)
  z = jax.random.normal(jax.random.key(4), (5, 7, 8))
  ref = _np_head(graphdef, params, z)
  np.testing.assert_allclose(specdecpp.head_logits(graphdef, params, z), ref, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(specdecpp.accept_probability(graphdef, params, z),
                             _np_accept(ref), rtol=1e-5, atol=1e-6)
  # PyTorch's nn.Linear initialisation: weights within +-1/sqrt(fan_in).
  m = nnx.merge(graphdef, params)
  assert np.abs(np.asarray(m.blocks[0].linear.kernel[...])).max() <= 1 / np.sqrt(8)
  assert len(m.blocks) == (1 if shared else 3)


def test_weighted_bce_and_binary_kl_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 9, 2)).astype(np.float32) * 2
  labels = rng.uniform(size=(6, 9)).astype(np.float32)
  labels[0, :3] = [0.0, 1.0, 1.0]
  mask = rng.uniform(size=(6, 9)) < 0.8
  w = 6.0
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  wr, wa = w * (1 - labels) * mask, labels * mask
  ref = -(wr * logp[..., 0] + wa * logp[..., 1]).sum() / (wr + wa).sum()
  loss = specdecpp.weighted_bce(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), w)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  s = np.exp(logp[..., 1])
  with np.errstate(divide="ignore", invalid="ignore"):
    kl_ref = (np.where(labels > 0, labels * np.log(labels / s), 0.0)
              + np.where(labels < 1, (1 - labels) * np.log((1 - labels) / (1 - s)), 0.0))
  np.testing.assert_allclose(specdecpp.binary_kl(jnp.asarray(labels), jnp.asarray(logits)),
                             kl_ref, rtol=1e-4, atol=1e-6)


def test_loss_is_stationary_at_the_weighted_optimum_and_kl_zero_iff_equal():
  a = jnp.array([0.05, 0.3, 0.5, 0.9, 0.99])
  for w in (1.0, 6.0):
    opt = specdecpp.weighted_optimum(a, w)
    np.testing.assert_allclose(specdecpp.unweight(opt, w), a, rtol=1e-5)
    for i in range(a.shape[0]):
      grad = jax.grad(lambda lg, i=i, w=w: specdecpp.weighted_bce(
          lg, a[i:i + 1], jnp.ones((1,), bool), w))(
              specdecpp.probability_logits(opt[i:i + 1]))
      np.testing.assert_allclose(grad, 0.0, atol=1e-5)
  kl_same = specdecpp.binary_kl(a, specdecpp.probability_logits(a))
  np.testing.assert_allclose(kl_same, 0.0, atol=1e-5)
  kl_other = specdecpp.binary_kl(a, specdecpp.probability_logits(jnp.flip(a)))
  assert np.all(np.asarray(kl_other)[[0, 1, 3, 4]] > 1e-2)


def test_soft_labels_and_mixing():
  log_p, log_q = jnp.log(jnp.array([0.1, 0.5, 0.2])), jnp.log(jnp.array([0.2, 0.25, 0.2]))
  np.testing.assert_allclose(specdecpp.soft_labels(log_p, log_q), [0.5, 1.0, 1.0], rtol=1e-6)
  x = jnp.zeros((200, 50), jnp.int32)
  tokens, mask = specdecpp.mix_inputs(jax.random.key(5), x, x + 1, 0.15)
  np.testing.assert_array_equal(np.asarray(tokens) == 1, np.asarray(mask))
  assert abs(1 - float(mask.mean()) - 0.15) < 0.01


def test_stop_rule_matches_numpy_reference():
  graphdef, params = specdecpp.init_head(V, jax.random.key(6), num_layers=2)
  k_min, k_max = 2, 8
  policy = specdecpp.specdecpp_policy(graphdef, k_min=k_min, k_max=k_max)
  counts = {}
  for trial in range(4):
    hiddens = 3 * jax.random.normal(jax.random.key(10 + trial), (k_max, V))
    a_hat = _np_accept(_np_head(graphdef, params, hiddens))
    assert 0 < a_hat.min() and a_hat.max() < 1
    for h in (0.0, 0.2, 0.5, 0.8, 1.0):
      pp = specdecpp.ThresholdParams(jnp.float32(h), params)
      counts[trial, h] = _run_policy(policy, pp, hiddens)
      assert counts[trial, h] == _np_drafted(a_hat, h, k_min, k_max), (trial, h)
    # Card oracle 4: K non-decreasing in h; h = 1 gives K_max, h = 0 gives K_min.
    ks = [counts[trial, h] for h in (0.0, 0.2, 0.5, 0.8, 1.0)]
    assert ks == sorted(ks) and ks[0] == k_min and ks[-1] == k_max
  assert len(set(counts.values())) > 2  # the hidden states matter
  # All estimates 1: never stops before K_max, whatever h.
  ones = specdecpp.threshold_policy(lambda _, info: jnp.float32(1.0), k_min=1, k_max=k_max)
  assert _run_policy(ones, specdecpp.ThresholdParams(jnp.float32(0.0), None),
                     jnp.zeros((k_max, V))) == k_max


def test_iid_theory_closed_forms():
  for a in (0.3, 0.6, 0.8, 0.95):
    for k in range(1, 6):
      # Tokens per round by enumerating acceptance patterns: accepted prefix + 1.
      e = sum(np.prod([a if b else 1 - a for b in bits]) * (
          (list(bits) + [False]).index(False) + 1)
              for bits in itertools.product([True, False], repeat=k))
      np.testing.assert_allclose(specdecpp.iid_expected_tokens(a, k), e, rtol=1e-10)
    for c in (1.0, 5.0, 20.0):
      ks = np.arange(1, 21)
      brute = ks[np.argmax([(1 - a ** (k + 1)) / (1 - a) / (k + c) for k in ks])]
      assert specdecpp.iid_best_constant_k(a, c, 20) == brute


def test_decoder_drafts_the_closed_form_length_under_iid_estimates():
  """Oracle 6: with a_hat = a for every token, every round (but the last) drafts the k
  whose threshold interval contains h."""
  k_min, k_max = 2, 6
  policy = specdecpp.threshold_policy(lambda acc, info: acc, k_min=k_min, k_max=k_max)
  decode = speculative.make_speculative_decoder(LM, LM, prompt_len=4, max_new=20,
                                                k_max=k_max, policy=policy)
  for a, k in [(0.8, 2), (0.8, 5), (0.9, 4), (0.6, 3), (0.95, 6)]:
    lo, hi = specdecpp.iid_threshold_interval(a, k, k_min=k_min, k_max=k_max)
    h = (max(lo, 0.0) + min(hi, 1.0)) / 2
    out = decode(TARGET, DRAFT, PROMPT, PROMPT_LEN, jax.random.key(7),
                 specdecpp.ThresholdParams(jnp.float32(h), jnp.float32(a)))
    rounds = int(out.rounds)
    assert rounds > 2
    np.testing.assert_array_equal(np.asarray(out.drafted)[:rounds - 1], k)


def _random_head_policy(k_min=1, k_max=N):
  # The table LM's "hidden state" is its logit row: a random head on it makes the stopping
  # decision depend on the drafted tokens.
  graphdef, params = specdecpp.init_head(V, jax.random.key(8), num_layers=2)
  return (specdecpp.specdecpp_policy(graphdef, k_min=k_min, k_max=k_max),
          specdecpp.ThresholdParams(jnp.float32(0.4), params))


def test_output_law_with_specdecpp_policy_equals_the_target():
  policy, pp = _random_head_policy()
  decode = speculative.make_speculative_decoder(LM, LM, prompt_len=4, max_new=N, k_max=N,
                                                policy=policy)
  run = jax.jit(jax.vmap(lambda key: decode(TARGET, DRAFT, PROMPT, PROMPT_LEN, key, pp)))
  out = run(jax.random.split(jax.random.key(9), NUM_SAMPLES))
  codes = (np.asarray(out.tokens) * V ** np.arange(N)[::-1]).sum(1)
  law = np.bincount(codes, minlength=V ** N) / NUM_SAMPLES
  exact = tl.continuation_probs(TARGET, [1, 2], N).ravel()
  # Twice the expected TV of a correct sampler (E|p_hat - p| ~ sqrt(2p(1-p)/(pi n))).
  bound = float(np.sum(np.sqrt(2 * exact * (1 - exact) / (np.pi * NUM_SAMPLES))))
  tv = 0.5 * np.abs(law - exact).sum()
  assert tv < bound, (tv, bound)
  draft_law = tl.continuation_probs(DRAFT, [1, 2], N).ravel()
  assert 0.5 * np.abs(draft_law - exact).sum() > 5 * bound  # the test has power
  # The rule really varies the length (it cannot stop at 1: the first estimate is 1).
  first = np.asarray(out.drafted)[:, 0]
  assert 0.05 < np.mean(first == 2) < 0.95 and np.all(first >= 2)


def test_greedy_with_specdecpp_policy_equals_greedy_target_decoding():
  target, draft = plm.load("synthlang_target"), plm.load("synthlang_draft")
  tlm = speculative.transformer_lm(target.config, target.graphdef)
  dlm = speculative.transformer_lm(draft.config, draft.graphdef)
  graphdef, params = specdecpp.init_head(draft.config.d_model, jax.random.key(12))
  policy = specdecpp.specdecpp_policy(graphdef, k_min=2, k_max=6)
  prompts = jnp.asarray(plm.language().sample(5, 4, 12))
  lens = jnp.array([12, 7, 2, 10], jnp.int32)
  keys = jax.random.split(jax.random.key(13), 4)
  pp = specdecpp.ThresholdParams(jnp.float32(0.5), params)
  sd = jax.vmap(speculative.make_speculative_decoder(
      tlm, dlm, prompt_len=12, max_new=32, k_max=6, config=sampling.GREEDY, policy=policy),
      in_axes=(None, None, 0, 0, 0, None))(target.params, draft.params, prompts, lens, keys,
                                           pp)
  ar = jax.vmap(speculative.make_autoregressive_decoder(
      tlm, prompt_len=12, max_new=32, config=sampling.GREEDY),
      in_axes=(None, 0, 0, 0))(target.params, prompts, lens, keys)
  np.testing.assert_array_equal(sd.tokens, ar.tokens)
  dr = np.asarray(sd.drafted)
  assert np.all((dr == -1) | ((dr >= 2) & (dr <= 6)))


def test_oracle_policy_logs_true_acceptances():
  """The oracle's shadow target reproduces min(1, p(x)/q(x)) of every drafted token,
  checked against the tables on the committed prefix."""
  max_new, k_max = 12, 4
  num_slots = 4 + max_new + k_max + 1
  policy = specdecpp.oracle_policy(LM, prompt_len=4, num_slots=num_slots, k_min=1,
                                   k_max=k_max)
  decode = speculative.make_speculative_decoder(LM, LM, prompt_len=4, max_new=max_new,
                                                k_max=k_max, policy=policy)
  pp = specdecpp.ThresholdParams(jnp.float32(0.5),
                                 specdecpp.OracleParams(TARGET, PROMPT, jnp.int32(PROMPT_LEN)))
  out = decode(TARGET, DRAFT, PROMPT, PROMPT_LEN, jax.random.key(14), pp)
  seq = [1, 2] + [int(t) for t in out.tokens]
  p, q = np.exp(np.asarray(TARGET)), np.exp(np.asarray(DRAFT))
  log, toks = np.asarray(out.policy_state.accept_log), np.asarray(out.policy_state.token_log)
  drafted, accepted = np.asarray(out.drafted), np.asarray(out.accepted)
  checked, cur = 0, PROMPT_LEN
  for r in range(int(out.rounds)):
    # The round's accepted drafts and its first rejected one have the committed prefix as
    # context, and later rounds start after them, so their log slots are final.
    for pos in range(cur, cur + min(accepted[r], drafted[r] - 1) + 1):
      if pos >= len(seq):
        break
      ctx, x = (seq[pos - 2], seq[pos - 1]), toks[pos]
      if pos < cur + accepted[r]:
        assert x == seq[pos]
      np.testing.assert_allclose(log[pos], min(1.0, p[ctx][x] / q[ctx][x]), rtol=1e-5)
      checked += 1
    cur += accepted[r] + 1
  assert checked >= 4


def test_argument_errors():
  with pytest.raises(ValueError, match="hidden_size"):
    specdecpp.init_head(0, jax.random.key(0))
  with pytest.raises(ValueError, match="weight_mismatch"):
    specdecpp.weighted_bce(jnp.zeros((2, 2)), jnp.zeros((2,)), jnp.ones((2,), bool), 0.0)
  with pytest.raises(ValueError, match="ratio"):
    specdecpp.mix_inputs(jax.random.key(0), jnp.zeros((2,)), jnp.zeros((2,)), 1.5)
  with pytest.raises(ValueError, match="same shape"):
    specdecpp.mix_inputs(jax.random.key(0), jnp.zeros((2,)), jnp.zeros((3,)), 0.1)
  with pytest.raises(ValueError, match="k_min"):
    specdecpp.threshold_policy(lambda p, i: 1.0, k_min=3, k_max=2)
  with pytest.raises(ValueError, match="k_min"):
    specdecpp.specdecpp_policy(None, k_min=0)
  with pytest.raises(ValueError, match="num_slots"):
    specdecpp.oracle_policy(LM, prompt_len=4, num_slots=4)
  with pytest.raises(ValueError, match="cost_ratio"):
    specdecpp.iid_best_constant_k(0.5, 0.0, 4)
  with pytest.raises(ValueError, match="k="):
    specdecpp.iid_threshold_interval(0.5, 9, k_min=2, k_max=6)


@pytest.mark.parametrize("field,value,match", [
    ("spec.k_min", 30, "k_min"), ("head.mixing_ratio", 1.0, "mixing_ratio"),
    ("spec.constant_ks", "0,2", "constant_ks"), ("spec.temperature", 0.0, "temperature"),
    ("spec.max_new", 400, "max_len"), ("clock.wall_prompts", -1, "wall_prompts")])
def test_config_errors(field, value, match):
  config = specdecpp_config.get_config("smoke")
  specdecpp_driver.check_config(config)
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(common.ConfigError, match=match):
    specdecpp_driver.check_config(config)
