"""USCD: uncertainty-aware selective contrastive decoding with a lame prompt (arXiv 2409.05923).

    python -m jaxrepro.launch.main --config=configs/uscd.py --workdir=runs/uscd

The demo trains a 3-layer d=64 causal transformer for 1800 steps on a synthetic few-shot
string-program task (hidden transforms of 3-5 letter strings over 6 letters; 70 % of
training problems are the identity copy, so the prompt without examples, the lame
prompt, predicts a copy), then decodes held-out
problems of the other transforms with greedy decoding, always-on contrastive decoding
(standard minus lame logits at every step) and USCD (the contrast only where the standard
prediction is uncertain). lambda and the threshold are chosen on a dev split and pass@1 is
reported on a disjoint test split. A few CPU minutes. Expected (card 5.4): USCD at least 3
points of pass@1 above greedy and above always-on contrastive decoding; the uncertainty
statistic flags wrong tokens with AUROC >= 0.7.
"""

import ml_collections

from jaxrepro.configs import common

CHOICES = {
    "uscd.uncertainty": ("std_topk", "entropy"),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant = common.parse_variant(arg)
  config = common.base_config("uscd", variant)
  # The string-program task (launch.data.string_programs.StringTask fields).
  config.task = ml_collections.ConfigDict(dict(
      alphabet_size=6, min_len=3, max_len=5, num_shots=3, default_fraction=0.7,
      heldout_fraction=0.1, seed=0))
  # Smaller than the card's 4L/d128 so that training fits a few shared CPU minutes.
  config.model = ml_collections.ConfigDict(dict(num_layers=3, d_model=64, num_heads=4))
  config.batch_size = 32
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=100, weight_decay=0.01))
  config.train = common.train_config(num_steps=1800, log_every=100, checkpoint_every=600)
  config.eval = ml_collections.ConfigDict(dict(
      # Dev problems choose lambda and the threshold; test problems (another seed, same
      # held-out strings pool) measure pass@1. train_problems: a held-in probe of the
      # training mixture's non-default transforms (is the model over- or under-fitted?).
      dev_problems=500, test_problems=1000, dev_seed=1, test_seed=2,
      monitor_problems=200))
  config.uscd = ml_collections.ConfigDict(dict(
      uncertainty="std_topk",
      topk=5,
      beta=0.1,  # plausibility cut-off: only tokens with p_s >= beta * max p_s
      # Grids searched on the dev split; always-on contrastive decoding gets the same
      # lambda grid (threshold 0), USCD every (lambda, threshold) pair.
      lams="0.5,1.0,2.0,4.0",
      thresholds="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8"))

  if variant == "smoke":
    config.model.update(num_layers=1, d_model=32, num_heads=2)
    config.batch_size = 16
    config.optimizer.warmup_steps = 10
    config.train = common.train_config(num_steps=40, log_every=20, checkpoint_every=20)
    # Equal sizes: the dev, test and monitor decodes share one compiled shape.
    config.eval.update(dev_problems=32, test_problems=32, monitor_problems=32)
    config.uscd.update(lams="1.0", thresholds="0.3,0.6")
  elif variant == "paper":
    # The card's model size (4 layers, d_model 128) and a longer run; the paper's own
    # models are 6-15B code LLMs on HumanEval/MBPP, which are not available offline.
    config.task.update(alphabet_size=8, min_len=4, max_len=6)
    config.model.update(num_layers=4, d_model=128, num_heads=4)
    config.batch_size = 128
    config.train = common.train_config(num_steps=10_000, log_every=500,
                                       checkpoint_every=2500)
    config.eval.update(dev_problems=2000, test_problems=5000)
  return config
