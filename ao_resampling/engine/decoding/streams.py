"""A random stream per sample: the draws of sample i of run r depend on (seed, r, i) and the step, nothing else.

A batch-wide ``torch.Generator`` hands out its numbers in the order the rows happen to sit in the batch, so an answer
changed with the batch size, the card, a refill and a resume. Here every random number is a pure function of where it
is used: ``uniforms(keys, steps, token_ids)`` hashes (the sample's 64-bit key, its step, the vocabulary id) into a
uniform in (0, 1). The categorical draw is an exponential race over those numbers (nucleus.py), so a token's chance
is its kept probability whichever rows, slots or steps its neighbours are at.

The hash is murmur3's 32-bit finaliser, chained over the key's two halves, the step and the token id, in int64
arithmetic that never overflows (each 32 x 32-bit product is split in 16-bit halves): the same bits on CPU and GPU.
``sample_key`` (host side) turns (seed, run id, sample index) into the key with blake2b.

Shape letters:
    B  rows (one sample each)
    C  token ids per row (a row's candidates, or the whole vocabulary)
    1  a broadcast dimension
"""

from __future__ import annotations

import hashlib

import torch

MASK32 = 0xFFFF_FFFF
_FMIX_1, _FMIX_2 = 0x85EB_CA6B, 0xC2B2_AE35
_STEP_MIX, _TOKEN_MIX = 0x9E37_79B1, 0x27D4_EB2F


def sample_key(seed: int, run_id: str, sample_index: int) -> int:
    """The 64-bit key of one sample's stream (a non-negative int64)."""
    digest = hashlib.blake2b(f"{seed}|{run_id}|{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32), without leaving int64's range."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX_1)
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX_2)
    return h ^ (h >> 16)


def stream_bits(keys_B: torch.Tensor, steps_B: torch.Tensor, token_ids_BC: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in [0, 2^32)) per (row, token id) at each row's step."""
    key_low_B1 = (keys_B & MASK32)[:, None]
    key_high_B1 = ((keys_B >> 32) & MASK32)[:, None]
    step_B1 = _mul32((steps_B[:, None] + 1) & MASK32, _STEP_MIX)
    h_B1 = _fmix32(key_low_B1 ^ step_B1)
    h_B1 = _fmix32(h_B1 ^ key_high_B1)
    h_BC = _fmix32(h_B1 ^ _mul32(token_ids_BC.long() & MASK32, _TOKEN_MIX))
    return _fmix32(h_BC ^ step_B1)


def uniforms(keys_B: torch.Tensor, steps_B: torch.Tensor, token_ids_BC: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float32, 24 bits each: the top bits of ``stream_bits``, centred in their interval."""
    bits_BC = stream_bits(keys_B, steps_B, token_ids_BC) >> 8
    return (bits_BC.float() + 0.5) * (1.0 / (1 << 24))


def exponentials(keys_B: torch.Tensor, steps_B: torch.Tensor, token_ids_BC: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise per (row, token id): the race the categorical draw runs (nucleus.py)."""
    return -torch.log(uniforms(keys_B, steps_B, token_ids_BC))
