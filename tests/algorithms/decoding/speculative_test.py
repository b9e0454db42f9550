"""Tests of the speculative and autoregressive decoders.

Oracles: the exact law of the next N tokens by enumeration on table LMs (V = 4, N = 3),
token-for-token equality of greedy SD and greedy AR decoding (table LMs and the shipped
SynthLang transformers), and bookkeeping identities of the statistics.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.decoding import sampling, speculative
from jaxrepro.algorithms.decoding import table_lm as tl
from jaxrepro.launch import pretrained_lms as plm
from jaxrepro.models import transformer as tfm

V, ORDER, N = 4, 3, 3
TARGET = tl.random_table(jax.random.key(0), V, ORDER)
# An order-2 draft (it ignores one context token) mixed towards a random table: the draft
# is genuinely different from the target (mean acceptance ~0.6), so a wrong verifier shows.
DRAFT = tl.mixed_draft(jax.random.key(1),
                       jnp.broadcast_to(tl.random_table(jax.random.key(2), V, 2)[None],
                                        TARGET.shape), 0.3)
LM = tl.table_lm(V, ORDER)
PROMPT, PROMPT_LEN = jnp.array([1, 2, 0, 0], jnp.int32), 2
NUM_SAMPLES = 100_000


def _law(tokens):
  """Empirical law of [n, N] continuations as a [V ** N] vector."""
  codes = (np.asarray(tokens) * V ** np.arange(N)[::-1]).sum(1)
  return np.bincount(codes, minlength=V ** N) / len(codes)


def _tv_bound(exact, n):
  """Twice the expected TV distance of an n-sample empirical law from `exact`.

  E|p_hat - p| ~ sqrt(2 p (1 - p) / (pi n)) per cell; the TV of a correct sampler
  concentrates around half their sum (relative spread ~15% here), so twice the mean is
  about 7 standard deviations above it.
  """
  return float(np.sum(np.sqrt(2 * exact * (1 - exact) / (np.pi * n))))


def _random_stop_policy():
  """A draft-side stopping rule (depends on the drafted token and its q only)."""
  return speculative.DraftPolicy(
      init=lambda _: (),
      stop=lambda _, s, info: ((info.q[info.token] < 0.5) | (info.fed_token == 3), s),
      end_round=lambda _, s, drafted, accepted: s)


CASES = {
    "k2_t1": dict(k_max=2, config=sampling.SamplingConfig()),
    "k3_warped_adaptive_branches": dict(
        k_max=3, config=sampling.SamplingConfig(0.8, 0, 0.9), policy=_random_stop_policy(),
        verify_branches=True),
    "k1_hot_draft": dict(k_max=1, config=sampling.SamplingConfig(),
                         draft_config=sampling.SamplingConfig(1.5)),
    "heuristic": dict(k_max=3, config=sampling.SamplingConfig(top_k=3),
                      policy=speculative.heuristic_policy(1)),
}


def _run_many(decode, *params):
  keys = jax.random.split(jax.random.key(3), NUM_SAMPLES)
  batched = jax.jit(jax.vmap(decode, in_axes=(None,) * len(params) + (None, None, 0)))
  return batched(*params, PROMPT, PROMPT_LEN, keys)


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_output_law_equals_the_target(case):
  kwargs = CASES[case]
  decode = speculative.make_speculative_decoder(LM, LM, prompt_len=4, max_new=N, **kwargs)
  out = _run_many(decode, TARGET, DRAFT)
  exact = tl.continuation_probs(TARGET, [1, 2], N, kwargs["config"]).ravel()
  bound = _tv_bound(exact, NUM_SAMPLES)
  tv = 0.5 * np.abs(_law(out.tokens) - exact).sum()
  assert tv < bound, (tv, bound)
  # The test has power: the draft's own law is far outside the bound.
  draft_law = tl.continuation_probs(DRAFT, [1, 2], N,
                                    kwargs.get("draft_config", kwargs["config"])).ravel()
  assert 0.5 * np.abs(draft_law - exact).sum() > 5 * bound
  _check_stats(out, kwargs["k_max"], constant="policy" not in kwargs)


def test_autoregressive_law_equals_the_target():
  decode = speculative.make_autoregressive_decoder(LM, prompt_len=4, max_new=N)
  out = _run_many(decode, TARGET)
  exact = tl.continuation_probs(TARGET, [1, 2], N).ravel()
  assert 0.5 * np.abs(_law(out.tokens) - exact).sum() < _tv_bound(exact, NUM_SAMPLES)
  np.testing.assert_array_equal(out.target_calls, N)
  np.testing.assert_array_equal(out.draft_calls, 0)


def _check_stats(out, k_max, constant):
  acc, dr = np.asarray(out.accepted), np.asarray(out.drafted)
  rounds = np.asarray(out.rounds)
  used = np.arange(acc.shape[1])[None] < rounds[:, None]
  assert np.all((acc >= 0) == used) and np.all((dr >= 0) == used)
  assert np.all(acc <= dr) and np.all(dr <= k_max) and np.all(dr[used] >= 1)
  if constant:
    assert np.all(dr[used] == k_max)
  total_acc = np.where(used, acc, 0).sum(1)
  np.testing.assert_array_equal(out.num_generated, rounds + total_acc)
  np.testing.assert_array_equal(out.draft_calls, np.where(used, dr, 0).sum(1))
  np.testing.assert_array_equal(out.target_calls, rounds)
  assert np.all(np.asarray(out.num_generated) >= N)
  assert np.all(np.asarray(out.num_generated) <= N + k_max)
  # Tokens per target call = 1 + mean accepted per round (pooled over runs).
  tpc = np.asarray(out.num_generated).sum() / rounds.sum()
  np.testing.assert_allclose(tpc, 1 + total_acc.sum() / rounds.sum(), rtol=1e-12)


def test_identical_draft_accepts_everything():
  decode = jax.jit(jax.vmap(
      speculative.make_speculative_decoder(LM, LM, prompt_len=4, max_new=10, k_max=3),
      in_axes=(None, None, None, None, 0)))
  out = decode(TARGET, TARGET, PROMPT, PROMPT_LEN, jax.random.split(jax.random.key(4), 64))
  np.testing.assert_array_equal(out.rounds, 3)  # ceil(10 / (3 + 1))
  np.testing.assert_array_equal(out.accepted[:, :3], 3)
  np.testing.assert_array_equal(out.num_generated, 12)


def test_heuristic_policy_follows_its_rule():
  decode = jax.jit(jax.vmap(speculative.make_speculative_decoder(
      LM, LM, prompt_len=4, max_new=24, k_max=4, policy=speculative.heuristic_policy(2, 1, 4)),
      in_axes=(None, None, None, None, 0)))
  out = decode(TARGET, DRAFT, PROMPT, PROMPT_LEN, jax.random.split(jax.random.key(5), 32))
  acc, dr = np.asarray(out.accepted), np.asarray(out.drafted)
  assert np.all(dr[:, 0] == 2)
  for b in range(32):
    k = 2
    for r in range(int(out.rounds[b]) - 1):
      k = min(k + 2, 4) if acc[b, r] == dr[b, r] else max(k - 1, 1)
      assert dr[b, r + 1] == k, (b, r)


@pytest.mark.parametrize("k_max", [1, 3])
def test_greedy_speculative_equals_greedy_autoregressive_on_tables(k_max):
  v, n_new = 6, 12
  target = tl.random_table(jax.random.key(6), v, ORDER, concentration=1.0)
  draft = tl.mixed_draft(jax.random.key(7), target, 0.6)
  lm = tl.table_lm(v, ORDER)
  prompts = jax.random.randint(jax.random.key(8), (20, 4), 0, v)
  lens = jnp.asarray(np.random.default_rng(0).integers(2, 5, 20), jnp.int32)
  keys = jax.random.split(jax.random.key(9), 20)
  sd = jax.vmap(speculative.make_speculative_decoder(
      lm, lm, prompt_len=4, max_new=n_new, k_max=k_max, config=sampling.GREEDY),
      in_axes=(None, None, 0, 0, 0))(target, draft, prompts, lens, keys)
  ar = jax.vmap(speculative.make_autoregressive_decoder(
      lm, prompt_len=4, max_new=n_new, config=sampling.GREEDY),
      in_axes=(None, 0, 0, 0))(target, prompts, lens, keys)
  np.testing.assert_array_equal(sd.tokens, ar.tokens)
  assert np.asarray(sd.rounds).mean() < n_new  # some drafts were accepted
  assert np.any(np.asarray(sd.accepted) < k_max)  # and some rejected


def test_argument_errors():
  small = tl.table_lm(3, 2)
  with pytest.raises(ValueError, match="vocabularies"):
    speculative.make_speculative_decoder(LM, small, prompt_len=4, max_new=2, k_max=1)
  with pytest.raises(ValueError, match="k_max"):
    speculative.make_speculative_decoder(LM, LM, prompt_len=4, max_new=2, k_max=0)
  bounded = LM._replace(max_len=8)
  with pytest.raises(ValueError, match="max_len"):
    speculative.make_speculative_decoder(bounded, LM, prompt_len=4, max_new=4, k_max=2)
  with pytest.raises(ValueError, match="greedy"):
    speculative.make_speculative_decoder(LM, LM, prompt_len=4, max_new=2, k_max=1,
                                         draft_config=sampling.GREEDY)


@pytest.mark.parametrize("k_max", [3, 6])
def test_greedy_speculative_equals_greedy_autoregressive_on_shipped_models(k_max):
  # Token-identical up to floating-point ties: chunked and single-token forwards agree to
  # ~1e-6 in the logits, far below the gaps between the top two logits here.
  target, draft = plm.load("synthlang_target"), plm.load("synthlang_draft")
  tlm = speculative.transformer_lm(target.config, target.graphdef)
  dlm = speculative.transformer_lm(draft.config, draft.graphdef)
  prompts = jnp.asarray(plm.language().sample(5, 4, 12))
  lens = jnp.array([12, 7, 2, 10], jnp.int32)
  keys = jax.random.split(jax.random.key(10), 4)
  sd = jax.vmap(speculative.make_speculative_decoder(
      tlm, dlm, prompt_len=12, max_new=40, k_max=k_max, config=sampling.GREEDY),
      in_axes=(None, None, 0, 0, 0))(target.params, draft.params, prompts, lens, keys)
  ar = jax.vmap(speculative.make_autoregressive_decoder(
      tlm, prompt_len=12, max_new=40, config=sampling.GREEDY),
      in_axes=(None, 0, 0, 0))(target.params, prompts, lens, keys)
  np.testing.assert_array_equal(sd.tokens, ar.tokens)
  assert 1 < np.mean(np.asarray(sd.num_generated) / np.asarray(sd.rounds)) <= k_max + 1


def test_policy_sees_the_drafts_hidden_states():
  """SpecDec++'s head reads DraftInfo.hidden: it must be the draft's final hidden state at
  the fed token. A recording policy keeps each round's hidden states and, at the end of the
  round, stores those whose fed token was committed (indices 0..accepted) by position; they
  must equal a full (uncached) forward of the draft on the output sequence."""
  target, draft = plm.load("synthlang_target"), plm.load("synthlang_draft")
  tlm = speculative.transformer_lm(target.config, target.graphdef)
  dlm = speculative.transformer_lm(draft.config, draft.graphdef)
  prompt_len, max_new, k, d = 8, 24, 3, draft.config.d_model
  buf = prompt_len + max_new + k + 1

  def stop(_, state, info):
    log, pending, base = state
    base = jnp.where(info.index == 0, info.position, base)
    return info.index + 1 >= k, (log, pending.at[info.index].set(info.hidden), base)

  def end_round(_, state, drafted, accepted):
    log, pending, base = state
    for j in range(k):
      keep = (j <= accepted) & (j < drafted)
      log = jnp.where(keep, log.at[base + j].set(pending[j]), log)
    return log, pending, base

  record = speculative.DraftPolicy(
      init=lambda _: (jnp.zeros((buf, d)), jnp.zeros((k, d)), jnp.int32(0)), stop=stop,
      end_round=end_round)
  decode = speculative.make_speculative_decoder(
      tlm, dlm, prompt_len=prompt_len, max_new=max_new, k_max=k, policy=record)
  prompt = jnp.asarray(plm.language().sample(6, 1, prompt_len))[0]

  @jax.jit
  def run(key):
    out = decode(target.params, draft.params, prompt, prompt_len, key)
    seq = jnp.concatenate([prompt, out.tokens])[None]
    _, hidden = tfm.apply_transformer(draft.graphdef, draft.params, seq, return_hidden=True)
    return out, hidden[0]

  out, hidden = run(jax.random.key(11))
  log = np.asarray(out.policy_state[0])[:prompt_len + max_new]
  seen = np.abs(log).sum(-1) > 0
  assert seen.sum() >= int(out.rounds) and not seen[:prompt_len - 1].any()
  np.testing.assert_allclose(log[seen], np.asarray(hidden)[seen], atol=2e-5, rtol=1e-5)
