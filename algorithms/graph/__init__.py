"""Graph learning and graph-based recommendation methods, one module per paper."""
