"""Diffusion methods: shared processes and samplers, one module per idea or paper."""
