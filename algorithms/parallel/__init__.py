"""Parallelism schemes for attention and training: sequence, tensor and pipeline parallel."""
