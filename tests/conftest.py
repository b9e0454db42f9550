"""Test-session set-up: 8 simulated CPU devices, absl flags pre-parsed, fast CPU compiles.

This file runs before any test module imports JAX, which is the only point where the
device count can still be chosen. A test that needs another device count or float64
runs in a subprocess (see `tests/helpers.py`).
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Matplotlib must never try to open a window in a test.
os.environ.setdefault("MPLBACKEND", "Agg")

from absl import flags  # noqa: E402

# Libraries that read absl FLAGS lazily would otherwise try to parse pytest's argv.
flags.FLAGS.mark_as_parsed()
