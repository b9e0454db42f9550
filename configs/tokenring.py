"""TokenRing (Wang et al., 2024, arXiv:2412.20501): bidirectional sequence parallelism.

    python -m jaxrepro.launch.main --config=configs/tokenring.py --workdir=runs/tokenring

The demo shards one attention call (batch 1, 512 tokens, 4 heads of width 16, fp32) over 8
simulated CPU devices, checks TokenRing and the ring-attention baseline against plain
full-sequence attention (forward, log-sum-exp and gradients; causal zig-zag and full),
measures per-device memory of the compiled forward for 1, 2, 4 and 8 devices, and counts
the bytes each device sends. Expected: errors near 1e-6, memory at 8 devices below 1/10
of one device, TokenRing's busiest link direction about half of ring attention's.
"""

import ml_collections

from jaxrepro.configs import common

CHOICES = {"dtype": ("float32", "bfloat16", "float16")}


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant = common.parse_variant(arg)
  config = common.base_config("tokenring", variant)
  # Simulated CPU devices the launcher asks for (no effect on GPU/TPU hosts).
  config.cpu_devices = 8
  config.sp_size = 8  # devices on the sequence-parallel ring
  config.batch = 1
  config.seq_len = 512  # a multiple of 2 * sp_size (zig-zag chunks)
  config.num_heads = 4
  config.num_kv_heads = 4
  config.head_dim = 16
  config.dtype = "float32"
  # Key/value heads of the grouped-query variant used in the bytes comparison (GQA makes
  # K/V, which ring attention sends, smaller than Q, which TokenRing sends).
  config.gqa_kv_heads = 1
  # Memory is measured by compiling (not running) the forward at this total length.
  config.memory_seq_len = 2048
  config.memory_device_counts = "1,2,4,8"

  if variant == "smoke":
    config.cpu_devices = 4
    config.sp_size = 4
    config.seq_len = 64
    config.num_heads = 2
    config.num_kv_heads = 2
    config.memory_seq_len = 256
    config.memory_device_counts = "1,4"
  elif variant == "paper":
    # The README profile of the official code: LLaMA-2-7B attention shape, 24k tokens,
    # GQA with 4 query heads per key/value head, half precision, 4 GPUs.
    config.cpu_devices = 1
    config.sp_size = 4
    config.seq_len = 24000
    config.num_heads = 32
    config.num_kv_heads = 8
    config.head_dim = 128
    config.dtype = "bfloat16"
    config.gqa_kv_heads = 8
    config.memory_seq_len = 24000
    config.memory_device_counts = "1,2,4"
  return config
