"""One decode forward over rows that each hold their own sample at their own step: the KV slots of continuous
batching.

``SlotStep`` owns the KV slots, (rows x KV heads x S x head size) a layer with S = the prompt region P (every prompt
left-padded to the stage's longest) + max_new_tokens. Row r holds one sample: its prompt's KV in [0, P), its
answer's from P on, written at the row's own position (``SlotCache.update``), so rows that started at different
times decode side by side. A prompt pass writes its KV into the step's prompt buffer (``PromptCache``); ``seat``
copies a prompt's KV from there into a row; ``select`` moves rows to the front.

- The slots (and the prompt buffer) of the layers on one device are one tensor, (layers x rows x H x S x D), each
  layer's slot a view of it: a seat is one launch a device for the keys and one for the values, whatever the layers
  and rows (triton_kernels.seat_prompts: 0.3 ms for a refill's 34 rows at 27B on an H100, where torch's indexed
  copies took ~3-4.5 ms; without Triton, one strided copy a run of rows that share a prompt).
  A model on one GPU has one such group; a ``device_map="auto"`` model one per run of layers on the same GPU.

- Masks are per row and preallocated: the full-attention mask (prompt + the answer so far) and, when S exceeds the
  model's sliding window, the sliding-window mask (the same, limited to the last W positions before the row's own).
  Both go to the model as additive masks (made once a step) in its per-layer-type mask dict, each cut to the
  longest row's length rounded up to ``BUCKET``; ``gqa_attention`` (attention.py) reads only that much of the cache.
- On CUDA, each (rows, cut length) gets a CUDA graph of the whole forward, captured right after its first step ran
  eagerly and replayed after that. A 27B forward is ~3000 kernel launches, ~50 ms of Python and launch work a step
  otherwise. Every input of the graph (tokens, positions, write positions, masks) is a buffer refilled in place. The
  rows shrink only onto a fixed ladder (scheduler.py's ``rung``), so a stage captures a graph per (rung, cut) once.
- On CPU, and for a model spread over several GPUs (``device_map="auto"``), the same step runs eagerly.

Shape letters:
    A  the rows the step decodes now (the buffers' first A rows)
    B  all rows of the buffers
    N  rows being seated or kept
    Q  prefilled prompts (one per query being seated)
    L  layers (of one device's group)
    H  key/value heads
    P  the prompt region: every prompt left-padded to this length
    S  positions of a row's KV slot (P + max_new_tokens)
    D  the head size
    V  the vocabulary
    1  one position: this step's token
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
import weakref

import torch
from torch import nn

from ao_resampling.engine.decoding import triton_kernels
from ao_resampling.engine.decoding.attention import attention_configs, decode_attention
from ao_resampling.engine.loading.models import base_model, decoder_layers, model_devices

BUCKET = 32  # cut lengths are multiples of this: ~4 CUDA graphs for a 40-token prompt + 120 new tokens


def synced_clock(device: torch.device) -> float:
    """perf_counter once the device's queued work is done (a capture or a prompt pass is timed, not just queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def on_one_device(model: nn.Module) -> bool:
    """A graph is captured on one device's stream: work a device_map="auto" model sends to another GPU would run
    outside it, at capture time, and then never again. Such a model decodes eagerly."""
    return len(model_devices(model)) == 1


@functools.cache
def _cache_argument(forward_owner: type) -> str:
    """transformers 5.24 renamed the forward's ``past_key_values=`` to ``cache=`` (the old name warns, and goes in
    5.40); 5.17 (the device's) knows only the old one. The signature says which this install takes."""
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` under the name this transformers' forward takes (through a PEFT wrapper too)."""
    return {_cache_argument(type(base_model(model))): cache}


def device_groups(devices: list[torch.device]) -> list[range]:
    """The runs of consecutive layers on one device (one run for a model on one GPU)."""
    groups: list[range] = []
    for i, device in enumerate(devices):
        if groups and devices[groups[-1].start] == device:
            groups[-1] = range(groups[-1].start, i + 1)
        else:
            groups.append(range(i, i + 1))
    return groups


def layer_devices(model: nn.Module) -> list[torch.device]:
    """Each decoder layer's device (under ``device_map="auto"`` its KV cache lives there too)."""
    return [next(layer.parameters()).device for layer in decoder_layers(model)]


class PromptCache:
    """The KV cache a prompt pass writes through: each layer's keys and values (Q prompts left-padded to P) go into
    the step's prompt buffer, and the attention gets them as they came (as a fresh ``DynamicCache`` gives them back
    on its first update: the same numbers as HF's prompt pass). Held weakly, as ``SlotCache``."""

    def __init__(self, step: "SlotStep"):
        self.step = weakref.proxy(step)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.step._keep_prompt_kv(layer_idx, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # a prompt pass starts from nothing


def seat_runs(rows: list[int], prompts: list[int]) -> list[tuple[int, int, int]]:
    """(first row, how many rows, prompt) of each run of consecutive rows, in the order given, that seat one prompt.
    A query's samples fill free rows in order, so a first fill is a run a query, a refill a few."""
    runs: list[tuple[int, int, int]] = []
    for row, prompt in zip(rows, prompts):
        if runs and runs[-1][2] == prompt and runs[-1][0] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, prompt)
        else:
            runs.append((row, 1, prompt))
    return runs


def copy_runs(slot_LBHSD: torch.Tensor, prompt_LQHPD: torch.Tensor, runs: list[tuple[int, int, int]]) -> None:
    """Torch's seat (a CPU, or no Triton): for each run of ``seat_runs``, one strided copy of its prompt's KV,
    broadcast over the run's rows, straight from the buffer into the slots' first P positions (no gathered
    temporary)."""
    P = prompt_LQHPD.shape[3]
    for first, n, prompt in runs:
        slot_LBHSD[:, first:first + n, :, :P].copy_(prompt_LQHPD[:, prompt:prompt + 1].expand(-1, n, -1, -1, -1))


class SlotCache:
    """The KV cache the model's attention layers write through on a decode step: each row's new key and value go
    to that row's own position (``write_A``), and attention gets the row's whole slot (the mask cuts it). The
    buffers, the write positions and the row count are the step's own (read, never copied).

    It holds the step by a weak reference: a step and its cache referring to each other would be a cycle, and the
    step's KV slots (tens of GB at 27B) would outlive the stage until the cyclic garbage collector ran, so the next
    stage of the process (a sweep's next condition, the baseline) would find the card full."""

    def __init__(self, step: "SlotStep"):
        self.step = weakref.proxy(step)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        A = self.step.rows
        keys_BHSD, values_BHSD = self.step.kv[layer_idx]
        keys_AHSD, values_AHSD = keys_BHSD[:A], values_BHSD[:A]
        write_A = self.step.write_B[:A].to(keys_AHSD.device)
        rows_A = torch.arange(A, device=keys_AHSD.device)
        keys_AHSD[rows_A, :, write_A] = key_states[:, :, 0]
        values_AHSD[rows_A, :, write_A] = value_states[:, :, 0]
        return keys_AHSD, values_AHSD

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly; nothing reads this on a decode step


class SlotStep:
    def __init__(self, model: nn.Module, rows: int, prompt_len: int, max_new_tokens: int, *,
                 sliding_window: int | None, device: torch.device, graphs: bool = True,
                 devices: list[torch.device] | None = None):
        """``devices``: each decoder layer's device (the model's, read from it, unless given)."""
        self.model, self.batch_rows, self.P = model, rows, prompt_len
        self.S = prompt_len + max_new_tokens
        self.sliding_window = sliding_window
        self.window = sliding_window if sliding_window is not None and sliding_window < self.S else None
        self.use_graphs = graphs and device.type == "cuda" and on_one_device(model)
        self.groups = device_groups(layer_devices(model) if devices is None else devices)
        self._group_of = {layer: (g, i) for g, group in enumerate(self.groups) for i, layer in enumerate(group)}
        # each group's keys and values: the slots (L x B x H x S x D, allocated by the first seat) and the prompt
        # buffer (L x Q x H x P x D, by the first prompt pass); ``kv``: each layer's slot, a view of its group's
        self._slots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._prompt_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.groups)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.mask_BS = torch.zeros(rows, self.S, dtype=torch.bool, device=device)
        self.mask_BS[:, 0] = True  # an idle row attends somewhere (its output is never read)
        self.sliding_BS = torch.zeros_like(self.mask_BS) if self.window else None
        self.mask_values: tuple[torch.Tensor, torch.Tensor] | None = None  # (0, lowest) in the scores' dtype
        self.positions_S = torch.arange(self.S, device=device)
        self.tokens_B1 = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.rope_B1 = torch.zeros_like(self.tokens_B1)  # the position RoPE sees: real tokens before it
        self.write_B = torch.zeros(rows, dtype=torch.long, device=device)  # where the row's next KV goes
        self.rows = rows
        self.cache = SlotCache(self)
        self.attention_configs: dict | None = None  # found at the first step, switched at every step
        # (rows, cut length) -> the graph of that step and the logits it writes
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_s = 0.0  # spent in _run_then_capture (the eager step and the capture), synchronised

    # -- prompt passes ------------------------------------------------------------------------------------------------

    def prompt_inputs(self, mask_QP: torch.Tensor) -> dict:
        """What a prompt pass of Q prompts left-padded to P (``mask_QP``: 1 = a real token) gives the model beside
        its tokens and positions: the cache that keeps its KV for ``seat``, and its masks as the model's eager
        attention adds them (causal, padding keys masked, on sliding layers only the last W positions: HF's own
        masks, value for value)."""
        Q, P = mask_QP.shape
        if P != self.P:
            raise ValueError(f"a prompt pass of {P} positions for a step whose prompt region is {self.P}")
        positions_P = torch.arange(P, device=mask_QP.device)
        causal_PP = positions_P[None, :] <= positions_P[:, None]  # [query, key]
        full_Q1PP = (causal_PP[None] & mask_QP.bool()[:, None, :])[:, None]
        masks = {"full_attention": self._additive(full_Q1PP)}
        if self.sliding_window is not None and self.sliding_window < P:
            near_PP = positions_P[None, :] > positions_P[:, None] - self.sliding_window
            masks["sliding_attention"] = self._additive(full_Q1PP & near_PP)
        else:
            masks["sliding_attention"] = masks["full_attention"]
        return {"attention_mask": masks, **cache_kwargs(self.model, PromptCache(self))}

    def _keep_prompt_kv(self, layer: int, keys_QHPD: torch.Tensor, values_QHPD: torch.Tensor) -> None:
        g, i = self._group_of[layer]
        Q, _, P, _ = keys_QHPD.shape
        if P != self.P:
            raise ValueError(f"layer {layer}'s prompt KV has {P} positions; the step's prompt region is {self.P}")
        buffers = self._prompt_kv[g]
        if buffers is None or buffers[0].shape[1] < Q:  # the first pass (a stage's first block is its largest)
            shape = (len(self.groups[g]), Q, *keys_QHPD.shape[1:])
            buffers = tuple(torch.empty(shape, dtype=keys_QHPD.dtype, device=keys_QHPD.device) for _ in range(2))
            self._prompt_kv[g] = buffers
        buffers[0][i, :Q] = keys_QHPD
        buffers[1][i, :Q] = values_QHPD

    def release_prompts(self) -> None:
        """Every prompt is seated: the prompt buffer goes."""
        self._prompt_kv = [None] * len(self.groups)

    # -- seating and moving rows ------------------------------------------------------------------------------------

    def seat(self, rows_N: torch.Tensor, query_of_N: torch.Tensor, prompt_mask_QP: torch.Tensor) -> None:
        """Row ``rows_N[i]`` starts sample i of prompt ``query_of_N[i]`` of the last prompt pass: that prompt's KV
        and mask are copied into the row; its answer starts at position P."""
        if any(buffers is None for buffers in self._prompt_kv):
            raise RuntimeError("seat before a prompt pass: no prompt KV to copy")
        if self.kv is None:
            self._slots = [tuple(self._empty_slots(keys_LQHPD) for _ in range(2)) for keys_LQHPD, _ in self._prompt_kv]
            self.kv = [(keys_LBHSD[i], values_LBHSD[i]) for keys_LBHSD, values_LBHSD in self._slots
                       for i in range(keys_LBHSD.shape[0])]
        runs = None
        for slots, prompts in zip(self._slots, self._prompt_kv):
            device = prompts[0].device
            if triton_kernels.available(device, "seat"):  # one launch for every row and layer of the device
                rows_here, prompts_here = rows_N.to(device), query_of_N.to(device)
                for slot_LBHSD, prompt_LQHPD in zip(slots, prompts):  # keys, then values
                    triton_kernels.seat_prompts(slot_LBHSD, prompt_LQHPD, rows_here, prompts_here)
                continue
            if runs is None:
                runs = seat_runs(rows_N.tolist(), query_of_N.tolist())
            for slot_LBHSD, prompt_LQHPD in zip(slots, prompts):
                copy_runs(slot_LBHSD, prompt_LQHPD, runs)
        self._start_rows(rows_N, query_of_N, prompt_mask_QP)

    def _start_rows(self, rows_N: torch.Tensor, query_of_N: torch.Tensor, prompt_mask_QP: torch.Tensor) -> None:
        """A seat's bookkeeping beside the KV: each row's mask is its prompt's, its answer writes from P on."""
        prompt_N = prompt_mask_QP.bool()[query_of_N.to(prompt_mask_QP.device)].to(self.mask_BS.device)
        rows_N = rows_N.to(self.mask_BS.device)
        self.mask_BS[rows_N] = False
        self.mask_BS[rows_N, :self.P] = prompt_N
        self.write_B[rows_N] = self.P
        self.rope_B1[rows_N, 0] = prompt_N.sum(-1)

    def _empty_slots(self, prompt_LQHPD: torch.Tensor) -> torch.Tensor:
        L, _, H, _, D = prompt_LQHPD.shape
        return torch.zeros((L, self.batch_rows, H, self.S, D), dtype=prompt_LQHPD.dtype, device=prompt_LQHPD.device)

    def select(self, keep_N: torch.Tensor) -> None:
        """Move rows ``keep_N`` to the front, in place, and decode those from now on. The graphs read the buffers'
        addresses, which do not move: the ones captured for this many rows replay."""
        n = keep_N.shape[0]
        for slots in self._slots:
            keep_here = keep_N.to(slots[0].device)
            for slot_LBHSD in slots:  # a layer at a time: the copy is one layer's rows (a compaction is rare)
                for slot_BHSD in slot_LBHSD:  # gathered first: rows may move onto each other
                    slot_BHSD[:n] = slot_BHSD.index_select(0, keep_here)
        for buffer in (self.mask_BS, self.tokens_B1, self.rope_B1, self.write_B):
            buffer[:n] = buffer[keep_N.to(buffer.device)]
        self.rows = n

    # -- one step ---------------------------------------------------------------------------------------------------

    def __call__(self, tokens_A: torch.Tensor, length: int) -> torch.Tensor:
        """Feed each row its token (at its own position); ``length``: the longest row's sequence once this token is
        in. Returns the next logits of the A rows."""
        A = self.rows
        rows_A = torch.arange(A, device=self.mask_BS.device)
        self.tokens_B1[:A, 0] = tokens_A
        self.mask_BS[rows_A, self.write_B[:A]] = True
        if self.window:
            lowest_A1 = self.write_B[:A, None] - self.window  # HF's sliding window: the last W positions, itself in
            self.sliding_BS[:A] = self.mask_BS[:A] & (self.positions_S[None] > lowest_A1)
        cut = min(-(-length // BUCKET) * BUCKET, self.S)
        if not self.use_graphs:
            logits_AV = self._forward(cut)
        elif (A, cut) in self.graphs:
            graph, logits_AV = self.graphs[A, cut]
            graph.replay()
        else:
            started = synced_clock(self.mask_BS.device)
            logits_AV = self._run_then_capture(cut)
            self.capture_s += synced_clock(self.mask_BS.device) - started
        self.write_B[:A] += 1
        self.rope_B1[:A] += 1
        self.write_B[:A].clamp_(max=self.S - 1)  # an idle row keeps writing its last position (never read)
        return logits_AV

    def _forward(self, cut: int) -> torch.Tensor:
        A = self.rows
        full = self._additive(self.mask_BS[:A, None, None, :cut])
        masks = {"full_attention": full,
                 "sliding_attention": self._additive(self.sliding_BS[:A, None, None, :cut]) if self.window else full}
        if self.attention_configs is None:
            self.attention_configs = attention_configs(self.model)
        with decode_attention(self.model, self.attention_configs):  # the prompt passes keep the model's own
            out = self.model(input_ids=self.tokens_B1[:A], attention_mask=masks, position_ids=self.rope_B1[:A],
                             use_cache=True, **cache_kwargs(self.model, self.cache))
        return out.logits[:, -1]

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean mask as the additive one eager attention adds (0 or the dtype's lowest), made once a step: each
        layer's ``gqa_attention`` then adds it (one kernel) instead of inverting and filling (two). The
        probabilities are the same bit for bit: a score plus the lowest value rounds to the lowest value."""
        if self.mask_values is None:  # at the first prompt pass or step (eager, before any capture)
            dtype = next(self.model.parameters()).dtype
            self.mask_values = (torch.zeros((), dtype=dtype, device=allowed.device),
                                torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device))
        return torch.where(allowed, *self.mask_values)

    def _run_then_capture(self, cut: int) -> torch.Tensor:
        logits_AV = self._forward(cut)  # this step's real work, and the warm-up capture needs
        # The graph's private pool takes device memory torch's general cache may hold unused (the prompt passes'
        # activations, a seat's copies): a capture cannot free cached blocks when it runs short, so free them now.
        torch.cuda.empty_cache()
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
