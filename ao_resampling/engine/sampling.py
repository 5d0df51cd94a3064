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
  nucleus is not inside them falls back to a full sort (of the model's bf16 logits: half the bytes of float32);
- rows that finished (EOS / <end_of_turn>) are dropped from the batch once they are half of it.

The reference paths benchmarks and tests compare it to are in reference.py.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ao_resampling.engine.attention import decode_attention
from ao_resampling.engine.decode_step import PlainDecodeStep, StaticDecodeStep, cache_kwargs, returned_cache
from ao_resampling.engine.generation_settings import Sampling, model_generation_config, resolve_sampling
from ao_resampling.engine.hooks import injecting, left_pad, position_ids_from_mask
from ao_resampling.engine.adapters import adapter_disabled
from ao_resampling.engine.models import model_device, stop_token_ids
from ao_resampling.engine.norms import cached_norm_scales

TOP_P_CANDIDATES = 256
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
# Pure pieces


def plan_batches(queries: Sequence[Query], *, max_new_tokens: int, max_rows: int, max_tokens: int,
                 pad_to: int | None = None) -> list[list[int]]:
    """Group query indices into batches: rows (sum of n) <= max_rows, rows x padded length <= max_tokens.

    Queries are taken longest prompt first, so a batch's members have similar lengths and little padding. The rows
    are spread evenly: as few batches as filling each to max_rows gives, but of similar size, rather than full ones
    and a small last one that would run all its decode steps at a fraction of the GPU. ``pad_to``: every batch is
    padded to this prompt length (the token budget counts it). A single query over budget gets a batch of its own.
    """
    order = sorted(range(len(queries)), key=lambda i: (-len(queries[i].input_ids), queries[i].key))

    def pack(row_limit: int) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        rows, longest = 0, pad_to or 0
        for i in order:
            q = queries[i]
            new_rows, new_longest = rows + q.n, max(longest, len(q.input_ids))
            if current and (new_rows > row_limit or new_rows * (new_longest + max_new_tokens) > max_tokens):
                batches.append(current)
                current, new_rows, new_longest = [], q.n, max(pad_to or 0, len(q.input_ids))
            current.append(i)
            rows, longest = new_rows, new_longest
        return batches + [current] if current else batches

    full = pack(max_rows)
    if len(full) < 2:
        return full
    # The smallest row limit that still needs no more batches (bisection; the count only grows as the limit falls).
    lo, hi = min(-(-sum(q.n for q in queries) // len(full)), max_rows), max_rows
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(pack(mid)) <= len(full) else (mid + 1, hi)
    balanced = pack(lo)
    return balanced if len(balanced) <= len(full) else full


def top_p_keep_mask(sorted_probs_BK: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest prefix of descending probabilities whose mass reaches top_p (HF's TopPLogitsWarper rule:
    a token is dropped iff the mass strictly above it already reaches top_p; the top token is always kept)."""
    mass_above_BK = sorted_probs_BK.cumsum(-1) - sorted_probs_BK
    keep_BK = mass_above_BK < top_p
    keep_BK[:, 0] = True
    return keep_BK


def sample_next_tokens(logits_BV: torch.Tensor, *, temperature: float, top_p: float,
                       generator: torch.Generator | None, top_k: int = 0,
                       candidates: int = TOP_P_CANDIDATES) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else HF's warpers in HF's order (temperature, top-k, top-p) and
    a categorical draw; ``top_k`` 0 = off.

    Without top-k, rows whose nucleus lies inside the top ``candidates`` tokens (a trained model, nearly always) are
    decided there; other rows (flat distributions, e.g. random weights) sort their whole row once
    (``nucleus_threshold``). With top-k, the nucleus is a k-token problem (top-p renormalises over the top k, as HF's
    TopPLogitsWarper does after TopKLogitsWarper): a top-(k+1), no sort of the vocabulary; only a row whose k-th
    logit ties the (k+1)-th (HF keeps every tied token) takes the full-row path. Either way the kept set is HF's,
    except that tokens tied *exactly* at the top-p boundary are all kept (HF keeps the ones its sort put first).
    """
    if temperature == 0:
        return logits_BV.argmax(-1)
    top_k = top_k if 0 < top_k < logits_BV.shape[-1] else 0  # HF: a top_k >= the vocabulary keeps every token
    top_ids_BK, weights_BK, short_B, scaled_BV = _candidate_weights(logits_BV, temperature, top_p, top_k, candidates)
    tokens_B = top_ids_BK.gather(-1, _draw(weights_BK, generator)).squeeze(-1)
    if short_B.any():
        rows = short_B.nonzero().squeeze(-1)
        tokens_B[rows] = _draw(_full_row_weights(logits_BV[rows], scaled_BV[rows], temperature, top_p, top_k),
                               generator).squeeze(-1)
    return tokens_B


def sampling_weights(logits_BV: torch.Tensor, *, temperature: float, top_p: float, top_k: int = 0,
                     candidates: int = TOP_P_CANDIDATES) -> torch.Tensor:
    """The normalised distribution ``sample_next_tokens`` draws from, over the whole vocabulary (for checks: the
    same pieces, scattered into a dense row)."""
    top_k = top_k if 0 < top_k < logits_BV.shape[-1] else 0
    top_ids_BK, weights_BK, short_B, scaled_BV = _candidate_weights(logits_BV, temperature, top_p, top_k, candidates)
    weights_BV = torch.zeros_like(scaled_BV).scatter(-1, top_ids_BK, weights_BK)
    rows = short_B.nonzero().squeeze(-1)
    if rows.numel():
        weights_BV[rows] = _full_row_weights(logits_BV[rows], scaled_BV[rows], temperature, top_p, top_k)
    return weights_BV / weights_BV.sum(-1, keepdim=True)


def _candidate_weights(logits_BV: torch.Tensor, temperature: float, top_p: float, top_k: int, candidates: int):
    """The top candidates' ids and unnormalised kept probabilities, which rows need the full-row path, the scaled
    logits. Returns (ids_BK, weights_BK, short_B, scaled_BV)."""
    scaled_BV = logits_BV.float() / temperature  # HF: float32 logits, then TemperatureLogitsWarper
    k = top_k + 1 if top_k else min(candidates, logits_BV.shape[-1])
    top_scaled_BK, top_ids_BK = scaled_BV.topk(k, dim=-1)  # sorted, descending
    if top_k:
        # TopKLogitsWarper keeps every token >= the k-th value (ties included); top-p then sees them renormalised.
        in_k_BK = top_scaled_BK >= top_scaled_BK[:, top_k - 1:top_k]
        log_z_B1 = top_scaled_BK.masked_fill(~in_k_BK, float("-inf")).logsumexp(-1, keepdim=True)
        top_probs_BK = (top_scaled_BK - log_z_B1).exp() * in_k_BK
        short_B = in_k_BK[:, -1]  # the (k+1)-th ties the k-th: the tie may reach past the candidates
    else:
        top_probs_BK = (top_scaled_BK - scaled_BV.logsumexp(-1, keepdim=True)).exp()
        short_B = top_probs_BK.sum(-1) < top_p  # the nucleus reaches past the candidates
    return top_ids_BK, top_probs_BK * top_p_keep_mask(top_probs_BK, top_p), short_B, scaled_BV


def _full_row_weights(logits_RV: torch.Tensor, scaled_RV: torch.Tensor, temperature: float, top_p: float,
                      top_k: int) -> torch.Tensor:
    """Kept probabilities over whole rows (one sort each): rows whose nucleus or top-k tie leaves the candidates."""
    if top_k:
        kth_R1 = scaled_RV.topk(top_k, dim=-1).values[:, -1:]
        logits_RV = logits_RV.masked_fill(scaled_RV < kth_R1, float("-inf"))
        scaled_RV = scaled_RV.masked_fill(scaled_RV < kth_R1, float("-inf"))
    log_z_R1 = scaled_RV.logsumexp(-1, keepdim=True)
    threshold_R1 = nucleus_threshold(logits_RV, log_z_R1, temperature=temperature, top_p=top_p)
    return (scaled_RV - log_z_R1).exp() * (logits_RV >= threshold_R1)


def nucleus_threshold(logits_BV: torch.Tensor, log_z_B1: torch.Tensor, *, temperature: float, top_p: float,
                      rows_per_sort: int = 128) -> torch.Tensor:
    """Per row, the smallest logit the top-p nucleus keeps: the nucleus is exactly ``logits_BV >= threshold``.

    The logits are sorted in their own dtype (bf16 from a bf16 model): dividing by the temperature keeps their order,
    so the order, and hence the nucleus, is the same as that of the scaled float32 logits HF's warper sorts.
    ``log_z_B1`` is the logsumexp of ``logits.float() / temperature``. Rows are sorted a chunk at a time, which bounds
    the sort's temporary memory (indices are int64: four times a bf16 row).
    """
    thresholds = []
    for start in range(0, logits_BV.shape[0], rows_per_sort):
        sorted_BV = logits_BV[start:start + rows_per_sort].sort(dim=-1, descending=True).values
        probs_BV = (sorted_BV.float() / temperature - log_z_B1[start:start + rows_per_sort]).exp()
        # HF's rule on the sorted row: keep a token iff the mass strictly above it is < top_p. The inclusive cumsum
        # is monotone, so the kept tokens are the prefix up to the first one whose inclusive mass reaches top_p.
        n_keep_B1 = ((probs_BV.cumsum(-1) < top_p).sum(-1, keepdim=True) + 1).clamp(max=probs_BV.shape[-1])
        thresholds.append(sorted_BV.gather(-1, n_keep_B1 - 1))
    return torch.cat(thresholds)


def _draw(weights_BK: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A categorical draw per row, proportional to the (unnormalised) weights: argmax of w / Exp(1) noise."""
    noise_BK = torch.empty_like(weights_BK).exponential_(generator=generator)
    return (weights_BK / noise_BK).argmax(-1, keepdim=True)


def batch_seed(seed: int, keys: Sequence[str]) -> int:
    """The same batch of queries draws the same samples on a re-run; any other batch draws independently."""
    return zlib.crc32(f"{seed}|{'|'.join(keys)}".encode())


# ---------------------------------------------------------------------------------------------------------------------
# The fast path


class BatchedSampler:
    def __init__(self, model: nn.Module, tokenizer, *, injection_layer: int, coefficient: float,
                 params: DecodeParams, max_rows: int = 512, max_tokens: int = 131_072, use_adapter: bool = True,
                 compact_finished: bool = True, static_cache: bool = True, merge_lora: bool = False,
                 attention: Literal["gqa", "hf"] = "gqa", cuda_graphs: bool = True):
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
        with (tqdm(total=sum(q.n for q in queries), desc=desc, unit="sample", disable=not progress) as bar,
              self._merged(), cached_norm_scales(self.model)):
            try:
                for batch in batches:
                    done = self.generate([queries[i] for i in batch], pad_to=pad_to)
                    out.update(done)
                    if on_batch:
                        on_batch(done)
                    bar.update(sum(len(v) for v in done.values()))
            finally:
                # Dropped inside the blocks, whatever happened: the CUDA graphs read the merged weights and the
                # cached norm scales, and the static cache is most of the GPU's memory.
                self._kept = None
        return out

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
        ids_QL, mask_QL = left_pad([q.input_ids for q in queries], self.pad_id, device, length=pad_to)
        L = ids_QL.shape[1]
        n_Q = torch.tensor([q.n for q in queries], device=device)

        with self._adapter():
            with injection_for_rows(self.model, queries, L, device, self.injection_layer, self.coefficient):
                out = self.model(input_ids=ids_QL, attention_mask=mask_QL,
                                 position_ids=position_ids_from_mask(mask_QL), use_cache=True, logits_to_keep=1,
                                 **cache_kwargs(self.model, self._prefill_cache()))
            cache, static = self._expand(returned_cache(out), n_Q, L + p.max_new_tokens)
            logits_BV = out.logits[:, -1].to(device).repeat_interleave(n_Q, dim=0)
            mask_AL = mask_QL.bool().repeat_interleave(n_Q, dim=0)
            if self.attention == "gqa" and static:
                step = self._static_step(cache, mask_AL, L + p.max_new_tokens)
                with decode_attention(self.model):
                    tokens_BT = self._decode(step, logits_BV, mask_AL, L, generator)
                # Kept for the next batch of this shape, unless finished rows were dropped (a smaller cache then).
                self._kept = None if step.rows_dropped else step
            else:
                tokens_BT = self._decode(PlainDecodeStep(self.model, cache, mask_AL), logits_BV, mask_AL, L,
                                         generator)
        return self._collect(queries, n_Q, tokens_BT.tolist())

    def _decode(self, step, logits_AV: torch.Tensor, mask_AL: torch.Tensor, L: int,
                generator: torch.Generator) -> torch.Tensor:
        """The decode loop from the prompt's last logits; returns every row's tokens, padded after a stop."""
        p = self.params
        device = logits_AV.device
        stop_S = torch.tensor(self.stop_ids, device=device)
        # Decode state lives on the device; the host looks at it only every SYNC_EVERY steps.
        B = logits_AV.shape[0]
        tokens_BT = torch.full((B, p.max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        alive_A = torch.arange(B, device=device)  # the original row of each row still in the batch
        next_pos_A = position_ids_from_mask(mask_AL)[:, -1] + 1
        for i in range(p.max_new_tokens):
            tokens_A = sample_next_tokens(self._suppress_stop(logits_AV, i), temperature=p.temperature,
                                          top_p=p.top_p, top_k=self.sampling.top_k, generator=generator)
            tokens_BT[alive_A, i] = torch.where(done_B[alive_A], self.pad_id, tokens_A)
            done_B[alive_A] |= torch.isin(tokens_A, stop_S)
            if i == p.max_new_tokens - 1:
                break
            if (i + 1) % SYNC_EVERY == 0:
                n_done_alive = int(done_B[alive_A].sum())
                if n_done_alive == alive_A.shape[0]:
                    break
                if self.compact_finished and n_done_alive * 2 >= alive_A.shape[0]:
                    keep = (~done_B[alive_A]).nonzero().squeeze(-1)
                    step.select(keep, _select_rows)
                    alive_A, tokens_A, next_pos_A = (t[keep] for t in (alive_A, tokens_A, next_pos_A))
            # the head may sit on another GPU under device_map="auto"
            logits_AV = step(tokens_A, next_pos_A, length=L + i + 1).to(device)
            next_pos_A = next_pos_A + 1
        return tokens_BT

    # -- pieces of generate ------------------------------------------------------------------------------------------

    def _adapter(self):
        return contextlib.nullcontext() if self.use_adapter else adapter_disabled(self.model)

    def _static_step(self, cache, mask_AL: torch.Tensor, total_len: int) -> StaticDecodeStep:
        if self._kept is not None and self._kept.cache is cache:
            self._kept.restart(mask_AL)
            return self._kept
        return StaticDecodeStep(self.model, cache, mask_AL, total_len, graphs=self.cuda_graphs)

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
        if self._kept is not None and (self._kept.total_len, self._kept.rows) != (total_len, len(rows_B)):
            self._kept = None  # another shape: free the last batch's cache before a new one takes its place
        if not self.static_cache or total_len > window:
            for layer in prefill_cache.layers:
                layer.keys, layer.values = _rows(layer.keys, rows_B), _rows(layer.values, rows_B)
            return prefill_cache, False
        from transformers import StaticCache

        if self._kept is not None:
            static = self._kept.cache  # the last batch's, same shape: refilled in place, so its graphs stay valid
            static.reset()
        else:
            static = StaticCache(config=config, max_cache_len=total_len)
        L = prefill_cache.get_seq_length()
        for i, layer in enumerate(prefill_cache.layers):
            keys, values = _rows(layer.keys, rows_B), _rows(layer.values, rows_B)
            static.update(keys, values, i, cache_kwargs={"cache_position": torch.arange(L, device=keys.device)})
        return static, True

    def _suppress_stop(self, logits_BV: torch.Tensor, step: int) -> torch.Tensor:
        if step >= self.params.min_new_tokens:
            return logits_BV
        logits_BV = logits_BV.clone()
        logits_BV[:, self.stop_ids] = float("-inf")
        return logits_BV

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
    """The decoding HF generate would do for this model and these settings (generation_settings.py); eos ids given
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
    vectors_BKD = torch.stack([q.vectors_KD for q in row_queries]).to(device)
    positions_BK = torch.tensor([[L - len(q.input_ids) + p for p in q.positions_K] for q in row_queries],
                                device=device)  # each row's positions shifted by its left padding
    return injecting(model, layer, vectors_BKD, positions_BK, coefficient)


def merged_weights_snapshot(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, copy on the host) for every base weight a LoRA merge writes into.

    The copies of a GPU model go to pinned memory with asynchronous copies (27B: ~53 GB each way at PCIe speed, a
    few seconds; pageable copies took ~40 s a stage), reused by torch's pinned-memory cache from one stage to the next.
    """
    params = [param for module in model.modules() if hasattr(module, "base_layer") and hasattr(module, "merge")
              for param in module.base_layer.parameters(recurse=False)]
    pairs = []
    for param in params:
        host = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=param.is_cuda)
        pairs.append((param, host.copy_(param.detach(), non_blocking=param.is_cuda)))
    _wait_for_copies(params)
    return pairs


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


def _select_rows(cache, keep_B: torch.Tensor):
    """Drop finished rows from a static or dynamic cache (in place); the next steps cost only the live rows."""
    for layer in cache.layers:
        layer.keys = _rows(layer.keys, keep_B)
        layer.values = _rows(layer.values, keep_B)
        if hasattr(layer, "batch_size"):
            layer.batch_size = keep_B.shape[0]
    return cache


def _rows(cache_BHLD: torch.Tensor, rows_B: torch.Tensor) -> torch.Tensor:
    # Under device_map="auto" each decoder layer's cache lives on that layer's GPU: index it there.
    return cache_BHLD.index_select(0, rows_B.to(cache_BHLD.device))


def until_stop(generated: list[int], stop_ids: Sequence[int], pad_id: int) -> list[int]:
    """A row's tokens up to and including its first stop token. ``generate`` pads only rows that already stopped,
    so the padding always follows a stop token; a row that never stopped keeps every token, trailing <pad> too."""
    tokens = []
    for tok in generated:
        tokens.append(tok)
        if tok in stop_ids:
            break
    return tokens
