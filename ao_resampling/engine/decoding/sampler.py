"""Batched resampling: n answers for each of many queries, with the activation injected on the prompt pass.

The fast path (``BatchedSampler``) packs (query x sample) rows into batches under a row and KV-token budget and runs
its own decode loop over the model's forward:

- each query's prompt is prefilled *once*, with the injection hook attached, and its KV cache is repeated for its n
  samples (the n samples share one prompt, so prefilling it n times would be wasted work);
- decoding then runs without any hook (decode steps are untouched by construction) on a static KV cache when the
  whole sequence fits every sliding window, else on HF's dynamic cache; on the static cache, attention reads the
  grouped KV heads in place and only the filled part of the cache (attention.py), and each step is a CUDA graph
  replay (decode_step.py); batches of one shape share the cache and its graphs, and the norms' scales are computed
  once a stage (norms.py);
- top-p is exact but avoids sorting the whole 262k vocabulary: the top candidates are sorted, and only a row whose
  nucleus is not inside them falls back to a full sort (nucleus.py);
- batches are planned and seeded by pure functions (batching.py);
- rows that finished (EOS / <end_of_turn>) are dropped from the batch once they are half of it.

The reference paths benchmarks and tests compare it to are in reference.py.

Shape letters:
    Q  queries of a batch (one prompt each: the rows of its prefill)
    B  sample rows of a batch: each query's row repeated n times
    A  the rows still decoding (all of B until finished rows are dropped)
    R  the rows of a prefill batch being injected (queries here; one per sample in reference.py)
    L  the batch's padded prompt length
    T  new tokens, up to max_new_tokens
    S  positions of a KV cache
    V  the vocabulary
    K  the placeholder positions of an oracle prompt (where the vectors go)
    D  the model's hidden size (the head size in a KV cache)
    H  KV heads
    E  stop (eos) token ids
    N  rows picked out of a KV cache
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ao_resampling.engine.decoding.attention import decode_attention
from ao_resampling.engine.decoding.batching import batch_seed, plan_batches
from ao_resampling.engine.fused import FusedDecode
from ao_resampling.engine.decoding.decode_step import (PlainDecodeStep, StaticDecodeStep, cache_kwargs, index_rows,
                                              returned_cache)
from ao_resampling.engine.decoding.settings import Sampling, model_generation_config, resolve_sampling
from ao_resampling.engine.hooks import injecting, left_pad, position_ids_from_mask
from ao_resampling.engine.loading.adapters import adapter_disabled
from ao_resampling.engine.loading.models import model_device, stop_token_ids
from ao_resampling.engine.decoding.norms import cached_norm_scales
from ao_resampling.engine.decoding.nucleus import sample_next_tokens

SYNC_EVERY = 8  # decode steps between host checks for finished rows


@dataclass(frozen=True)
class DecodeParams:
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int = 0
    min_new_tokens: int = 0  # benchmarks force full-length answers (worst case) with min_new_tokens=max_new_tokens
    top_k: int | None = None  # None = the model's generation_config (else HF's default, 50); 0 = off
    eos_token_ids: tuple[int, ...] | None = None  # None = the model's generation_config (else the tokenizer's)


@dataclass(frozen=True)
class Query:
    """One prompt to be answered n times. ``vectors_KD`` None = no injection (the target-model baseline)."""

    key: str
    input_ids: tuple[int, ...]
    n: int
    vectors_KD: torch.Tensor | None = None
    positions_K: tuple[int, ...] = ()


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    text: str
    finish_reason: Literal["eos", "length"]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


# ---------------------------------------------------------------------------------------------------------------------
# The fast path


class BatchedSampler:
    def __init__(self, model: nn.Module, tokenizer, *, injection_layer: int, coefficient: float,
                 params: DecodeParams, max_rows: int = 512, max_tokens: int = 131_072, use_adapter: bool = True,
                 compact_finished: bool = True, static_cache: bool = True, merge_lora: bool = False,
                 attention: Literal["gqa", "hf"] = "gqa", cuda_graphs: bool = True, fused: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.injection_layer = injection_layer
        self.coefficient = coefficient
        self.params = params
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.use_adapter = use_adapter
        self.compact_finished = compact_finished
        self.static_cache = static_cache
        self.merge_lora = merge_lora
        self.attention = attention  # "hf": the model's own attention (SDPA, repeat_kv) on decode steps too
        self.cuda_graphs = cuda_graphs  # only with attention="gqa" on a static cache (decode_step.py)
        self.fused = fused  # fused elementwise kernels on decode steps (fused.py; inside HF's noise, noise.py)
        self._fused: FusedDecode | None = None  # built once a stage: its norm scales outlive the CUDA graphs
        self._kept: StaticDecodeStep | None = None  # the last batch's static cache + graphs, for the next batch
        self.sampling = effective_sampling(model, tokenizer, params)
        self.stop_ids = list(self.sampling.eos_token_ids)
        self.pad_id = tokenizer.pad_token_id

    def run(self, queries: Sequence[Query], *, on_batch: Callable[[dict[str, list[Sample]]], None] | None = None,
            progress: bool = True, desc: str = "AO samples") -> dict[str, list[Sample]]:
        """Sample every query; ``on_batch`` gets each finished batch (the caller journals it)."""
        # One prompt length for every batch: batches of equal row counts then share one static cache and its CUDA
        # graphs (captured in the first batch, replayed in all). The extra left padding is masked out.
        pad_to = max((len(q.input_ids) for q in queries), default=0)
        batches = plan_batches(queries, max_new_tokens=self.params.max_new_tokens, max_rows=self.max_rows,
                               max_tokens=self.max_tokens, pad_to=pad_to)
        out: dict[str, list[Sample]] = {}
        with tqdm(total=sum(q.n for q in queries), desc=desc, unit="sample", disable=not progress) as bar, \
                self.stage():
            for batch in batches:
                done = self.generate([queries[i] for i in batch], pad_to=pad_to)
                out.update(done)
                if on_batch:
                    on_batch(done)
                bar.update(sum(len(v) for v in done.values()))
        return out

    @contextlib.contextmanager
    def stage(self) -> Iterator[None]:
        """What every batch of a stage shares: the merged LoRA, the norms' cached scales, the fused kernels."""
        with self._merged(), cached_norm_scales(self.model):
            self._fused = FusedDecode(self.model) if self.fused else None
            try:
                yield
            finally:
                # Dropped inside the blocks, whatever happened: the CUDA graphs read the merged weights and the
                # cached norm scales, and the static cache is most of the GPU's memory.
                self._kept = self._fused = None

    @contextlib.contextmanager
    def _merged(self):
        """Fold the LoRA into the weights while decoding: no extra adapter kernels per layer per step.

        Unmerging subtracts the LoRA again, which in bf16 does not give the original weights back (off by up to a
        bf16 ulp); whatever runs next (a capture, the baseline) must see the base model. So the originals are kept
        (in host memory: on the GPU they would double the weights) and copied back after the unmerge.
        """
        if not (self.merge_lora and self.use_adapter and hasattr(self.model, "merge_adapter")):
            yield
            return
        originals = merged_weights_snapshot(self.model)
        self.model.merge_adapter()
        try:
            yield
        finally:
            self.model.unmerge_adapter()  # PEFT's bookkeeping: the layers are unmerged again
            restore_weights(originals)

    @torch.inference_mode()
    def generate(self, queries: Sequence[Query], pad_to: int | None = None) -> dict[str, list[Sample]]:
        p = self.params
        device = model_device(self.model)
        generator = torch.Generator(device=device).manual_seed(batch_seed(p.seed, [q.key for q in queries]))
        n_Q = torch.tensor([q.n for q in queries], device=device)
        with self._adapter():
            step, logits_BV, mask_BL = self._prefill(queries, n_Q, pad_to)
            with self._decoding(step):
                tokens_BT = self._decode(step, logits_BV, mask_BL, mask_BL.shape[1], generator)
            # Kept for the next batch of this shape: its cache is refilled in place, its graphs replay.
            self._kept = step if isinstance(step, StaticDecodeStep) else None
        return self._collect(queries, n_Q, tokens_BT.tolist())

    @torch.inference_mode()
    def teacher_forced(self, queries: Sequence[Query], tokens_QT: torch.Tensor) -> torch.Tensor:
        """Log-probs (float32) of this path's decode steps when row q is fed ``tokens_QT[q]`` instead of sampling:
        row t of the result is the distribution the step after ``tokens_QT[:, :t]`` draws from (t = 0: the prompt's
        last position). One row per query (``n`` ignored); the numerical-noise check of noise.py uses it."""
        if tokens_QT.shape[1] > self.params.max_new_tokens:
            raise ValueError(f"teacher_forced: {tokens_QT.shape[1]} tokens fed, but the cache holds max_new_tokens = "
                             f"{self.params.max_new_tokens}")
        device = model_device(self.model)
        n_Q = torch.ones(len(queries), dtype=torch.long, device=device)
        tokens_QT = tokens_QT.to(device)
        with self._adapter():
            step, logits_QV, mask_QL = self._prefill(queries, n_Q, None)
            L = mask_QL.shape[1]
            next_pos_Q = position_ids_from_mask(mask_QL)[:, -1] + 1
            logprobs = [logits_QV.float().log_softmax(-1)]
            with self._decoding(step):
                for i in range(tokens_QT.shape[1] - 1):
                    logits_QV = step(tokens_QT[:, i], next_pos_Q + i, length=L + i + 1).to(device)
                    logprobs.append(logits_QV.float().log_softmax(-1))
            self._kept = None
        return torch.stack(logprobs, dim=1)

    def _decode(self, step, logits_BV: torch.Tensor, mask_BL: torch.Tensor, L: int,
                generator: torch.Generator) -> torch.Tensor:
        """The decode loop from the prompt's last logits; returns every row's tokens, padded after a stop."""
        p = self.params
        device = logits_BV.device
        stop_E = torch.tensor(self.stop_ids, device=device)
        # Decode state lives on the device; the host looks at it only every SYNC_EVERY steps.
        B = logits_BV.shape[0]
        logits_AV = logits_BV  # every row is alive before the first step
        tokens_BT = torch.full((B, p.max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        alive_A = torch.arange(B, device=device)  # the original row of each row still in the batch
        next_pos_A = position_ids_from_mask(mask_BL)[:, -1] + 1
        for i in range(p.max_new_tokens):
            tokens_A = sample_next_tokens(self._suppress_stop(logits_AV, i), temperature=p.temperature,
                                          top_p=p.top_p, top_k=self.sampling.top_k, generator=generator)
            tokens_BT[alive_A, i] = torch.where(done_B[alive_A], self.pad_id, tokens_A)
            done_B[alive_A] |= torch.isin(tokens_A, stop_E)
            if i == p.max_new_tokens - 1:
                break
            if (i + 1) % SYNC_EVERY == 0:
                done_A = done_B[alive_A]
                n_live = alive_A.shape[0] - int(done_A.sum())
                if n_live == 0:
                    break
                rows = step.rows_to_keep(n_live) if self.compact_finished else alive_A.shape[0]
                if rows < alive_A.shape[0]:
                    # the live rows first, in order, then finished ones if the step keeps more rows than are live
                    keep_N = torch.argsort(done_A.int(), stable=True)[:rows]
                    step.select(keep_N)
                    alive_A, tokens_A, next_pos_A = (t[keep_N] for t in (alive_A, tokens_A, next_pos_A))
            # the head may sit on another GPU under device_map="auto"
            logits_AV = step(tokens_A, next_pos_A, length=L + i + 1).to(device)
            next_pos_A = next_pos_A + 1
        return tokens_BT

    # -- pieces of generate ------------------------------------------------------------------------------------------

    def _prefill(self, queries: Sequence[Query], n_Q: torch.Tensor, pad_to: int | None):
        """The prompt pass (injection on), its KV repeated for each query's samples, and the decode step over it.
        Returns (step, the last prompt position's logits for every sample row, the rows' prompt mask)."""
        device = n_Q.device
        ids_QL, mask_QL = left_pad([q.input_ids for q in queries], self.pad_id, device, length=pad_to)
        L = ids_QL.shape[1]
        with injection_for_rows(self.model, queries, L, device, self.injection_layer, self.coefficient):
            out = self.model(input_ids=ids_QL, attention_mask=mask_QL, position_ids=position_ids_from_mask(mask_QL),
                             use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, self._prefill_cache()))
        cache, static = self._expand(returned_cache(out), n_Q, L + self.params.max_new_tokens)
        logits_BV = out.logits[:, -1].to(device).repeat_interleave(n_Q, dim=0)
        mask_BL = mask_QL.bool().repeat_interleave(n_Q, dim=0)
        if self.attention == "gqa" and static:
            return self._static_step(cache, mask_BL, L + self.params.max_new_tokens), logits_BV, mask_BL
        return PlainDecodeStep(self.model, cache, mask_BL), logits_BV, mask_BL

    @contextlib.contextmanager
    def _decoding(self, step):
        """The decode steps' swaps: ``gqa_attention`` on the static cache, the fused kernels when asked for."""
        with contextlib.ExitStack() as stack:
            if isinstance(step, StaticDecodeStep):
                stack.enter_context(decode_attention(self.model))
            if self._fused is not None:
                stack.enter_context(self._fused.active())
            yield

    def _adapter(self):
        return contextlib.nullcontext() if self.use_adapter else adapter_disabled(self.model)

    def _static_step(self, cache, mask_BL: torch.Tensor, total_len: int) -> StaticDecodeStep:
        if self._kept is not None and self._kept.cache is cache:
            self._kept.restart(mask_BL)
            return self._kept
        return StaticDecodeStep(self.model, cache, mask_BL, total_len, graphs=self.cuda_graphs)

    def _prefill_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self._text_config())

    def _text_config(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.config.get_text_config(decoder=True)

    def _expand(self, prefill_cache, n_Q: torch.Tensor, total_len: int):
        """Repeat each query's prompt KV for its n samples, into a static cache when every window holds it all.
        Returns the cache and whether it is the static one."""
        config = self._text_config()
        window = getattr(config, "sliding_window", None) or total_len
        rows_B = torch.arange(n_Q.shape[0], device=n_Q.device).repeat_interleave(n_Q)  # query of each sample row
        if self._kept is not None and (self._kept.total_len, self._kept.batch_rows) != (total_len, len(rows_B)):
            self._kept = None  # another shape: free the last batch's cache before a new one takes its place
        if not self.static_cache or total_len > window:
            for layer in prefill_cache.layers:
                layer.keys, layer.values = index_rows(layer.keys, rows_B), index_rows(layer.values, rows_B)
            return prefill_cache, False
        from transformers import StaticCache

        if self._kept is not None:
            self._kept.first_rows(self._kept.batch_rows)  # all rows again, if the last batch dropped some
            static = self._kept.cache  # the last batch's, same shape: refilled in place, so its graphs stay valid
            static.reset()
        else:
            static = StaticCache(config=config, max_cache_len=total_len)
        L = prefill_cache.get_seq_length()
        for i, layer in enumerate(prefill_cache.layers):
            keys, values = index_rows(layer.keys, rows_B), index_rows(layer.values, rows_B)
            static.update(keys, values, i, cache_kwargs={"cache_position": torch.arange(L, device=keys.device)})
        return static, True

    def _suppress_stop(self, logits_AV: torch.Tensor, step: int) -> torch.Tensor:
        if step >= self.params.min_new_tokens:
            return logits_AV
        logits_AV = logits_AV.clone()
        logits_AV[:, self.stop_ids] = float("-inf")
        return logits_AV

    def _collect(self, queries: Sequence[Query], n_Q: torch.Tensor, tokens: list[list[int]]
                 ) -> dict[str, list[Sample]]:
        out: dict[str, list[Sample]] = {}
        row = 0
        for q, n in zip(queries, n_Q.tolist()):
            out[q.key] = [make_sample(self.tokenizer, until_stop(tokens[r], self.stop_ids, self.pad_id),
                                      self.stop_ids) for r in range(row, row + n)]
            row += n
        return out


def effective_sampling(model: nn.Module, tokenizer, params: DecodeParams) -> Sampling:
    """The decoding HF generate would do for this model and these settings (decoding/settings.py); eos ids given
    in ``params`` win over the model's."""
    sampling = resolve_sampling(model_generation_config(model), temperature=params.temperature, top_p=params.top_p,
                                top_k=params.top_k, fallback_eos=stop_token_ids(tokenizer))
    if params.eos_token_ids is None:
        return sampling
    return Sampling(sampling.temperature, sampling.top_k, sampling.top_p, tuple(params.eos_token_ids))


def injection_for_rows(model: nn.Module, row_queries: Sequence[Query], L: int, device: torch.device, layer: int,
                       coefficient: float):
    """The prefill injection for a left-padded batch whose row b answers ``row_queries[b]`` (padded length L)."""
    if all(q.vectors_KD is None for q in row_queries):
        return contextlib.nullcontext()
    if any(q.vectors_KD is None for q in row_queries):
        raise ValueError("a batch mixes queries with and without injected vectors")
    vectors_RKD = torch.stack([q.vectors_KD for q in row_queries]).to(device)
    positions_RK = torch.tensor([[L - len(q.input_ids) + p for p in q.positions_K] for q in row_queries],
                                device=device)  # each row's positions shifted by its left padding
    return injecting(model, layer, vectors_RKD, positions_RK, coefficient)


def merged_weights_snapshot(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, copy on the host) for every base weight a LoRA merge writes into.

    The copies of a GPU model go, with asynchronous copies, into one page-locked host buffer (``page_locked_host``):
    27B, ~51 GB each way at PCIe speed, seconds. Locking the pages is what costs: one ``pin_memory=True`` tensor per
    weight took 38.9 s a stage on the H200 (torch's pinned allocator rounds each up to a power of two, ~60 GB, and
    faults the pages in on one thread); pageable copies ~40 s. The buffer is kept for the next stage of the process.
    """
    params = [param for module in model.modules() if hasattr(module, "base_layer") and hasattr(module, "merge")
              for param in module.base_layer.parameters(recurse=False)]
    cuda = any(param.is_cuda for param in params)
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += -(-param.numel() * param.element_size() // 64) * 64  # 64-byte aligned slots
    buffer = page_locked_host(total) if cuda else torch.empty(total, dtype=torch.uint8)
    pairs = []
    for param, offset in zip(params, offsets):
        nbytes = param.numel() * param.element_size()
        host = buffer[offset:offset + nbytes].view(param.dtype).view(param.shape)
        pairs.append((param, host.copy_(param.detach(), non_blocking=param.is_cuda)))
    _wait_for_copies(params)
    return pairs


_HOST_BUFFER: list[torch.Tensor] = []  # the last page-locked buffer, reused while it is large enough


def page_locked_host(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked host memory (uint8), reused from one call to the next.

    Ordinary memory whose pages every core faults in at once (``zero_`` runs on all threads), then registered with
    CUDA in one call: half the time of ``pin_memory=True`` on the H200 (4 GiB: 1.04 s against 1.94 s), and exactly
    the size asked for. Falls back to torch's pinned allocator if the registration is refused. One holder at a time:
    the next call hands out the same memory (a stage's snapshot is restored before the next stage takes its own).
    """
    if _HOST_BUFFER and _HOST_BUFFER[0].numel() >= nbytes:
        return _HOST_BUFFER[0]
    _HOST_BUFFER.clear()  # the smaller one is freed (and unregistered) first
    host = torch.empty(nbytes, dtype=torch.uint8)
    host.zero_()
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(host.data_ptr(), nbytes, 0)) != 0:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    else:
        weakref.finalize(host, cudart.cudaHostUnregister, host.data_ptr())
    _HOST_BUFFER.append(host)
    return host


def restore_weights(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write the snapshot back, bit for bit."""
    with torch.no_grad():
        for param, host in pairs:
            param.copy_(host, non_blocking=param.is_cuda)
    _wait_for_copies([param for param, _ in pairs])


def _wait_for_copies(params: list[torch.Tensor]) -> None:
    for device in {p.device for p in params if p.is_cuda}:
        torch.cuda.synchronize(device)


def make_sample(tokenizer, token_ids: list[int], stop_ids: Sequence[int]) -> Sample:
    """The text as decoded, not stripped: the reference keeps leading spaces and newlines, and its judge saw them."""
    ended = bool(token_ids) and token_ids[-1] in stop_ids
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return Sample(token_ids=list(token_ids), text=text, finish_reason="eos" if ended else "length")


def until_stop(generated: list[int], stop_ids: Sequence[int], pad_id: int) -> list[int]:
    """A row's tokens up to and including its first stop token. ``generate`` pads only rows that already stopped,
    so the padding always follows a stop token; a row that never stopped keeps every token, trailing <pad> too."""
    tokens = []
    for tok in generated:
        tokens.append(tok)
        if tok in stop_ids:
            break
    return tokens
