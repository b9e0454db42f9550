"""`get_config(arg)` files, one per paper (`configs/<short name>.py`).

Config files import only ml_collections and `jaxrepro.configs.common`.
"""
