"""Federated and decentralized optimization: rounds over a client mesh axis."""
