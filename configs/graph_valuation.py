"""Task-agnostic graph valuation by blind message passing (Falahati & Mohammadi Amiri, 2024).

    python -m jaxrepro.launch.main --config=configs/graph_valuation.py --workdir=runs/gv

The demo values sellers' graphs for a buyer's SBM (500 nodes, 4 blocks, p_in 0.05, p_out
0.005, Gaussian class features). Structure: six sellers with p_in from 0.05 down to 0.01,
scored by the structural disparity of blind message passing (W1 between blind signals),
on three seeds, plus random relabellings of every seller. Features: sellers whose feature
noise variance is scaled by c = 1..4, scored by relevance and diversity. No training;
about a minute on a CPU.
"""

import ml_collections

from jaxrepro.configs import common

CHOICES = {
    "valuation.matching": ("degree", "eigenvector"),
    "valuation.distance": ("exact", "sliced"),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant = common.parse_variant(arg)
  config = common.base_config("graph_valuation", variant)
  config.buyer = ml_collections.ConfigDict(dict(
      n_nodes=500, n_classes=4, p_in=0.05, p_out=0.005, n_features=8,
      # Class means are fixed by their own seed: a seller "from the buyer's distribution"
      # shares them and draws its own graph and noise.
      mean_scale=1.0, noise_std=1.0, means_seed=1234))
  config.sellers = ml_collections.ConfigDict(dict(
      p_in="0.05,0.042,0.034,0.026,0.018,0.01",
      noise_variance_scales="1,2,3,4",
      seeds="0,1,2",
      relabel_trials=5))
  config.valuation = ml_collections.ConfigDict(dict(
      k_hops=2, signal_dim=16, matching="degree", distance="exact", n_projections=64))

  if variant == "smoke":
    config.buyer.update(n_nodes=120, p_in=0.15, p_out=0.02)
    config.sellers.update(p_in="0.15,0.1,0.05", noise_variance_scales="1,2", seeds="0",
                          relabel_trials=2)
  elif variant == "paper":
    # The paper values real graphs (citation and co-purchase networks); those need
    # downloads, so the paper variant runs the same study on Cora-sized graphs.
    config.buyer.update(n_nodes=2708, n_classes=7, p_in=0.01, p_out=0.0005, n_features=32)
    config.sellers.update(p_in="0.01,0.008,0.006,0.004,0.002", seeds="0,1,2,3,4",
                          relabel_trials=10)
    config.valuation.update(distance="sliced", n_projections=256, signal_dim=32)
  return config
