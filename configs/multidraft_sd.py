"""Optimal multi-draft speculative decoding bounds vs recursive rejection sampling (ICLR 2025).

    python -m jaxrepro.launch.main --config=configs/multidraft_sd.py --workdir=runs/mdsd

For 1000 random (target p, draft q) next-token pairs per setting (independent Dirichlet(1)
draws; vocabularies 6 and 32, temperatures 1 and 0.5, n = 1..4 drafts) the demo computes
the optimal acceptance rate alpha* of drafting with replacement, without replacement and
with the greedy draft scheme (sorted-prefix search of the subset formula), and the exact
acceptance of recursive rejection sampling (RRS) with and without replacement. At V = 6 it
checks the fast formula against scipy's LP and against brute force over all subsets, and
runs every verifier by Monte Carlo to check that its output is p-distributed, and repeats
the bounds on 500 next-token distributions of the shipped SynthLang target and draft (V = 96).
About 2 CPU minutes. Expected (card 6.4): alpha*_norepl >= alpha*_iid >= RRS on every context, RRS
about 0.05 below alpha* on average at V = 6, n = 2.
"""

import ml_collections

from jaxrepro.configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant = common.parse_variant(arg)
  config = common.base_config("multidraft_sd", variant)
  config.contexts = ml_collections.ConfigDict(dict(
      num=1000,  # context pairs per vocabulary size
      vocab_sizes="6,32",
      dirichlet_concentration=1.0))
  config.mdsd = ml_collections.ConfigDict(dict(
      n_drafts="1,2,3,4",
      # The card's headline setting: the mean-gap claims are measured here.
      headline_vocab=6, headline_n=2,
      # Exact RRS without replacement enumerates V^n rejected-draft paths per context;
      # settings above this many paths are left out of it (reported as skipped).
      rrs_norepl_max_paths=1 << 20,
      # Contexts per vectorised chunk (bounds the memory of that enumeration).
      chunk_paths=1 << 22))
  config.sampling = ml_collections.ConfigDict(dict(
      # Both distributions are tempered: softmax(log p / T). T = 1 is the headline.
      temperatures="1.0,0.5"))
  # The scale layer: next-token distributions of the shipped SynthLang target and draft at
  # random positions of source sequences (card 6.4).
  config.models = ml_collections.ConfigDict(dict(
      num_contexts=500, length=64, n_drafts="2,3,4", temperatures="1.0,0.5"))
  config.validation = ml_collections.ConfigDict(dict(
      lp_contexts=40,  # headline contexts solved by scipy's LP (n <= 3, every scheme)
      mc_contexts=4,  # headline contexts whose verifiers are run by Monte Carlo
      mc_samples=200_000))

  if variant == "smoke":
    config.contexts.update(num=64, vocab_sizes="6,8")
    config.mdsd.update(n_drafts="1,2")
    config.validation.update(lp_contexts=4, mc_contexts=2, mc_samples=20_000)
    config.models.update(num_contexts=32, length=16, n_drafts="2", temperatures="1.0")
  elif variant == "paper":
    # The paper's point is that the bound is computable at vocabulary sizes in the
    # thousands; exact RRS without replacement is then out of reach and skipped.
    config.contexts.update(num=1000, vocab_sizes="6,64,1024,4096")
    config.mdsd.update(n_drafts="1,2,3,4,6")
    config.validation.update(lp_contexts=200, mc_contexts=16, mc_samples=1_000_000)
  return config
