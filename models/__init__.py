"""Flax NNX modules and jraph building blocks shared by several papers.

Modules are written tree-mode safe (no shared sub-modules, no structural mutation inside
transforms) and are used through a functional core: `nnx.split` once, then pure jitted
functions that `nnx.merge` inside.
"""
