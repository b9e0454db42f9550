"""QuEST: low-bit diffusion quantization via efficient selective fine-tuning (arXiv:2402.03666).

    python -m jaxrepro.launch.main --config=configs/quest.py --workdir=runs/quest

The demo quantizes the shipped ToyT2I UNet (`launch.toy_t2i`, used unconditionally with the
empty prompt) at W4A4. Calibration (Q-Diffusion's): every state of `calib.per_step` float
DDIM trajectories of `sampler.num_steps` steps. Models: the PTQ baseline (MSE steps,
weights per output channel, activations per tensor, first/last layer at 8 bits), the
time-wise steps alone, QuEST (time-wise steps + stage 1 + stage 2) and two ablations
(per-tensor steps with both stages; time-wise steps with stage 2 only). Each is scored by
its eps-MSE to the float model along float DDIM trajectories (teacher forced) and, for the
baseline and QuEST, by the judge's KID of its own samples (same initial noise as the float
model's). About 3 CPU minutes.
Expected (card 12.4): eps-MSE >= 30% below the baseline; KID better; < 10% of the values
fine-tuned; both ablations worse than QuEST.

Learning rates: the paper's Adam steps are lr_w = 1e-5 (weights, both stages), 1e-5 for the
time-embedding steps (stage 1) and 1e-4 for the other steps (stage 2), over thousands of
updates. The demo runs about 50 times fewer updates and, fixed before any measurement,
uses 10x the paper's rates; the `paper` variant uses the paper's.
"""

import ml_collections

from jaxrepro.algorithms.diffusion import quest
from jaxrepro.configs import common

CHOICES = {
    "model.source": ("toy_t2i", "random"),
    "q.method": ("mse", "minmax"),
    "q.stage1_layers": tuple(quest.STAGE1_LAYERS),
    "q.stage2_layers": tuple(quest.STAGE2_LAYERS),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant = common.parse_variant(arg)
  config = common.base_config("quest", variant)
  # "toy_t2i": the shipped trained stand-in; "random": a random-weight UNet of the given
  # width (no checkpoint: for smoke runs). `root`: assets directory ("" = the package's).
  config.model = ml_collections.ConfigDict(dict(source="toy_t2i", root="", channels=32,
                                                channel_mult="1,2"))
  # DDIM (eta 0) on the "leading" grid with x0 clipped to [-1, 1]; its S timesteps are the
  # time-wise quantizers' index (one activation step per timestep).
  config.sampler = ml_collections.ConfigDict(dict(num_steps=20, clip_x0=1.0))
  config.q = ml_collections.ConfigDict(dict(
      w_bits=4, a_bits=4,
      head_stem_bits=8,  # first/last layer weights and inputs (Q-Diffusion/PTQ4DM)
      method="mse", num_candidates=80, step=0.01,  # MSE shrink grid 1, 0.99, ..., 0.21
      stage1_layers="time_mlp",  # time_proj (LDM emb_layers) + the global time MLP
      stage2_layers="ldm_cond",  # ff.net, to_q, self-attention to_k/to_v (LDM ImageNet code)
      lr_w=1e-4, lr_delta_stage1=1e-4, lr_delta=1e-3,
      stage1_epochs=2, stage2_epochs=3))  # one epoch = one update per calibration timestep
  # Calibration: per_step trajectories (seed) x num_steps states; one batch per timestep.
  config.calib = ml_collections.ConfigDict(dict(per_step=8, seed=100))
  # num_samples generated images per model for KID (baseline, QuEST, float); the eps-MSE
  # uses the first eps_samples trajectories.
  config.eval = ml_collections.ConfigDict(dict(
      num_samples=256, eps_samples=64, batch_size=64, seed=200, reference_seed=300))
  config.train = ml_collections.ConfigDict(dict(log_every=1))  # flat steps (see train_loop)

  if variant == "smoke":
    config.model.update(source="random", channels=16, channel_mult="1")
    config.sampler.num_steps = 3
    config.q.update(num_candidates=8, step=0.1, stage1_epochs=1, stage2_epochs=1)
    config.calib.update(per_step=4)
    config.eval.update(num_samples=8, eps_samples=8, batch_size=8)
  elif variant == "paper":
    # The paper's LDM settings on the stand-in: 20 calibration timesteps x 256 samples,
    # 200 stage-1 epochs, 20 stage-2 epochs, the paper's learning rates.
    config.calib.update(per_step=256)
    config.q.update(lr_w=1e-5, lr_delta_stage1=1e-5, lr_delta=1e-4, stage1_epochs=200,
                    stage2_epochs=20)
    config.eval.update(num_samples=10_000, eps_samples=1000, batch_size=500)
  return config
