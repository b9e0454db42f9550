"""SpecDec++: an acceptance head on the draft and a threshold stopping rule (arXiv 2405.19715).

    python -m jaxrepro.launch.main --config=configs/specdecpp.py --workdir=runs/specdecpp

The demo uses the shipped SynthLang target (4 layers) and draft (1 layer) unchanged and
trains only the acceptance head (3 residual blocks on the draft's 32-d final state, class
weight 6, mixing ratio 0.15) on 2000 target-generated responses with exact soft labels.
It then decodes 200 dev and 200 test prompts (64 new tokens, temperature 1) with constant
candidate lengths K = 1..8, SpecDec++ (threshold h on dev, bounds [2, 20]), the
oracle-threshold rule (true acceptances) and HF's heuristic, and states throughput in
virtual time (tokens per virtual second from counted calls and per-call costs measured on
this machine by `algorithms.decoding.virtual_clock`) in two cost regimes: the CPU's own
(verifying w tokens costs r(w) > 1 target calls) and the memory-bound GPU-like one
(r = 1), next to the measured wall-clock ratio at batch 1. Best K and h are chosen on dev
and compared on test. Expected (card 1.4): SpecDec++ >= 1.03x the best constant K, oracle
>= SpecDec++, head KL <= 0.8x the constant predictor's.
"""

import ml_collections

from jaxrepro.configs import common

CHOICES = {
    "model.target": ("synthlang_target",),
    "model.draft": ("synthlang_draft",),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant = common.parse_variant(arg)
  config = common.base_config("specdecpp", variant)
  # The shipped pair (launch.pretrained_lms); it is not retrained here.
  config.model = ml_collections.ConfigDict(dict(
      target="synthlang_target", draft="synthlang_draft"))
  config.head = ml_collections.ConfigDict(dict(
      num_layers=3,
      # The official code repeats one block object, so its blocks share weights.
      shared_blocks=True,
      weight_mismatch=6.0,
      mixing_ratio=0.15))
  config.data = ml_collections.ConfigDict(dict(
      prompt_len=16,
      train_sequences=2000,  # target-generated responses for the head
      val_sequences=256,  # held-out responses for the head's KL
      response_len=64,
      decode_chunk=500))  # prompts per vmapped decoding call
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_fraction=0.03, weight_decay=0.0, batch_size=32))
  config.train = common.train_config(num_steps=600, log_every=50, checkpoint_every=300)
  config.spec = ml_collections.ConfigDict(dict(
      temperature=1.0,
      max_new=64,
      dev_prompts=200,
      test_prompts=200,
      constant_ks="1,2,3,4,5,6,7,8",
      thresholds="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
      k_min=2,
      k_max=20,
      heuristic_k_init=5,
      oracle=True))  # also run the oracle-threshold rule (true acceptances)
  config.clock = ml_collections.ConfigDict(dict(
      context=64,  # committed tokens in the cache while timing one call
      calls=32,  # calls chained inside one jitted loop per timing
      repeats=7,  # timings per width; the median is kept
      wall_prompts=8,  # prompts decoded one by one for the wall-clock ratio (0: skip)
      wall_rounds=3))
  config.lossless = ml_collections.ConfigDict(dict(
      vocab_size=4, order=3, new_tokens=3, samples=200_000))

  if variant == "smoke":
    # One chunk shape for train and val, so each data function compiles once.
    config.data.update(train_sequences=64, val_sequences=32, response_len=16,
                       decode_chunk=32)
    config.optimizer.update(batch_size=16)
    config.train = common.train_config(num_steps=20, log_every=10, checkpoint_every=10)
    config.spec.update(max_new=16, dev_prompts=8, test_prompts=8, constant_ks="1,3",
                       thresholds="0.3,0.7", k_max=3, oracle=True)
    config.clock.update(context=16, calls=4, repeats=2, wall_prompts=0)
    config.lossless.update(samples=4096)
  elif variant == "paper":
    # The paper's protocol sizes (Alpaca: 40k train responses, 2k test prompts, 512-token
    # generations) on the SynthLang pair; its Llama-2 7B/70B pair is not available offline.
    config.data.update(train_sequences=40_000, val_sequences=2000, response_len=128)
    config.train = common.train_config(num_steps=4000, log_every=100, checkpoint_every=1000)
    config.spec.update(max_new=128, dev_prompts=1000, test_prompts=2000)
  return config
