"""Meshes, collectives and communication accounting for `jax.shard_map` code.

Only `jax.shard_map`, `jax.make_mesh` and `NamedSharding` are used: no `pmap`, no
`jax.experimental.shard_map`.
"""
