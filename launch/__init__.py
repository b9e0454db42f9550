"""The launch boundary: absl launcher, train loop, checkpoints, writers, data sources,
reproduction and benchmark runners, and the per-paper experiment drivers.

Library code (`algorithms`, `models`, `sharding`) never imports this package.
"""
