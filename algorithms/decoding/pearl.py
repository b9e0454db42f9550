"""PEARL: parallel speculative decoding with pre-verify, post-verify and adaptive draft length.

Paper: Liu, Li, Lv, Liu, Zhu, Hu, Sun, "PEARL: Parallel Speculative Decoding with Adaptive
Draft Length", ICLR 2025, arXiv:2408.11850 (official code: smart-lty/ParallelSpeculativeDecoding,
`src/engine.py:parallel_speculative_decoding`).

Speculative decoding (SD, `speculative.make_speculative_decoder`) alternates: the draft
guesses gamma tokens while the target waits, then the target verifies them while the draft
waits ("mutual waiting"). PEARL puts the two models on two devices and runs them at the same
time in every round, with a window gamma ~ c = t_target / t_draft so that both finish together.
A round starts with L tokens in the prefix and is in one of two modes:

* pre-verify (at the start and after every rejection). The draft drafts x_L..x_{L+gamma-1};
  concurrently the target runs one forward on the last prefix token (width 1), which gives
  p(. | x_<L), and the first draft is verified with the standard rule
      accept x_L  iff  u q(x_L) < p(x_L),  u ~ U[0, 1).
  Rejected: emit y ~ norm(max(p - q, 0)), drop the drafts, stay in pre-verify.
  Accepted: append all gamma drafts (x_L verified, the other gamma - 1 not yet) and switch to
  post-verify.
* post-verify. The prefix ends with gamma - 1 unverified drafts. The draft drafts gamma new
  tokens after the prefix; concurrently the target runs one forward on the last gamma
  prefix tokens (width gamma), which gives p at the gamma - 1 unverified positions and at the
  first new draft, and these gamma tokens are verified as a chain. All accepted: append the
  gamma new drafts and stay in post-verify (the draft length grows in steps of gamma: the
  "adaptive draft length"). First rejection at i: emit the residual sample there, drop
  everything after it (both caches roll back), switch to pre-verify.

Every token passes the standard rejection test with its own uniform, so the output has
exactly the target's distribution (greedy: exactly greedy decoding). A round costs
max(gamma t_d, t_t(w)) on two devices, w = 1 (pre) or gamma (post), instead of SD's
gamma t_d + t_t(gamma + 1). Theorem (paper): PEARL's mean accepted tokens, the drafts
accepted between two rejections, is at least SD's per round; with i.i.d. acceptance alpha
it is alpha / (1 - alpha) against alpha (1 - alpha^gamma) / (1 - alpha).

One device cannot overlap two models. `make_pearl_decoder` therefore runs both models in
program order inside one jitted `lax.while_loop` (the *sequential emulation*) and logs every
round's mode and target width; `overlapped_time` then charges each round
max(gamma t_d, t_t(w)) on a `virtual_clock.CostModel` built from measured per-call costs
(and `sequential_time` what the emulation really pays, gamma t_d + t_t(w)). Speed claims
from this module are virtual-clock claims. `make_two_device_decoder` is the real two-worker
program: a `jax.shard_map` over a 2-device axis where `lax.switch(lax.axis_index(...))`
runs the draft on device 0 and the target on device 1 and `lax.all_gather` exchanges drafts
and probabilities each round; both devices then take the same decisions from the same
uniforms (the official code seeds both ranks with seed + position for the same reason). On
CPU host devices share the cores, so it checks the communication logic, not speed.

State invariants at the start of a round with `cur` prefix tokens: the draft cache holds
cur - 1 slots (it is fed the last prefix token, then its own drafts: gamma width-1 calls);
the target cache holds cur - 1 slots in pre-verify and cur - gamma in post-verify (it is fed
the last 1 or gamma prefix tokens). Each call sets its cache's `lengths` from `cur` before
writing, which is the rollback. Verified tokens: cur in pre-verify, cur - gamma + 1 in
post-verify; decoding stops once max_new tokens are verified, so the returned tokens never
contain an unverified draft.

Differences from the official code (checked against `src/engine.py`, `src/kvcache.py`):
* The loop ends when max_new tokens are *verified*; the official loop stops on the prefix
  length, so its output can end with up to gamma - 1 unverified drafts.
* Mean accepted tokens also count the last, unfinished run (the official code appends a
  run only at a rejection), so a decode without rejection still has one run.
* Randomness: all uniforms are drawn once per decode (acceptance tests and residual draws by
  inverse CDF, as in `speculative`), instead of torch's global RNG re-seeded per position.
* Prefill of the prompt is not counted in the statistics or the virtual clock (as in
  `speculative`); batch size 1 per decode (`jax.vmap` over prompts); no EOS handling.
* The probability exchange moves q and p rows only (the official code packs the draft
  token ids into a spare row of the gathered tensor).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxrepro.algorithms.decoding import sampling, speculative, verify, virtual_clock

PyTree = Any

PRE, POST = 0, 1  # round modes: pre-verify, post-verify


class PearlOutput(NamedTuple):
  """Result of one PEARL decode (single sequence; add a leading axis under `vmap`).

  Attributes:
    tokens: [max_new] int32, the first max_new verified tokens after the prompt.
    num_generated: int32 scalar, verified tokens at the end (>= max_new).
    rounds: int32 scalar, rounds run (= target calls = draft windows after the prefill).
    mode: [max_new] int32 per round, PRE (0) or POST (1); -1 after the last round.
    width: [max_new] int32 per round, tokens the target was fed and verified that round
      (1 in pre-verify, gamma in post-verify); -1 after the last round.
    accepted: [max_new] int32 per round, drafts accepted that round (0..width); -1 after.
  """
  tokens: jax.Array
  num_generated: jax.Array
  rounds: jax.Array
  mode: jax.Array
  width: jax.Array
  accepted: jax.Array


class _State(NamedTuple):
  tokens: jax.Array  # [buf] int32, prompt then prefix (verified + unverified) then garbage
  cur: jax.Array  # int32 scalar, prefix length (verified + unverified tokens)
  mode: jax.Array  # int32 scalar, PRE or POST
  q_prev: jax.Array  # [gamma - 1, V] draft distributions of the unverified prefix tokens
  tcache: PyTree
  dcache: PyTree
  r: jax.Array  # int32 scalar, rounds done
  mode_log: jax.Array
  width_log: jax.Array
  acc_log: jax.Array


def _check(target: speculative.LM, draft: speculative.LM, prompt_len: int, max_new: int,
           gamma: int, config: sampling.SamplingConfig,
           draft_config: sampling.SamplingConfig):
  if target.vocab_size != draft.vocab_size:
    raise ValueError(f"target and draft vocabularies differ: {target.vocab_size} vs "
                     f"{draft.vocab_size}")
  if gamma < 1:
    raise ValueError(f"gamma must be >= 1; got {gamma}")
  if prompt_len < 1 or max_new < 1:
    raise ValueError(f"prompt_len and max_new must be >= 1; got {prompt_len}, {max_new}")
  if config.greedy != draft_config.greedy:
    raise ValueError("config and draft_config must both be greedy or both sample")
  # The last round can start with cur = end + gamma - 2 and drafts up to position
  # cur + gamma - 1 (see the module docstring), feeding positions up to cur + gamma - 2.
  last = prompt_len + max_new + 2 * gamma - 4
  for name, lm in (("target", target), ("draft", draft)):
    if lm.max_len is not None and last >= lm.max_len:
      raise ValueError(f"{name}: prompt_len {prompt_len} + max_new {max_new} + 2 gamma "
                       f"{2 * gamma} needs positions up to {last}, beyond its max_len "
                       f"{lm.max_len}")


class _Pieces(NamedTuple):
  """The three parts of a round and the loop plumbing, shared by both decoders."""
  prefill_draft: Any
  prefill_target: Any
  draft_work: Any
  target_work: Any
  combine: Any
  init_state: Any
  verified: Any
  finish: Any
  buf: int


def _pieces(target: speculative.LM, draft: speculative.LM, *, prompt_len: int, max_new: int,
            gamma: int, config: sampling.SamplingConfig,
            draft_config: sampling.SamplingConfig) -> _Pieces:
  vocab = target.vocab_size
  # cur can reach end + 2 gamma - 2 (see _check); one spare slot.
  buf = prompt_len + max_new + 2 * gamma + 1

  def prefill(lm, params, tokens, length):
    """Feeds the prompt buffer and keeps cur - 1 = length - 1 slots (pre-verify start)."""
    cache = lm.init_cache(1, buf)
    cache = lm.apply(params, cache, tokens[None, :prompt_len], None, None).cache
    return cache._replace(lengths=jnp.reshape(length - 1, (1,)).astype(jnp.int32))

  def draft_work(dparams, state: _State, u):
    """gamma width-1 draft calls from the last prefix token: drafts [gamma], q [gamma, V]."""
    cur = state.cur
    dcache = state.dcache._replace(lengths=jnp.reshape(cur - 1, (1,)))

    def step(carry, j):
      dcache, fed = carry
      out = draft.apply(dparams, dcache, jnp.reshape(fed, (1, 1)),
                        jnp.reshape(cur - 1 + j, (1, 1)), None)
      q = sampling.probs(out.logits[0, 0], draft_config)
      x = sampling.greedy(out.logits[0, 0]) if draft_config.greedy else sampling.inverse_cdf(
          u[j], q)
      return (out.cache, x), (x, q)

    (dcache, _), (drafts, qs) = lax.scan(step, (dcache, state.tokens[cur - 1]),
                                         jnp.arange(gamma))
    return drafts, qs, dcache

  def target_work(tparams, state: _State):
    """One target call on the last 1 (pre) or gamma (post) prefix tokens.

    Returns p [gamma, V] right-aligned: row gamma - 1 is the distribution at position cur
    (the first new draft); in post-verify rows 0..gamma-2 are those at the gamma - 1
    unverified positions cur - gamma + 1 .. cur - 1 (in pre-verify they are padding).
    """
    def call(w):
      def run():
        start = state.cur - w
        cache = state.tcache._replace(lengths=jnp.reshape(start, (1,)))
        chunk = lax.dynamic_slice(state.tokens, (start,), (w,))
        out = target.apply(tparams, cache, chunk[None], (start + jnp.arange(w))[None], None)
        p = sampling.probs(out.logits[0], config)
        rows = jnp.zeros((gamma, vocab), jnp.float32).at[gamma - w:].set(p)
        return rows, out.cache
      return run
    if gamma == 1:
      return call(1)()
    # The width follows the mode, so a pre-verify call costs one token, not gamma.
    return lax.cond(state.mode == POST, call(gamma), call(1))

  def combine(state: _State, drafts, qs, p, dcache, tcache, u):
    """Verification and the mode machine (identical on every worker).

    Args:
      state: the round's starting state.
      drafts: [gamma] int32, this round's drafts; qs: [gamma, V] their distributions.
      p: [gamma, V] target rows from `target_work`.
      dcache, tcache: the caches after this round's calls.
      u: [gamma + 1] uniforms: acceptance tests, then the residual draw.
    """
    cur, pre = state.cur, state.mode == PRE
    # The chain to verify: [x_cur] in pre-verify; the gamma - 1 unverified prefix tokens
    # and x_cur in post-verify. Pre-verify's single row moves to the front.
    old = lax.dynamic_slice(state.tokens, (jnp.maximum(cur - gamma + 1, 0),), (gamma - 1,))
    chain = jnp.where(pre, drafts, jnp.concatenate([old, drafts[:1]]))
    chain_q = jnp.where(pre, qs, jnp.concatenate([state.q_prev, qs[:1]]))
    chain_p = jnp.where(pre, jnp.roll(p, 1, axis=0), p)
    width = jnp.where(pre, 1, gamma).astype(jnp.int32)
    # verify_* want a bonus row p[K]; there is no bonus token in PEARL (an all-accepted
    # chain keeps the new drafts instead), so any row will do and its sample is unused.
    chain_p = jnp.concatenate([chain_p, chain_p[-1:]])
    if config.greedy:
      n, nxt = verify.verify_greedy(chain_p, chain, width)
    else:
      n, nxt = verify.verify_chain_uniform(u, chain_p, chain_q, chain, width)
    rejected = n < width
    # First verified position of the chain; on rejection the residual sample goes to
    # base + n and everything after it is dropped. Otherwise the new drafts are appended.
    base = jnp.where(pre, cur, cur - gamma + 1)
    tokens = lax.dynamic_update_slice(state.tokens, drafts, (cur,))
    tokens = jnp.where(rejected, tokens.at[base + n].set(nxt), tokens)
    new_cur = jnp.where(rejected, base + n + 1, cur + gamma)
    r = state.r
    return _State(tokens=tokens, cur=new_cur.astype(jnp.int32),
                  mode=jnp.where(rejected, PRE, POST).astype(jnp.int32),
                  q_prev=qs[1:], tcache=tcache, dcache=dcache, r=r + 1,
                  mode_log=state.mode_log.at[r].set(state.mode),
                  width_log=state.width_log.at[r].set(width),
                  acc_log=state.acc_log.at[r].set(n))

  def verified(state: _State):
    return jnp.where(state.mode == POST, state.cur - gamma + 1, state.cur)

  def init_state(prompt, length, tcache, dcache):
    tokens = jnp.zeros((buf,), jnp.int32).at[:prompt_len].set(prompt.astype(jnp.int32))
    minus = jnp.full((max_new,), -1, jnp.int32)
    return _State(tokens=tokens, cur=length, mode=jnp.int32(PRE),
                  q_prev=jnp.zeros((gamma - 1, vocab), jnp.float32), tcache=tcache,
                  dcache=dcache, r=jnp.int32(0), mode_log=minus, width_log=minus,
                  acc_log=minus)

  def finish(state: _State, length):
    return PearlOutput(tokens=lax.dynamic_slice(state.tokens, (length,), (max_new,)),
                       num_generated=verified(state) - length, rounds=state.r,
                       mode=state.mode_log, width=state.width_log, accepted=state.acc_log)

  def prefill_draft(dparams, tokens, length):
    return prefill(draft, dparams, tokens, length)

  def prefill_target(tparams, tokens, length):
    return prefill(target, tparams, tokens, length)

  return _Pieces(prefill_draft, prefill_target, draft_work, target_work, combine,
                 init_state, verified, finish, buf)


def _uniforms(key, max_new: int, gamma: int):
  # Each round verifies at least one new token, so there are at most max_new rounds; per
  # round gamma draft draws, gamma acceptance tests and one residual draw.
  return jax.random.uniform(key, (max_new, 2 * gamma + 1))


def make_pearl_decoder(target: speculative.LM, draft: speculative.LM, *, prompt_len: int,
                       max_new: int, gamma: int,
                       config: sampling.SamplingConfig = sampling.DEFAULT,
                       draft_config: sampling.SamplingConfig | None = None):
  """Builds PEARL's jitted mode machine, both models run in program order (one device).

  Args:
    target, draft: the two models (`speculative.LM`, same vocabulary).
    prompt_len: P >= 1, the static length of the prompt buffer.
    max_new: tokens to generate.
    gamma: the window, >= 1: drafts per round and the post-verify target width.
    config: the target's sampling config; temperature 0 = greedy (token-identical to
      greedy autoregressive decoding).
    draft_config: the draft's sampling config (default `config`); any choice is exact.

  Returns:
    `decode(target_params, draft_params, prompt [P] int, prompt_len int32 scalar in 1..P,
    key) -> PearlOutput`, jitted.
  """
  draft_config = config if draft_config is None else draft_config
  _check(target, draft, prompt_len, max_new, gamma, config, draft_config)
  pc = _pieces(target, draft, prompt_len=prompt_len, max_new=max_new, gamma=gamma,
               config=config, draft_config=draft_config)

  def decode(target_params, draft_params, prompt, length, key):
    length = jnp.asarray(length, jnp.int32)
    prompt = jnp.asarray(prompt, jnp.int32)
    state = pc.init_state(prompt, length, pc.prefill_target(target_params, prompt, length),
                          pc.prefill_draft(draft_params, prompt, length))
    uniforms = _uniforms(key, max_new, gamma)
    end = length + max_new

    def body(state):
      u = uniforms[state.r]
      drafts, qs, dcache = pc.draft_work(draft_params, state, u[:gamma])
      p, tcache = pc.target_work(target_params, state)
      return pc.combine(state, drafts, qs, p, dcache, tcache, u[gamma:])

    state = lax.while_loop(lambda s: pc.verified(s) < end, body, state)
    return pc.finish(state, length)

  return jax.jit(decode)


def make_two_device_decoder(target: speculative.LM, draft: speculative.LM, *,
                            mesh: jax.sharding.Mesh, axis_name: str, prompt_len: int,
                            max_new: int, gamma: int,
                            config: sampling.SamplingConfig = sampling.DEFAULT,
                            draft_config: sampling.SamplingConfig | None = None):
  """PEARL as two workers under `jax.shard_map`: draft on device 0, target on device 1.

  Each round, `lax.switch(lax.axis_index(axis_name), ...)` runs the draft's window on
  device 0 and the target's call on device 1, `lax.all_gather` exchanges the drafts, q and
  p, and both devices run the same verification with the same uniforms, so their states
  stay equal. On CPU host devices this checks the communication logic only (the devices
  share the cores); the speed of the overlap is modelled by `overlapped_time`.

  Args:
    target, draft, prompt_len, max_new, gamma, config, draft_config: as in
      `make_pearl_decoder`.
    mesh: a mesh whose axis `axis_name` has size 2.
    axis_name: the worker axis.

  Returns:
    `decode(target_params, draft_params, prompt [P], prompt_len, key) -> PearlOutput` with
    a leading axis of 2 on every field (device 0's and device 1's view, equal by
    construction; both equal `make_pearl_decoder`'s output for the same key), jitted.
  """
  if axis_name not in mesh.shape or mesh.shape[axis_name] != 2:
    raise ValueError(f"axis_name {axis_name!r} must be an axis of size 2 of the mesh; got "
                     f"{dict(mesh.shape)}")
  draft_config = config if draft_config is None else draft_config
  _check(target, draft, prompt_len, max_new, gamma, config, draft_config)
  pc = _pieces(target, draft, prompt_len=prompt_len, max_new=max_new, gamma=gamma,
               config=config, draft_config=draft_config)

  def worker(target_params, draft_params, prompt, length, key):
    role = lax.axis_index(axis_name)  # 0: draft worker, 1: target worker
    # Both workers prefill both caches (a one-off), so the initial state is replicated;
    # from then on each updates only its own model's cache. The loop carry mixes in
    # gathered, device-varying values, so the initial state is marked varying.
    state = pc.init_state(prompt, length, pc.prefill_target(target_params, prompt, length),
                          pc.prefill_draft(draft_params, prompt, length))
    state = jax.tree.map(lambda x: lax.pcast(x, axis_name, to="varying"), state)
    uniforms = _uniforms(key, max_new, gamma)
    end = length + max_new

    def body(state):
      u = uniforms[state.r]

      def draft_role():
        drafts, qs, dcache = pc.draft_work(draft_params, state, u[:gamma])
        return drafts, qs, dcache, state.tcache

      def target_role():
        p, tcache = pc.target_work(target_params, state)
        nothing = lax.pcast(jnp.zeros((gamma,), jnp.int32), axis_name, to="varying")
        return nothing, p, state.dcache, tcache

      ids, rows, dcache, tcache = lax.switch(role, [draft_role, target_role])
      ids, rows = lax.all_gather(ids, axis_name), lax.all_gather(rows, axis_name)
      return pc.combine(state, ids[0], rows[0], rows[1], dcache, tcache, u[gamma:])

    state = lax.while_loop(lambda s: pc.verified(s) < end, body, state)
    return jax.tree.map(lambda x: x[None], pc.finish(state, length))

  fn = jax.shard_map(worker, mesh=mesh, in_specs=(P(), P(), P(), P(), P()),
                     out_specs=P(axis_name), axis_names={axis_name})

  def decode(target_params, draft_params, prompt, length, key):
    return fn(target_params, draft_params, jnp.asarray(prompt, jnp.int32),
              jnp.asarray(length, jnp.int32), key)

  return jax.jit(decode)


# ------------------------------------------------------------------------- virtual clock


class RoundLog(NamedTuple):
  """Per-round record of one PEARL decode, padding removed (numpy int64 arrays [R])."""
  mode: np.ndarray
  width: np.ndarray
  accepted: np.ndarray


def round_log(out: PearlOutput) -> RoundLog:
  """The rounds of one (unbatched) decode."""
  mode, width, acc = (np.asarray(a, np.int64) for a in (out.mode, out.width, out.accepted))
  keep = mode >= 0
  return RoundLog(mode[keep], width[keep], acc[keep])


def overlapped_time(costs: virtual_clock.CostModel, gamma: int, width) -> float:
  """Virtual time on two devices: sum over rounds of max(gamma t_d, t_t(w_r)).

  Args:
    costs: measured (or modelled) per-call costs.
    gamma: the window (draft calls per round).
    width: [R] target widths per round (`PearlOutput.width`, padding removed).
  """
  width = np.asarray(width, np.int64)
  return float(np.sum(np.maximum(gamma * costs.draft, costs.target_cost(width))))


def sequential_time(costs: virtual_clock.CostModel, gamma: int, width) -> float:
  """Virtual time of the one-device emulation: sum over rounds of gamma t_d + t_t(w_r)."""
  width = np.asarray(width, np.int64)
  return float(np.sum(gamma * costs.draft + costs.target_cost(width)))


def mean_accepted_tokens(accepted, width) -> tuple[int, int]:
  """(accepted drafts, runs) of one decode, for the paper's mean accepted tokens.

  A run is the rounds between two rejections (the draft length PEARL adapts); the last,
  unfinished run counts as one too. MAT = sum of accepted / sum of runs over decodes.

  Args:
    accepted: [R] accepted drafts per round; width: [R] verified tokens per round.
  """
  accepted, width = np.asarray(accepted, np.int64), np.asarray(width, np.int64)
  if accepted.size == 0:
    return 0, 0
  rejected = accepted < width
  return int(accepted.sum()), int(rejected.sum() + (0 if rejected[-1] else 1))
