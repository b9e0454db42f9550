"""Tests of PEARL's decoder (pre-verify / post-verify mode machine) and its virtual clock.

Oracles: the exact law of the next N tokens by enumeration on table LMs (V = 4, N = 3 and
4), token-for-token equality of greedy PEARL and greedy autoregressive decoding (table LMs
and the shipped SynthLang transformers), the card's closed forms for a perfect draft
(alpha = 1) and a never-accepted draft (disjoint supports), the mode machine's transition
rule, a hand-computed virtual time of a hand-built round log, and the two-device
`shard_map` program against the one-device decoder.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.decoding import pearl, sampling, speculative, virtual_clock
from jaxrepro.algorithms.decoding import table_lm as tl
from jaxrepro.launch import pretrained_lms as plm

V, ORDER = 4, 3
TARGET = tl.random_table(jax.random.key(0), V, ORDER)
# An order-2 draft mixed towards a random table (mean acceptance ~0.6): a wrong verifier or
# a stale q / cache shows up in the output law.
DRAFT = tl.mixed_draft(jax.random.key(1),
                       jnp.broadcast_to(tl.random_table(jax.random.key(2), V, 2)[None],
                                        TARGET.shape), 0.3)
LM = tl.table_lm(V, ORDER)
PROMPT, PROMPT_LEN = jnp.array([1, 2, 0, 0], jnp.int32), 2
NUM_SAMPLES = 100_000


def _law(tokens, n):
  codes = (np.asarray(tokens)[:, :n] * V ** np.arange(n)[::-1]).sum(1)
  return np.bincount(codes, minlength=V ** n) / len(codes)


def _tv_bound(exact, n):
  """Twice the expected TV of an n-sample empirical law from `exact` (~7 sigma above it)."""
  return float(np.sum(np.sqrt(2 * exact * (1 - exact) / (np.pi * n))))


def _run_many(decode, target, draft, n=NUM_SAMPLES, seed=3):
  keys = jax.random.split(jax.random.key(seed), n)
  batched = jax.jit(jax.vmap(decode, in_axes=(None, None, None, None, 0)))
  return batched(target, draft, PROMPT, PROMPT_LEN, keys)


CASES = {
    # gamma 1: post-verify rounds verify one token, so the mode machine is exercised with
    # width 1 both ways.
    "g1_n3": dict(gamma=1, n=3, config=sampling.SamplingConfig()),
    "g2_n4": dict(gamma=2, n=4, config=sampling.SamplingConfig()),
    "g3_n4_warped_hot_draft": dict(gamma=3, n=4, config=sampling.SamplingConfig(0.8, 0, 0.9),
                                   draft_config=sampling.SamplingConfig(1.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_law_equals_the_target(case):
  kw = dict(CASES[case])
  n = kw.pop("n")
  decode = pearl.make_pearl_decoder(LM, LM, prompt_len=4, max_new=n, **kw)
  out = _run_many(decode, TARGET, DRAFT)
  exact = tl.continuation_probs(TARGET, [1, 2], n, kw["config"]).ravel()
  tv = 0.5 * np.abs(_law(out.tokens, n) - exact).sum()
  assert tv < _tv_bound(exact, NUM_SAMPLES), (tv, _tv_bound(exact, NUM_SAMPLES))
  # Both modes occur, and post-verify rounds with a rejection too.
  mode, acc, width = (np.asarray(a) for a in (out.mode, out.accepted, out.width))
  assert (mode == pearl.PRE).any() and (mode == pearl.POST).any()
  if kw["gamma"] > 1:
    assert ((mode == pearl.POST) & (acc < width)).any()


def test_the_law_test_has_power():
  """The draft's own law (what an unverified sampler would emit) fails the same TV bound."""
  exact = tl.continuation_probs(TARGET, [1, 2], 3).ravel()
  draft_law = tl.continuation_probs(DRAFT, [1, 2], 3).ravel()
  assert 0.5 * np.abs(draft_law - exact).sum() > 10 * _tv_bound(exact, NUM_SAMPLES)


@pytest.mark.parametrize("gamma", [1, 2, 4])
def test_greedy_pearl_equals_greedy_autoregressive_on_tables(gamma):
  ar = speculative.make_autoregressive_decoder(LM, prompt_len=4, max_new=12,
                                               config=sampling.GREEDY)
  dec = pearl.make_pearl_decoder(LM, LM, prompt_len=4, max_new=12, gamma=gamma,
                                 config=sampling.GREEDY)
  for seed in range(4):
    target = tl.random_table(jax.random.key(10 + seed), V, ORDER)
    draft = tl.mixed_draft(jax.random.key(20 + seed), target, 0.5)
    prompt = jnp.array([seed % V, 1, 3, 0], jnp.int32)
    want = ar(target, prompt, 3, jax.random.key(0)).tokens
    got = dec(target, draft, prompt, 3, jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want))
    assert int(got.num_generated) >= 12


@pytest.fixture(scope="module")
def shipped():
  t, d = plm.load("synthlang_target"), plm.load("synthlang_draft")
  return (speculative.transformer_lm(t.config, t.graphdef), t.params,
          speculative.transformer_lm(d.config, d.graphdef), d.params)


@pytest.mark.parametrize("gamma", [3])
def test_greedy_pearl_equals_greedy_autoregressive_on_shipped_models(shipped, gamma):
  target, tparams, draft, dparams = shipped
  prompts = jnp.asarray(plm.language().sample(5, 3, 12))
  ar = speculative.make_autoregressive_decoder(target, prompt_len=12, max_new=40,
                                               config=sampling.GREEDY)
  dec = pearl.make_pearl_decoder(target, draft, prompt_len=12, max_new=40, gamma=gamma,
                                 config=sampling.GREEDY)
  rejected_post = 0
  for i in range(prompts.shape[0]):
    # A shorter real prompt inside the buffer checks the padding rollback too.
    length = 12 - i
    want = ar(tparams, prompts[i], length, jax.random.key(0)).tokens
    got = dec(tparams, dparams, prompts[i], length, jax.random.key(i))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want))
    log = pearl.round_log(got)
    rejected_post += int(((log.mode == pearl.POST) & (log.accepted < log.width)).sum())
  assert rejected_post > 0  # the rollback of both caches was exercised


def test_mode_machine_transitions():
  """After any rejection the next round is pre-verify; after an accepted round post-verify;
  the target's width is 1 in pre-verify and gamma in post-verify."""
  gamma = 3
  decode = pearl.make_pearl_decoder(LM, LM, prompt_len=4, max_new=24, gamma=gamma)
  out = _run_many(decode, TARGET, DRAFT, n=200)
  for i in range(200):
    mode, width, acc = (np.asarray(a)[i] for a in (out.mode, out.width, out.accepted))
    r = int(out.rounds[i])
    assert (mode[r:] == -1).all() and (mode[:r] >= 0).all()
    mode, width, acc = mode[:r], width[:r], acc[:r]
    assert mode[0] == pearl.PRE
    np.testing.assert_array_equal(width, np.where(mode == pearl.PRE, 1, gamma))
    assert ((acc >= 0) & (acc <= width)).all()
    np.testing.assert_array_equal(mode[1:], np.where(acc[:-1] < width[:-1], pearl.PRE,
                                                     pearl.POST))
    # Verified tokens: a pre-verify round adds 1 (the residual sample or the accepted
    # first draft); a post-verify round adds accepted + 1 on rejection and gamma otherwise.
    added = np.where(mode == pearl.PRE, 1, np.where(acc < width, acc + 1, gamma))
    assert int(out.num_generated[i]) == int(added.sum())


def test_perfect_draft_closed_form():
  """Draft == target (alpha = 1): one pre-verify round, then only accepted post-verify
  rounds of gamma tokens; the virtual clock gives gamma tokens per max(gamma t_d, t_t(gamma))
  (PEARL) and gamma + 1 per gamma t_d + t_t(gamma + 1) (SD), the card's closed forms."""
  gamma, n = 4, 41
  decode = pearl.make_pearl_decoder(LM, LM, prompt_len=4, max_new=n, gamma=gamma)
  out = decode(TARGET, TARGET, PROMPT, PROMPT_LEN, jax.random.key(0))
  log = pearl.round_log(out)
  np.testing.assert_array_equal(log.mode, [pearl.PRE] + [pearl.POST] * (len(log.mode) - 1))
  np.testing.assert_array_equal(log.accepted, log.width)
  # 1 verified by the pre round, then gamma per post round: ceil((n - 1) / gamma) of them.
  assert len(log.mode) == 1 + -(-(n - 1) // gamma)
  costs = virtual_clock.CostModel(target=(1.0, 1.2, 1.4, 1.6, 1.8), draft=0.3)
  post = pearl.overlapped_time(costs, gamma, log.width[1:]) / (len(log.width) - 1)
  assert post == pytest.approx(max(gamma * 0.3, 1.6))
  sd = speculative.make_speculative_decoder(LM, LM, prompt_len=4, max_new=n - 1, k_max=gamma)
  drafted, accepted = virtual_clock.round_log(sd(TARGET, TARGET, PROMPT, PROMPT_LEN,
                                                 jax.random.key(0)))
  np.testing.assert_array_equal(accepted, drafted)
  per_token = virtual_clock.speculative_time(costs, drafted) / (len(drafted) * (gamma + 1))
  assert per_token == pytest.approx((gamma * 0.3 + 1.8) / (gamma + 1))


def test_disjoint_draft_degenerates_to_one_token_per_round():
  """Draft never accepted: every round is pre-verify and emits one target sample, and
  PEARL is never slower than SD in virtual time (card oracle 4)."""
  probs = jnp.exp(TARGET)
  half = jnp.arange(V) < V // 2
  p = jnp.where(half, probs, 0.0)
  q = jnp.where(half, 0.0, probs)
  target = jnp.log(jnp.maximum(p / p.sum(-1, keepdims=True), 1e-38))
  draft = jnp.log(jnp.maximum(q / q.sum(-1, keepdims=True), 1e-38))
  gamma, n = 3, 10
  decode = pearl.make_pearl_decoder(LM, LM, prompt_len=4, max_new=n, gamma=gamma)
  out = _run_many(decode, target, draft, n=64)
  assert (np.asarray(out.rounds) == n).all()
  assert (np.asarray(out.mode)[:, :n] == pearl.PRE).all()
  assert (np.asarray(out.accepted)[:, :n] == 0).all()
  assert (np.asarray(out.tokens) < V // 2).all()
  costs = virtual_clock.CostModel(target=(1.0, 1.5, 2.0, 2.5), draft=0.2)
  pearl_time = pearl.overlapped_time(costs, gamma, np.ones(n, np.int64))
  assert pearl_time == pytest.approx(n * max(gamma * 0.2, 1.0))
  for k in range(1, 4):  # SD emits one token per round too, at k t_d + t_t(k + 1)
    assert pearl_time <= virtual_clock.speculative_time(costs, np.full(n, k)) + 1e-12


def test_virtual_time_of_a_hand_built_round_log():
  costs = virtual_clock.CostModel(target=(1.0, 1.5, 2.0, 2.5), draft=0.3)
  gamma = 3
  width = np.array([1, 3, 3, 1, 3])
  # max(0.9, 1) + max(0.9, 2) + max(0.9, 2) + max(0.9, 1) + max(0.9, 2) = 8.0
  assert pearl.overlapped_time(costs, gamma, width) == pytest.approx(8.0)
  # (0.9 + 1) * 2 + (0.9 + 2) * 3 = 12.5
  assert pearl.sequential_time(costs, gamma, width) == pytest.approx(12.5)
  # A draft slower than the target: the draft's gamma t_d dominates every round.
  slow = virtual_clock.CostModel(target=(1.0, 1.5, 2.0), draft=0.9)
  assert pearl.overlapped_time(slow, gamma, width) == pytest.approx(5 * 2.7)
  # Mean accepted tokens: runs end at rejections; the unfinished last run counts.
  accepted = np.array([1, 3, 2, 0, 1, 3])
  width = np.array([1, 3, 3, 1, 1, 3])
  assert pearl.mean_accepted_tokens(accepted, width) == (10, 3)
  assert pearl.mean_accepted_tokens(np.array([1, 3, 1]), np.array([1, 3, 3])) == (5, 1)
  assert pearl.mean_accepted_tokens(np.array([], np.int64), np.array([], np.int64)) == (0, 0)


def test_two_device_program_matches_one_device():
  devices = np.asarray(jax.devices()[:2])
  mesh = jax.sharding.Mesh(devices, ("pair",))
  kw = dict(prompt_len=4, max_new=10, gamma=3)
  one = pearl.make_pearl_decoder(LM, LM, **kw)
  two = pearl.make_two_device_decoder(LM, LM, mesh=mesh, axis_name="pair", **kw)
  for seed in range(3):
    key = jax.random.key(seed)
    want = one(TARGET, DRAFT, PROMPT, PROMPT_LEN, key)
    got = two(TARGET, DRAFT, PROMPT, PROMPT_LEN, key)
    for field, a, b in zip(want._fields, want, got):
      for dev in range(2):
        np.testing.assert_array_equal(np.asarray(b)[dev], np.asarray(a), err_msg=field)


def test_argument_errors():
  with pytest.raises(ValueError, match="gamma"):
    pearl.make_pearl_decoder(LM, LM, prompt_len=4, max_new=3, gamma=0)
  with pytest.raises(ValueError, match="vocabularies"):
    pearl.make_pearl_decoder(LM, tl.table_lm(V + 1, ORDER), prompt_len=4, max_new=3,
                             gamma=2)
  with pytest.raises(ValueError, match="greedy"):
    pearl.make_pearl_decoder(LM, LM, prompt_len=4, max_new=3, gamma=2,
                             config=sampling.GREEDY, draft_config=sampling.DEFAULT)
  with pytest.raises(ValueError, match="prompt_len"):
    pearl.make_pearl_decoder(LM, LM, prompt_len=0, max_new=3, gamma=2)
  short = speculative.LM(LM.init_cache, LM.apply, V, max_len=16)
  with pytest.raises(ValueError, match="max_len"):
    pearl.make_pearl_decoder(short, LM, prompt_len=4, max_new=12, gamma=2)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("pair",))
  with pytest.raises(ValueError, match="axis_name"):
    pearl.make_two_device_decoder(LM, LM, mesh=mesh, axis_name="pair", prompt_len=4,
                                  max_new=3, gamma=2)
