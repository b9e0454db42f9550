"""Paper methods as pure functions over pytrees, one module per paper, grouped by family.

Nothing here imports `jaxrepro.launch`: every function can be used from another JAX
project without the launcher, configs or checkpoints.
"""
