"""EHGNN (Jo et al., NeurIPS 2021, arXiv:2106.15845) on generated QM9-like molecules.

    python -m jaxrepro.launch.main --config=configs/ehgnn.py --workdir=runs/ehgnn

Two tasks on the same generated molecules (`launch.data.graphs.random_molecules`, 3-9 heavy
atoms, bond orders 1-3), split 70/15/15 into train/val/test:

* Bond-type reconstruction: HyperCluster (DHT, hypergraph convs, GMPool over edges with
  `ceil(pool_ratio * mean #bonds)` seeds, unpool, hypergraph convs) against a node
  autoencoder with the same number of seeds and width (node GCNs, GMPool over nodes, bond
  types decoded from endpoint embeddings; its node features also count incident bond types).
* Graph classification, label "the molecule has a double or triple bond" (about half of
  the molecules): HyperDrop against the same GCN stack without the edge branch.

The demo trains every model on 2 seeds (2 and 3); a few CPU minutes. Reconstruction runs
3000 steps: a first run with 1500 steps on seeds 0-1 measured a gain of 0.048 (claim 0.05)
while HyperCluster's validation accuracy was still rising, so the budget was raised towards
the official 500 epochs and the demo moved to seeds 2-3, which played no part in that.

Measured (seeds 2-3): bond accuracy HyperCluster 0.986 vs node AE 0.947 (claim +0.05 fails
at +0.039; exact molecules 0.96 vs 0.80); classification HyperDrop 0.94 vs 0.59 (passes).
"""

import ml_collections

from jaxrepro.configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant = common.parse_variant(arg)
  # Seeds 2-3: the reconstruction budget was raised after a first run on seeds 0-1 (below).
  config = common.base_config("ehgnn", variant, seed=2)
  config.data = ml_collections.ConfigDict(dict(
      n_molecules=2000, min_heavy_atoms=3, max_heavy_atoms=9, ring_rate=0.7,
      multiple_bond_prob=0.25, val_fraction=0.15, test_fraction=0.15))
  config.num_seeds = 2  # seeds seed .. seed + num_seeds - 1 (data and initialisation)
  config.batch_size = 128
  config.reconstruction = ml_collections.ConfigDict(dict(
      hidden=32, num_convs=2, pool_ratio=0.3, cluster=True, learning_rate=1e-3,
      # About 270 epochs (the official ZINC run trains 500); a first run with 1500 steps
      # on seeds 0-1 stopped while HyperCluster's validation accuracy was still rising.
      num_steps=3000))
  config.classification = ml_collections.ConfigDict(dict(
      hidden=64, edge_hidden=64, num_convs=3, edge_ratio=0.75, dropout=0.2,
      learning_rate=1e-3, num_steps=1500))
  # train.num_steps is unused: each task has its own num_steps.
  config.train = common.train_config(num_steps=3000, log_every=100, checkpoint_every=500)

  if variant == "smoke":
    config.data.n_molecules = 240
    config.num_seeds = 1
    config.batch_size = 64
    # Fewer layers: the smoke run's time is mostly compilation.
    config.reconstruction.update(hidden=16, num_convs=1)
    config.reconstruction.num_steps = 100
    config.classification.update(hidden=16, edge_hidden=16, num_convs=2, num_steps=100)
    config.train = common.train_config(num_steps=100, log_every=50, checkpoint_every=100)
  elif variant == "paper":
    # The official ZINC / TU settings (scripts/*.sh): hidden 32 and edge ratio 0.15 for
    # HyperCluster, hidden 128 for HyperDrop, batch 128; molecules stay generated.
    config.data.update(n_molecules=12_000, max_heavy_atoms=12)
    config.num_seeds = 5
    config.reconstruction.update(pool_ratio=0.15, num_steps=40_000)
    config.classification.update(hidden=128, edge_hidden=128, num_steps=40_000)
    config.train = common.train_config(num_steps=40_000, log_every=500,
                                       checkpoint_every=5000)
  return config
