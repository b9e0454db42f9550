"""Decoding: samplers, speculative verification, table LMs and jitted decode loops."""
