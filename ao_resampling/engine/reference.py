"""The reference paths the sampler is measured and tested against: plain Hugging Face ``generate``.

``sample_sequential`` is one ``generate`` call per sample, as the original single-script experiment did (and the
pipeline's ``sampler = "sequential"``); ``sample_hf_batched`` puts every sample of every query in one padded
``generate`` batch. Both inject the same way as the sampler (``injection_for_rows``), decode with the same merged
``Decoding`` (every setting passed to ``generate`` explicitly) and cut answers the same way. Their random numbers are
torch's global generator's, seeded per call: a reference is compared with the sampler token for token only when
greedy, and in distribution otherwise.

Shape letters:
    B  rows of the ``generate`` batch: one per sample of each query
    L  the batch's padded prompt length
    T  new tokens, up to max_new_tokens
    K  the placeholder positions of an oracle prompt (``Query.vectors_KD``, ``Query.positions_K``)
    D  the model's hidden size
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ao_resampling.config import Decoding
from ao_resampling.engine.decoding.sampler import Query, Sample, injection_for_rows, make_sample, until_stop
from ao_resampling.engine.decoding.settings import generate_kwargs
from ao_resampling.engine.hooks import left_pad
from ao_resampling.engine.loading.models import model_device


@torch.inference_mode()
def sample_hf_batched(model: nn.Module, tokenizer, queries: Sequence[Query], *, injection_layer: int,
                      coefficient: float, decoding: Decoding) -> dict[str, list[Sample]]:
    """All rows of all queries through one ``generate`` call (each sample its own padded row)."""
    device = model_device(model)
    stop_ids = list(decoding.eos_token_ids)
    rows = [(q, i) for q in queries for i in range(q.n)]
    ids_BL, mask_BL = left_pad([q.input_ids for q, _ in rows], tokenizer.pad_token_id, device)
    L = ids_BL.shape[1]
    torch.manual_seed(zlib.crc32(f"{decoding.seed}|{'|'.join(q.key for q in queries)}".encode()))
    with injection_for_rows(model, [q for q, _ in rows], L, device, injection_layer, coefficient):
        generated_BT = model.generate(input_ids=ids_BL, attention_mask=mask_BL, pad_token_id=tokenizer.pad_token_id,
                                      **generate_kwargs(decoding))[:, L:]
    out: dict[str, list[Sample]] = {q.key: [] for q in queries}
    for (q, _), generated in zip(rows, generated_BT.tolist()):
        out[q.key].append(make_sample(tokenizer, until_stop(generated, stop_ids, tokenizer.pad_token_id), stop_ids))
    return out


def sample_sequential(model: nn.Module, tokenizer, queries: Sequence[Query], *, injection_layer: int,
                      coefficient: float, decoding: Decoding, progress: bool = False) -> dict[str, list[Sample]]:
    """One ``generate`` call per sample, as the original experiment did: the slow baseline for benchmarks."""
    out: dict[str, list[Sample]] = {}
    bar = tqdm(total=sum(q.n for q in queries), desc="AO samples (sequential)", disable=not progress)
    for q in queries:
        out[q.key] = []
        for i in range(q.n):
            single = Query(key=f"{q.key}#{i}", input_ids=q.input_ids, n=1, vectors_KD=q.vectors_KD,
                           positions_K=q.positions_K)
            out[q.key] += sample_hf_batched(model, tokenizer, [single], injection_layer=injection_layer,
                                            coefficient=coefficient, decoding=decoding)[single.key]
            bar.update(1)
    bar.close()
    return out
