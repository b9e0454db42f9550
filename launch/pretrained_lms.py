"""Pretrained SynthLang target and draft transformers for the decoding papers (card 0.1).

The speculative / parallel decoding papers (SpecDec++, arXiv:2405.19715; Superposed
Decoding; PEARL; Hidden Transfer, arXiv:2404.12022) need a related pair of language models
whose distributions are peaky and well trained, so that acceptance rates are real. This
module trains, on the shared SynthLang source (`launch.data.synthlang`, seed
`LANGUAGE_SEED`), a 4-layer target and a 1-layer draft with next-token cross-entropy,

  L(theta) = - mean_{b, t >= 1} log p_theta(x_t | x_<t),

measures them against the source's exact likelihoods (model NLL per token vs the exact
conditional NLL of the same held-out tokens: their difference is the per-token KL from the
source), and measures the acceptance rate of the pair at temperature 1,

  alpha = E_{x ~ target} [ sum_v min(p(v | x_<t), q(v | x_<t)) ],

on continuations the target samples itself (the tokens speculative decoding verifies). The
parameters ship with `checkpointing.save_tree` in `launch/assets/synthlang_{target,draft}/`,
with the command, seeds, configs and measurements as metadata; `load(name)` returns them.

Reproduce (about 10 CPU minutes on 2 cores):

  python -m jaxrepro.launch.pretrained_lms --out=launch/assets

Differences from the card: d_model 96 (not 128) for the target so both checkpoints stay
small (~2 MB together) and CPU decoding is fast; the first token of a sequence is never
predicted (no BOS), so NLLs cover positions 1..L-1.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrepro.algorithms.decoding import sampling, speculative
from jaxrepro.launch import checkpointing, train_loop
from jaxrepro.launch.data import synthlang
from jaxrepro.models import transformer as tfm

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
NAMES = ("synthlang_target", "synthlang_draft")
LANGUAGE_SEED = 0
# Sequences of MAX_LEN + 1 tokens: inputs x[:-1] use every position 0..MAX_LEN-1.
MAX_LEN = 192

CONFIGS = {
    "synthlang_target": tfm.TransformerConfig(
        vocab_size=96, max_len=MAX_LEN, num_layers=4, d_model=96, num_heads=4, d_ff=384,
        causal=True),
    "synthlang_draft": tfm.TransformerConfig(
        vocab_size=96, max_len=MAX_LEN, num_layers=1, d_model=32, num_heads=2, d_ff=128,
        causal=True),
}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """How one model is trained (AdamW, linear warm-up then cosine decay)."""
  num_steps: int
  batch_size: int = 32
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  weight_decay: float = 0.01
  seed: int = 0


TRAIN = {
    "synthlang_target": TrainSettings(num_steps=1500, seed=1),
    "synthlang_draft": TrainSettings(num_steps=1000, seed=2),
}


class PretrainedLM(NamedTuple):
  """A loaded model: its config, the NNX graphdef and the parameters (`nnx.State`)."""
  config: tfm.TransformerConfig
  graphdef: Any
  params: Any


def language() -> synthlang.SynthLang:
  """The SynthLang source the shipped models were trained on (default settings, seed 0)."""
  return synthlang.make_synthlang(LANGUAGE_SEED)


# ------------------------------------------------------------------------------- training


def next_token_nll(graphdef, params, x: jax.Array) -> jax.Array:
  """-log p(x_t | x_<t) for t = 1..L-1: x [B, L] int -> [B, L-1] float32."""
  logits = tfm.apply_transformer(graphdef, params, x[:, :-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)[..., 0]


def train(name: str, lang: synthlang.SynthLang, workdir: str,
          settings: TrainSettings | None = None) -> tuple[Any, Any, dict]:
  """Trains model `name` with `train_loop.fit`; returns (graphdef, params, held-out eval)."""
  cfg, s = CONFIGS[name], settings or TRAIN[name]
  graphdef, params = tfm.init_transformer(cfg, jax.random.key(s.seed))
  schedule = optax.warmup_cosine_decay_schedule(0.0, s.learning_rate, s.warmup_steps,
                                                s.num_steps)
  tx = optax.adamw(schedule, weight_decay=s.weight_decay)

  def loss_fn(p, x, key):
    del key
    return jnp.mean(next_token_nll(graphdef, p, x)), {}

  step = train_loop.make_train_step(
      loss_fn, tx, batch_fn=lambda key: lang.sample_jax(key, s.batch_size, cfg.max_len + 1))
  held_out = lang.sample(10_000 + s.seed, 256, cfg.max_len + 1)
  true_nll = -lang.token_log_probs(held_out)[:, 1:]
  eval_nll = jax.jit(lambda p: jnp.mean(next_token_nll(graphdef, p, jnp.asarray(held_out))))

  def eval_fn(p):
    nll = float(eval_nll(p))
    return {"nll": nll, "kl_from_source": nll - float(true_nll.mean())}

  state = train_loop.TrainState.create(params, tx, jax.random.key(s.seed + 100))
  result = train_loop.fit(state, step, num_steps=s.num_steps, log_every=50, workdir=workdir,
                          checkpoint_every=s.num_steps, eval_fn=eval_fn, eval_every=250,
                          description=name, resume="never")
  evals = eval_fn(result.state.params)
  evals["train_seconds"] = result.seconds
  return graphdef, result.state.params, evals


# ----------------------------------------------------------------------------- evaluation


def evaluate_nll(lang: synthlang.SynthLang, model: PretrainedLM, *, num: int = 256,
                 seed: int = 123) -> dict:
  """NLL per token on fresh source samples vs the exact conditional NLL of the same tokens.

  Returns:
    {"nll": model NLL, "source_nll": exact NLL (an unbiased estimate of the entropy rate
    at this length), "kl": their difference, "kl_stderr": its standard error}, nats/token.
  """
  x = lang.sample(seed, num, model.config.max_len + 1)
  true = -lang.token_log_probs(x)[:, 1:]
  nll = np.asarray(jax.jit(next_token_nll, static_argnums=0)(model.graphdef, model.params,
                                                             jnp.asarray(x)), np.float64)
  gap = (nll - true).mean(-1)
  return {"nll": float(nll.mean()), "source_nll": float(true.mean()),
          "kl": float(gap.mean()), "kl_stderr": float(gap.std(ddof=1) / np.sqrt(num))}


def acceptance_rate(lang: synthlang.SynthLang, target: PretrainedLM, draft: PretrainedLM, *,
                    num: int = 64, prompt_len: int = 16, new_tokens: int = 128,
                    temperature: float = 1.0, seed: int = 7) -> dict:
  """alpha = mean sum_v min(p, q) over continuations sampled from the target.

  Prompts are source prefixes; the target continues them (jitted AR decoder); both models
  are then scored teacher-forced on the generated positions.

  Returns:
    {"alpha": mean, "alpha_stderr": standard error over sequences, "alpha_by_position":
    [new_tokens] means (for plots)}.
  """
  config = sampling.SamplingConfig(temperature=temperature)
  prompts = jnp.asarray(lang.sample(seed, num, prompt_len))
  target_lm = speculative.transformer_lm(target.config, target.graphdef)
  decode = speculative.make_autoregressive_decoder(target_lm, prompt_len=prompt_len,
                                                   max_new=new_tokens, config=config)
  keys = jax.random.split(jax.random.key(seed), num)
  out = jax.vmap(decode, in_axes=(None, 0, None, 0))(target.params, prompts, prompt_len, keys)
  seqs = jnp.concatenate([prompts, out.tokens], axis=1)

  @jax.jit
  def alpha_fn(tp, dp, seqs):
    p = sampling.probs(tfm.apply_transformer(target.graphdef, tp, seqs[:, :-1]), config)
    q = sampling.probs(tfm.apply_transformer(draft.graphdef, dp, seqs[:, :-1]), config)
    return jnp.sum(jnp.minimum(p, q), -1)[:, prompt_len - 1:]

  a = np.asarray(alpha_fn(target.params, draft.params, seqs), np.float64)
  per_seq = a.mean(-1)
  return {"alpha": float(a.mean()), "alpha_stderr": float(per_seq.std(ddof=1) / np.sqrt(num)),
          "alpha_by_position": a.mean(0).tolist()}


# ------------------------------------------------------------------------------ shipping


def _path(name: str, root: str | None = None) -> str:
  if name not in CONFIGS:
    raise ValueError(f"unknown pretrained model {name!r}; choose one of {NAMES}")
  return os.path.join(root or ASSETS, name)


def metadata(name: str, root: str | None = None) -> dict:
  """The metadata shipped with model `name` (command, seeds, config, measurements)."""
  return checkpointing.tree_metadata(_path(name, root))


def load(name: str, root: str | None = None) -> PretrainedLM:
  """Loads a shipped model: `PretrainedLM(config, graphdef, params)`.

  Args:
    name: "synthlang_target" or "synthlang_draft".
    root: the assets directory (default: the package's `launch/assets`).
  """
  path = _path(name, root)
  meta = metadata(name, root)
  cfg = tfm.TransformerConfig(**meta["config"])
  graphdef, like = tfm.init_transformer(cfg, jax.random.key(0))
  params = checkpointing.load_tree(path, like)
  return PretrainedLM(cfg, graphdef, params)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=ASSETS, help="assets directory to write")
  parser.add_argument("--workdir", default=None,
                      help="training workdir (default: a fresh folder under /tmp)")
  parser.add_argument("--target_steps", type=int, default=TRAIN["synthlang_target"].num_steps)
  parser.add_argument("--draft_steps", type=int, default=TRAIN["synthlang_draft"].num_steps)
  args = parser.parse_args(argv)
  command = "python -m jaxrepro.launch.pretrained_lms " + " ".join(
      sys.argv[1:] if argv is None else argv)
  workdir = args.workdir or os.path.join("/tmp", f"pretrained_lms_{int(time.time())}")
  lang = language()
  models, train_evals = {}, {}
  for name, steps in (("synthlang_target", args.target_steps),
                      ("synthlang_draft", args.draft_steps)):
    settings = dataclasses.replace(TRAIN[name], num_steps=steps)
    graphdef, params, evals = train(name, lang, os.path.join(workdir, name), settings)
    models[name] = PretrainedLM(CONFIGS[name], graphdef, params)
    train_evals[name] = (settings, evals)
  entropy, entropy_se = lang.entropy_per_token(MAX_LEN + 1, num_samples=2000, seed=321)
  alpha = acceptance_rate(lang, models["synthlang_target"], models["synthlang_draft"])
  for name, model in models.items():
    settings, evals = train_evals[name]
    nll = evaluate_nll(lang, model)
    meta = {
        "command": command,
        "language": {"module": "jaxrepro.launch.data.synthlang", "seed": LANGUAGE_SEED,
                     "settings": "make_synthlang defaults",
                     "entropy_per_token": entropy, "entropy_stderr": entropy_se},
        "config": dataclasses.asdict(model.config),
        "train": dataclasses.asdict(settings) | {"seconds": evals["train_seconds"]},
        "num_params": int(sum(x.size for x in jax.tree.leaves(model.params))),
        "eval": nll,
        "alpha_vs_target_t1": {k: v for k, v in alpha.items() if k != "alpha_by_position"},
        "jax_version": jax.__version__,
    }
    path = _path(name, args.out)
    if os.path.exists(path):
      shutil.rmtree(path)
    checkpointing.save_tree(path, model.params, metadata=meta)
    print(name, json.dumps({k: meta[k] for k in ("num_params", "eval", "train")}))
  print("alpha", json.dumps({k: v for k, v in alpha.items() if k != "alpha_by_position"}))
  print("entropy per token", entropy, "+-", entropy_se)


if __name__ == "__main__":
  main()
