"""Data: generated datasets, the random-access source protocol and a tfds adapter."""
