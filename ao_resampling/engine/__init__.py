"""Torch machinery: loading models, hooks, the batched sampler and its kernels, sharding. No files, no stages."""
