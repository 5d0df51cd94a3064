"""One decode forward (this step's tokens -> next logits) over the batch's KV cache, as cheaply as the cache allows.

``StaticDecodeStep`` is the fast one, for a static cache read by ``gqa_attention`` (attention.py):

- the attention mask is one preallocated (rows x cache length) buffer; each step sets the new position and passes a
  4-D view of it cut to the sequence so far, rounded up to a multiple of ``BUCKET`` positions (the cache past the
  sequence is empty and masked out), so attention reads only the filled part of the cache;
- on CUDA, each (rows, cut length) gets a CUDA graph of the whole model forward, captured right after its first
  step ran eagerly (which is that step's real work and the warm-up capture needs) and replayed for the next ones.
  A 27B forward at batch 760 is ~3000 kernel launches, ~50 ms of Python and launch work a step that would otherwise
  leave the GPU waiting. The cache writes its new position through a device-side counter, so a replay writes where
  an eager step would;
- finished rows are dropped in place (``select``): the live rows move to the front of the same buffers and the step
  works on that many first rows, a view at the same addresses. Row counts come from a fixed ladder (the batch's rows,
  halved, halved again, ...; ``rung``), finished rows filling up to the rung, so a stage captures a graph once per
  (rung, cut length) and every later batch replays it. (Dropping rows into new tensors, as before, meant new graphs
  after every drop of every batch: ~0.3 s a capture at 27B, ~10 a batch when answers end early.)

On CPU, and for a model spread over several GPUs, the same step runs eagerly (same buffers, same cut lengths);
that is what the CPU tests exercise.
``PlainDecodeStep`` is the reference: a 2-D mask grown each step, for the model's own attention or a dynamic cache.

Shape letters:
    A  the rows still decoding (finished ones are dropped by ``select``)
    B  all rows of the batch
    N  the rows a drop keeps
    H  key/value heads
    L  the batch's padded prompt length
    S  positions of the KV cache: the sequence so far (a dynamic cache), or all of the static cache
    D  the head size
    V  the vocabulary
    1  one position: this step's token
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
from torch import nn

BUCKET = 32  # cut lengths are multiples of this: ~4 CUDA graphs for a 40-token prompt + 120 new tokens


def on_one_device(model: nn.Module) -> bool:
    """A graph is captured on one device's stream: work a device_map="auto" model sends to another GPU would run
    outside it, at capture time, and then never again. Such a model decodes eagerly."""
    return len({p.device for p in model.parameters()}) == 1


@functools.cache
def _cache_argument(forward_owner: type) -> str:
    """transformers 5.24 renamed the forward's ``past_key_values=`` to ``cache=`` (the old name warns, and goes in
    5.40); 5.17 (the device's) knows only the old one. The signature says which this install takes."""
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` under the name this transformers' forward takes (through a PEFT wrapper too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_argument(type(base)): cache}


def returned_cache(out):
    """The cache a forward returned: ``out.cache`` from 5.24 on, ``out.past_key_values`` before."""
    cache = out.get("cache")
    return out.past_key_values if cache is None else cache


def index_rows(cache_BHSD: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
    """The cache's rows ``rows_N``, in that order (a row may repeat: a query's prompt KV for each of its samples)."""
    # Under device_map="auto" each decoder layer's cache lives on that layer's GPU: index it there.
    return cache_BHSD.index_select(0, rows_N.to(cache_BHSD.device))


def select_rows(cache, keep_N: torch.Tensor):
    """Keep rows ``keep_N`` of a dynamic cache (new tensors)."""
    for layer in cache.layers:
        layer.keys, layer.values = index_rows(layer.keys, keep_N), index_rows(layer.values, keep_N)
    return cache


def rung(n_live: int, batch_rows: int) -> int:
    """The fewest rows of the ladder ``batch_rows``, ceil(batch_rows / 2), ceil(batch_rows / 4), ..., 1 that hold
    ``n_live`` rows: a static step decodes at these row counts only, so its graphs serve every batch."""
    rows = batch_rows
    while rows > 1 and -(-rows // 2) >= n_live:
        rows = -(-rows // 2)
    return rows


class PlainDecodeStep:
    def __init__(self, model: nn.Module, cache, mask_AL: torch.Tensor):
        self.model, self.cache, self.mask_AS = model, cache, mask_AL

    @property
    def rows(self) -> int:
        return self.mask_AS.shape[0]

    def rows_to_keep(self, n_live: int) -> int:
        """Drop the finished rows once they are half of the batch (each drop copies the whole cache)."""
        return n_live if n_live * 2 <= self.rows else self.rows

    def __call__(self, tokens_A: torch.Tensor, positions_A: torch.Tensor, length: int) -> torch.Tensor:
        self.mask_AS = torch.cat([self.mask_AS, self.mask_AS.new_ones(self.mask_AS.shape[0], 1)], dim=1)
        out = self.model(input_ids=tokens_A[:, None], attention_mask=self.mask_AS, position_ids=positions_A[:, None],
                         use_cache=True, **cache_kwargs(self.model, self.cache))
        self.cache = returned_cache(out)
        return out.logits[:, -1]

    def select(self, keep_N: torch.Tensor) -> None:
        self.cache = select_rows(self.cache, keep_N)
        self.mask_AS = self.mask_AS[keep_N]


class StaticDecodeStep:
    def __init__(self, model: nn.Module, cache, mask_AL: torch.Tensor, total_len: int, *, graphs: bool):
        self.model, self.cache, self.total_len = model, cache, total_len
        self.use_graphs = graphs and mask_AL.device.type == "cuda" and on_one_device(model)
        self.batch_rows = mask_AL.shape[0]
        # The batch's buffers, all rows; the step works on their first ``rows`` rows (views: same addresses).
        self.full_kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.full_mask_BS = torch.zeros(self.batch_rows, total_len, dtype=torch.bool, device=mask_AL.device)
        self.full_tokens_B1 = torch.zeros(self.batch_rows, 1, dtype=torch.long, device=mask_AL.device)
        self.full_positions_B1 = torch.zeros_like(self.full_tokens_B1)
        # (rows, cut length) -> the graph of that step and the logits it writes
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None  # one memory pool for the graphs
        self.restart(mask_AL)

    def first_rows(self, n: int) -> None:
        """Work on the buffers' first ``n`` rows from now on."""
        self.rows = n
        for layer, (keys_BHSD, values_BHSD) in zip(self.cache.layers, self.full_kv):
            layer.keys, layer.values = keys_BHSD[:n], values_BHSD[:n]
            if hasattr(layer, "batch_size"):
                layer.batch_size = n
        self.mask_AS = self.full_mask_BS[:n]
        self.tokens_A1, self.positions_A1 = self.full_tokens_B1[:n], self.full_positions_B1[:n]

    def restart(self, mask_AL: torch.Tensor) -> None:
        """The prompt's mask, nothing after it, all rows. Also a new batch of the same shape in the same (refilled)
        cache: the captured graphs stay valid."""
        self.first_rows(self.batch_rows)
        self.mask_AS.zero_()
        self.mask_AS[:, :mask_AL.shape[1]] = mask_AL

    def rows_to_keep(self, n_live: int) -> int:
        return rung(n_live, self.batch_rows)

    def cut_length(self, length: int) -> int:
        return min(-(-length // BUCKET) * BUCKET, self.total_len)

    def __call__(self, tokens_A: torch.Tensor, positions_A: torch.Tensor, length: int) -> torch.Tensor:
        """``length``: the sequence length once this step's token is in the cache (it goes to ``length - 1``)."""
        self.mask_AS[:, length - 1] = True
        self.tokens_A1.copy_(tokens_A[:, None])
        self.positions_A1.copy_(positions_A[:, None])
        cut = self.cut_length(length)
        if not self.use_graphs:
            return self._forward(cut)
        if (self.rows, cut) in self.graphs:
            graph, logits_AV = self.graphs[self.rows, cut]
            graph.replay()
            return logits_AV
        return self._run_then_capture(cut)

    def _forward(self, cut: int) -> torch.Tensor:
        out = self.model(input_ids=self.tokens_A1, attention_mask=self.mask_AS[:, None, None, :cut],
                         position_ids=self.positions_A1, use_cache=True, **cache_kwargs(self.model, self.cache))
        return out.logits[:, -1]

    def _run_then_capture(self, cut: int) -> torch.Tensor:
        logits_AV = self._forward(cut)  # this step's real work, and the warm-up capture needs
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                graph_logits_AV = self._forward(cut)  # recorded, not run: the next step at this cut replays it
        except RuntimeError as e:  # a forward that syncs with the host cannot be captured: stay eager
            warnings.warn(f"decoding without CUDA graphs: this model's forward could not be captured ({e})",
                          stacklevel=2)
            self.use_graphs = False
            return logits_AV
        self.graphs[self.rows, cut] = (graph, graph_logits_AV)
        return logits_AV

    def select(self, keep_N: torch.Tensor) -> None:
        """Move rows ``keep_N`` to the front of the buffers, in place, and work on those from now on. The graphs
        read the buffers' addresses, which do not move: the ones captured for this many rows replay."""
        n = keep_N.shape[0]
        for layer, (keys_BHSD, values_BHSD) in zip(self.cache.layers, self.full_kv):
            keys_BHSD[:n] = index_rows(layer.keys, keep_N)  # gathered first: rows may move onto each other
            values_BHSD[:n] = index_rows(layer.values, keep_N)
        self.full_mask_BS[:n] = self.mask_AS[keep_N.to(self.mask_AS.device)]  # tokens, positions: set every step
        self.first_rows(n)
