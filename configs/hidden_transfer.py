"""Hidden Transfer vs Medusa-1 heads, lossless greedy tree decoding (arXiv 2404.12022).

    python -m jaxrepro.launch.main --config=configs/hidden_transfer.py --workdir=runs/ht

The demo freezes the shipped SynthLang target (4 layers, d = 96) and trains, with the same
source sequences, cut points, steps and optimizer, (a) hidden-transfer maps at layer 2 for
k = 3 future offsets and (b) Medusa-1 heads for the same offsets on the final hidden
state. It measures both predictors' top-1/top-5 accuracy per offset on held-out text,
builds each method's Medusa-style sparse tree (16 nodes) from its own held-out accuracies,
and decodes held-out prompts greedily with one target pass per round (tree attention),
checking token-for-token equality with greedy autoregressive decoding. Reported: accepted
tokens per target pass, target passes per token, and the virtual-clock speed-up over
autoregressive decoding with this CPU's measured call costs and in the memory-bound
regime. About 3-5 CPU minutes. Expected (card 4.4): hidden transfer's accepted length is
at least Medusa's, and its top-1 accuracy at offsets +2/+3 is higher by >= 2 points.
"""

import ml_collections

from jaxrepro.configs import common

CHOICES = {
    "model.target": ("synthlang_target",),
    "transfer.init": ("identity", "zeros", "random"),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant = common.parse_variant(arg)
  config = common.base_config("hidden_transfer", variant)
  # The shipped frozen target (launch.pretrained_lms); only the drafters are trained.
  config.model = ml_collections.ConfigDict(dict(target="synthlang_target"))
  config.transfer = ml_collections.ConfigDict(dict(
      layer=2,  # t: pseudo states enter blocks t..L-1 (the card: the middle layer)
      num_future=3,  # k: offsets +2..+k+1 (the next token comes from the target itself)
      init="identity"))
  # Medusa-1 heads for the same k offsets (one residual SiLU block each, LM-head init).
  config.data = ml_collections.ConfigDict(dict(
      seq_len=40,  # training sequences from the SynthLang source
      cuts_per_seq=12,  # cut points n per sequence; each supervises k future tokens
      min_context=4,  # the earliest cut (drafts need some context)
      val_sequences=256))  # held-out sequences for the accuracy table and the trees
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=20, batch_size=32))
  config.train = common.train_config(num_steps=400, log_every=50, checkpoint_every=200)
  config.tree = ml_collections.ConfigDict(dict(
      num_candidates=15,  # tree nodes besides the root: 16 nodes per verification pass
      max_rank=4))  # ranks per offset the sparse-tree search may use
  config.decode = ml_collections.ConfigDict(dict(
      prompt_len=32, max_new=64, num_prompts=32))
  config.clock = ml_collections.ConfigDict(dict(
      context=64,  # committed tokens in the cache while timing one call
      calls=32,  # calls chained inside one jitted loop per timing
      repeats=5,  # timings per call kind; the minimum is kept
      wallclock_prompts=4))  # batch-1 decodes timed for the real wall-clock ratio

  if variant == "smoke":
    config.data.update(seq_len=24, cuts_per_seq=4, val_sequences=16)
    config.optimizer.update(batch_size=8)
    config.train = common.train_config(num_steps=10, log_every=10, checkpoint_every=10)
    config.tree.update(num_candidates=4, max_rank=2)
    config.decode.update(prompt_len=8, max_new=8, num_prompts=2)
    config.clock.update(context=8, calls=1, repeats=1, wallclock_prompts=0)
  elif variant == "paper":
    # The paper trains on a large corpus for LLaMA-scale models; here the same protocol at
    # a larger step budget, longer sequences and the card's 6-layer/t = 3 shape is not
    # available (the shipped target has 4 layers).
    config.data.update(seq_len=128, cuts_per_seq=32, val_sequences=2000)
    config.train = common.train_config(num_steps=5000, log_every=100, checkpoint_every=1000)
    config.tree.update(num_candidates=63, max_rank=8)
    config.decode.update(prompt_len=32, max_new=128, num_prompts=500)
  return config
