"""MMD-DDM: fine-tune a diffusion model through its few-step sampler with an MMD loss (2023).

    python -m jaxrepro.launch.main --config=configs/mmd_ddm.py --workdir=runs/mmd_ddm

The demo pretrains a time-conditioned MLP eps-model (T = 1000, linear betas) on the 8-mode
ring (radius 1, sigma 0.05; `launch.data.mixtures2d`, stand-in S3) with the DDPM loss, then
fine-tunes every parameter through the 5-step DDIM sampler (eta 0) with the unbiased
Gaussian-kernel MMD^2 (bandwidths 0.05, 0.1, 0.2, 0.5) on raw 2-D points: batch 512, 400
steps of clip(0.5) + Adam. It compares, on 2048 held-out points and fixed noise, the base
model at T' = 5 and T' = 20 with the fine-tuned one at T' = 5 (MMD^2 and the share of
samples within 3 sigma of a mode). A couple of CPU minutes.
Expected (card 4.4): MMD^2 at T' = 5 falls by at least half, and the fine-tuned T' = 5
sampler beats the un-tuned T' = 20 one on both measures.
"""

import ml_collections
from ml_collections import config_dict

from jaxrepro.configs import common

CHOICES = {
    "data.name": ("ring", "grid"),
    "diffusion.schedule": ("linear", "cosine"),
    "mmd.kernel": ("gaussian", "polynomial", "rbf"),
    # Raw points only: the card's feature-space variants (Inception, CLIP, the S6 image
    # features) do not apply to the 2-D stand-in.
    "mmd.features": ("raw",),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant = common.parse_variant(arg)
  config = common.base_config("mmd_ddm", variant)
  # `num_modes`/`radius` shape the ring, `side`/`half_width` the grid; `std` both.
  config.data = ml_collections.ConfigDict(dict(
      name="ring", num_modes=8, radius=1.0, side=5, half_width=1.0, std=0.05))
  config.diffusion = ml_collections.ConfigDict(dict(num_timesteps=1000, schedule="linear"))
  config.model = ml_collections.ConfigDict(dict(hidden=128, num_layers=3, time_embed_dim=32))
  # DDPM pretraining of the base eps-model (Adam with cosine decay).
  config.pretrain = ml_collections.ConfigDict(dict(
      batch_size=512, learning_rate=2e-3,
      train=common.train_config(num_steps=4000, log_every=200, checkpoint_every=1000)))
  # MMD fine-tuning through the T'-step sampler (card section 6 field names).
  config.mmd = ml_collections.ConfigDict(dict(
      num_steps=5,  # T'
      eta=0.0,  # the official code's default
      kernel="gaussian",
      bandwidths="0.05,0.1,0.2,0.5",  # Gaussian kernel sigmas
      degree=3,  # polynomial kernel (KID)
      gamma=config_dict.placeholder(float),  # polynomial/rbf scale; None = 1 / d
      coef0=1.0,
      features="raw",
      batch_size=512,  # generated samples = data rows per step
      remat=True,  # jax.checkpoint each sampler step (the code's gradient checkpointing)
      # Split the batch over all devices (mesh axis "data") and all_gather the samples
      # before the kernel; the loss and gradient equal the single-device ones.
      data_parallel=False,
      train=common.train_config(num_steps=400, log_every=20, checkpoint_every=100),
      eval_every=100))
  config.optim = ml_collections.ConfigDict(dict(lr=1e-4, grad_clip=0.5))
  # Held-out evaluation: fixed noise and held-out data; MMD^2 always with the Gaussian
  # kernel of `bandwidths` so that every sampler is scored by the same yardstick.
  config.eval = ml_collections.ConfigDict(dict(
      num_samples=2048, baseline_steps=20, bandwidths="0.05,0.1,0.2,0.5", num_std=3.0,
      curve_samples=1024))

  if variant == "smoke":
    config.model.update(hidden=32, num_layers=2, time_embed_dim=16)
    config.pretrain.update(batch_size=128, train=common.train_config(
        num_steps=100, log_every=100, checkpoint_every=100))
    config.mmd.update(batch_size=64, eval_every=10, train=common.train_config(
        num_steps=10, log_every=10, checkpoint_every=10))
    config.eval.update(num_samples=256, curve_samples=128)
  elif variant == "paper":
    # The paper's recipe on the same stand-in at a larger scale (its own runs fine-tune a
    # 36M-parameter CIFAR-10 UNet with the KID kernel on InceptionV3 features, lr 5e-6).
    config.model.update(hidden=512, num_layers=4, time_embed_dim=64)
    config.pretrain.update(batch_size=4096, train=common.train_config(
        num_steps=50_000, log_every=500, checkpoint_every=5000))
    config.mmd.update(batch_size=2048, train=common.train_config(
        num_steps=2000, log_every=50, checkpoint_every=500), eval_every=500)
    config.eval.update(num_samples=16_384, curve_samples=4096)
  return config
