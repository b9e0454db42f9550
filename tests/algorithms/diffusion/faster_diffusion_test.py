"""Oracle tests of encoder propagation (spec card `diffusion.md` section 1.5).

Oracles, all on a small randomly initialised UNet (no trained weights):
* K = all steps gives the plain scanned DDIM sampler (`samplers.ddim` on the full UNet).
* A float64 NumPy loop written here from the paper's description (cache the encoder output
  at key steps, decode every step on the cache at its own timestep, inject noise, DDIM update
  in the x_{t'} = sqrt(a'/a) x + (sqrt(1 - a') - sqrt(a' (1 - a) / a)) eps form) matches the
  sampler step for step, in parallel and sequential mode, with and without guidance.
* Encoder and decoder evaluations counted at run time by a host callback equal |K| and N.
* At a key step the prediction equals the full UNet's; the guided cache holds exactly the
  unconditional and conditional encoder outputs; noise weight 0 is a no-op.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.diffusion import faster_diffusion as fd
from jaxrepro.algorithms.diffusion import samplers as smp
from jaxrepro.algorithms.diffusion import schedules as sch
from jaxrepro.models import unet

# One channel width keeps the number of distinct kernel shapes (each a compile) small.
CFG = unet.UNetConfig(image_size=8, channels=8, channel_mult=(1, 1), num_groups=4,
                      num_heads=2, time_embed_dim=16, context_dim=8, vocab_size=16,
                      max_prompt_len=4)
# Cheap CPU compiles: the properties checked here do not depend on XLA's optimisation level.
FAST = dict(compiler_options={"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True})
AC = sch.make_alphas_cumprod("linear", 1000)
N = 10
TS = sch.make_timesteps(N, 1000)  # 900, 800, ..., 0: steps 5..9 have t < 500
KEYS = (0, 1, 3, 7)  # spans of length 1, 2, 4, 3
ALPHA = 0.05  # noise injection weight, large enough to be visible in a 10-step run
B = 3


def jit(f, **kw):
  return jax.jit(f, **kw, **FAST)


@pytest.fixture(scope="module")
def model():
  graphdef, params = unet.random_unet(CFG, 0)
  enc, dec = fd.unet_fns(graphdef, params)
  # Scale the random network's output so that 10 DDIM steps stay O(1) (a random eps does not
  # match x, and x_0 = (x - sqrt(1 - a) eps) / sqrt(a) would otherwise grow).
  dec_small = lambda cache, t, c: 0.3 * dec(cache, t, c)
  x = jax.random.normal(jax.random.key(1), (B, 8, 8, 3))
  tokens = jax.random.randint(jax.random.key(2), (B, 4), 1, 16)
  return dict(graphdef=graphdef, params=params, enc=enc, dec=dec_small, x=x, tokens=tokens,
              enc_j=jit(enc), dec_j=jit(dec_small), raw_dec_j=jit(dec))


@pytest.fixture(scope="module")
def runs(model):
  """The sampler on KEYS with injection, in both modes, with trajectories."""
  enc, dec = model["enc"], model["dec"]
  out = {}
  for parallel in (True, False):
    out[parallel] = jit(lambda x, c, p=parallel: fd.sample(
        enc, dec, x, c, AC, TS, KEYS, parallel=p, noise_inject_alpha=ALPHA,
        return_trajectory=True))(model["x"], model["tokens"])
  return out


def _reference(enc_j, dec_j, x_init, cond, keys, alpha=0.0, tfrac=0.5, scale=None,
               null=None):
  """Float64 loop: key-step caches, per-step decoding, injection, DDIM in a different form."""
  a = np.asarray(AC, np.float64)[TS]
  a_next = np.append(a[1:], 1.0)
  z = np.asarray(x_init, np.float64)
  x, cache, states = z.copy(), None, []
  for i, t in enumerate(TS):
    tb = jnp.full((B,), t, jnp.int32)
    xin = jnp.asarray(x, jnp.float32)
    if scale is None:
      if i in keys:
        cache = enc_j(xin, tb, cond)
      eps = np.asarray(dec_j(cache, tb, cond), np.float64)
    else:
      # Guidance: each half has its own encoder output of the same key-step state.
      if i in keys:
        cache = (enc_j(xin, tb, null), enc_j(xin, tb, cond))
      u = np.asarray(dec_j(cache[0], tb, null), np.float64)
      c = np.asarray(dec_j(cache[1], tb, cond), np.float64)
      eps = u + scale * (c - u)
    if t < tfrac * 1000:
      x = x + alpha * z
    states.append(x)
    x = (np.sqrt(a_next[i] / a[i]) * x
         + (np.sqrt(1 - a_next[i]) - np.sqrt(a_next[i] * (1 - a[i]) / a[i])) * eps)
  return x, np.stack(states)


def _close(actual, expected, tol=2e-4):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


def test_key_step_rules():
  assert fd.key_steps("50ls", 50) == (0, 1, 2, 3, 5, 10, 15, 25, 35)
  assert fd.encoder_calls(fd.key_steps("50ls", 50), 50) == 9
  assert fd.decoder_calls(fd.key_steps("50ls", 50), 50) == 50
  assert fd.key_steps("pro", 50) == (0, 2, 5, 9, 14, 20, 27, 35, 44)
  assert fd.key_steps(4, 10) == (0, 4, 8)
  assert fd.key_steps("all", 5) == (0, 1, 2, 3, 4)
  keys100 = fd.key_steps("100ls", 100)
  # i < 10: 10 steps; i % 5 == 0 for 10 <= i <= 85: 16; i > 85: 14.
  assert len(keys100) == 10 + 16 + 14 and keys100[-1] == 99
  spans = fd.make_spans(fd.key_steps("50ls", 50), 50)
  assert [s.length for s in spans] == [1, 1, 1, 2, 5, 5, 10, 10, 15]
  assert fd.span_groups(spans) == ((0, 1, 3), (3, 2, 1), (5, 5, 2), (15, 10, 2), (35, 15, 1))


@pytest.mark.parametrize("bad", [(1, 3), (0, 3, 3), (0, 12), ()])
def test_bad_keys_raise(bad):
  with pytest.raises(ValueError, match="key_steps"):
    fd.make_spans(bad, N)


def test_bad_inputs_raise(model):
  with pytest.raises(ValueError, match="rule"):
    fd.key_steps("51ls", 50)
  with pytest.raises(ValueError, match=">= 1"):
    fd.key_steps(0, 50)
  with pytest.raises(ValueError, match="noise_inject_alpha"):
    fd.sample(model["enc"], model["dec"], model["x"], model["tokens"], AC, TS, KEYS,
              noise_inject_alpha=-1.0)
  with pytest.raises(ValueError, match="timesteps"):
    fd.sample(model["enc"], model["dec"], model["x"], model["tokens"], AC, TS[None], KEYS)
  with pytest.raises(ValueError, match="prediction_type"):
    fd.sample(model["enc"], model["dec"], model["x"], model["tokens"], AC, TS, KEYS,
              prediction_type="score")
  with pytest.raises(ValueError, match="features"):
    fd.adjacent_relative_change(jnp.ones((1, 2, 3)))


def test_all_keys_and_zero_noise_weight_is_plain_ddim(model):
  """K = every step with injection weight 0 at every step (tfrac = 1) is `samplers.ddim`
  (here with x_0 clipping on both sides, which the reference-loop tests leave off)."""
  enc, dec = model["enc"], model["dec"]
  ours = jit(lambda x, c: fd.sample(enc, dec, x, c, AC, TS, fd.key_steps("all", N),
                                    noise_inject_alpha=0.0, noise_inject_tfrac=1.0,
                                    clip_x0=1.0))
  plain = jit(lambda x, c: smp.ddim(fd.full_model_fn(enc, dec), x, c, AC, TS, clip_x0=1.0))
  _close(ours(model["x"], model["tokens"]), plain(model["x"], model["tokens"]), 1e-4)


@pytest.mark.parametrize("parallel", [True, False])
def test_matches_reference_loop_with_injection(model, runs, parallel):
  x, traj = runs[parallel]
  ref_x, ref_states = _reference(model["enc_j"], model["dec_j"], model["x"], model["tokens"],
                                 KEYS, alpha=ALPHA)
  _close(x, ref_x)
  _close(traj.x, ref_states)
  np.testing.assert_array_equal(np.asarray(traj.t), TS)
  # The injection mattered, so the comparison above could fail.
  no_inject, _ = _reference(model["enc_j"], model["dec_j"], model["x"], model["tokens"], KEYS)
  assert np.abs(no_inject - ref_x).max() > 1e-2


def test_parallel_equals_sequential(runs):
  """The span's decoders batched over timesteps (vmap) equal decoding them one by one."""
  for a, b in zip(jax.tree.leaves(runs[True]), jax.tree.leaves(runs[False])):
    _close(a, b, 1e-5)


def test_call_counts(model):
  """Run-time counts of encoder/decoder evaluations through host callbacks."""
  counts = {"enc": 0, "dec": 0}

  def bump(name):
    def f():
      counts[name] += 1
    return f

  def enc(x, t, c):
    jax.debug.callback(bump("enc"))
    return model["enc"](x, t, c)

  def dec(cache, t, c):
    jax.debug.callback(bump("dec"))
    return model["dec"](cache, t, c)

  out = jit(lambda x, c: fd.sample(enc, dec, x, c, AC, TS, KEYS, parallel=False))(
      model["x"], model["tokens"])
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert counts == {"enc": fd.encoder_calls(KEYS, N), "dec": fd.decoder_calls(KEYS, N)}
  assert counts == {"enc": len(KEYS), "dec": N}


def test_key_step_prediction_is_full_unet(model, runs):
  """At key steps eps is the full UNet's on the pre-injection state; elsewhere it is stale."""
  _, traj = runs[True]
  a = np.asarray(AC)[TS]
  inject = ALPHA * (TS < 500)
  seen = traj.x - jnp.asarray(inject, jnp.float32)[:, None, None, None, None] * model["x"]
  full = jax.vmap(fd.full_model_fn(model["enc"], model["dec"]), in_axes=(0, 0, None))
  eps_full = jit(full)(seen, jnp.broadcast_to(jnp.asarray(TS)[:, None], (N, B)),
                       model["tokens"])
  a_b = a[:, None, None, None, None]
  eps_ours = (traj.x - np.sqrt(a_b) * traj.x0) / np.sqrt(1 - a_b)
  gap = np.abs(np.asarray(eps_full) - np.asarray(eps_ours)).reshape(N, -1).max(axis=1)
  scale = float(np.abs(np.asarray(eps_full)).max())
  assert np.all(gap[list(KEYS)] < 2e-4 * scale), gap
  assert np.all(gap[[i for i in range(N) if i not in KEYS]] > 1e-3 * scale), gap


def test_guidance_shares_one_cache(model):
  enc, dec = model["enc"], model["dec"]
  null = jnp.zeros((1, 4), jnp.int32)
  genc, gdec = fd.guided(enc, dec, 3.0, null)
  x, tokens = model["x"], model["tokens"]
  tb = jnp.full((B,), 500, jnp.int32)
  # One program: the guided cache at t = 500 and a sparse-K guided run.
  (h, skips), sparse = jit(lambda x, c: (genc(x, tb, c), fd.sample(
      genc, gdec, x, c, AC, TS, KEYS)))(x, tokens)
  null_b = jnp.broadcast_to(null, tokens.shape)
  for half, c in ((slice(0, B), null_b), (slice(B, 2 * B), tokens)):
    h_ref, skips_ref = model["enc_j"](x, tb, c)
    _close(h[half], h_ref, 1e-5)
    for s, s_ref in zip(skips, skips_ref):
      _close(s[half], s_ref, 1e-5)
  # K = all: the guided pair is samplers.cfg around the full UNet.
  full_keys = fd.key_steps("all", N)
  ours = jit(lambda x, c: fd.sample(genc, gdec, x, c, AC, TS, full_keys))(x, tokens)
  plain = jit(lambda x, c: smp.ddim(smp.cfg(fd.full_model_fn(enc, dec), 3.0, null),
                                    x, c, AC, TS))(x, tokens)
  _close(ours, plain, 1e-4)
  # Sparse K: both halves come from the same key-step state (float64 reference).
  ref, _ = _reference(model["enc_j"], model["dec_j"], x, tokens, KEYS, scale=3.0,
                      null=null_b)
  _close(sparse, ref)


def test_decoder_features_end_with_decode(model):
  g, p = model["graphdef"], model["params"]
  t = jnp.full((B,), 300, jnp.int32)
  h, skips = model["enc_j"](model["x"], t, model["tokens"])
  feats = jit(fd.unet_decoder_features, static_argnums=0)(g, p, h, skips, t, model["tokens"])
  # (num_res_blocks + 1) stages per level, deepest level first, then the prediction.
  assert len(feats) == 2 * 2 + 1
  assert feats[0].shape == (B, 4, 4, 8) and feats[-2].shape == (B, 8, 8, 8)
  _close(feats[-1], model["raw_dec_j"]((h, skips), t, model["tokens"]), 1e-5)


def test_adjacent_relative_change():
  f = np.random.default_rng(0).normal(size=(5, 3, 4, 2))
  got = np.asarray(fd.adjacent_relative_change(jnp.asarray(f)))
  want = [[np.sqrt(((f[k, b] - f[k - 1, b]) ** 2).sum()) / np.sqrt((f[k, b] ** 2).sum())
           for b in range(3)] for k in range(1, 5)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
