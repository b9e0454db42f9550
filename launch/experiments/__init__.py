"""One experiment driver per paper, found by the launcher as `experiments.<short name>`.

See `jaxrepro.launch.experiment` for the protocol a driver implements.
"""
