"""Decoding: the sampler, its scheduler, and the pieces of one decode step."""
