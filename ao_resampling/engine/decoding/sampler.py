"""The sampler: n answers for each of many queries, the activation injected on the prompt pass, decoded in a step
that a continuously refilled set of rows keeps full.

- Rows hold samples (scheduler.py): when enough rows are free, the next pending samples take them. Their queries'
  prompts are prefilled in fixed blocks of ``PREFILL_QUERIES`` queries, each block once (the injection hook
  attached, on the prompt pass only), its KV kept in the step's prompt buffer until its samples are seated; the
  prompt's KV is copied into each sample's row (decode_step.py's ``SlotStep.seat``), and the sample's first token is
  drawn from the prompt's last logits. Decode steps then run without any hook: each row feeds its last token at its
  own position, the step is a CUDA graph replay per (rows, cut length), attention reads grouped KV heads in place.
- Every draw comes from the sample's own random stream (streams.py), keyed by (seed, run, sample index) and the
  step, so an answer does not depend on the batch size, the card, refills or a resume.
- A row whose answer ends (a stop token, or max_new_tokens) is handed to ``on_answer`` at once, and its row is free.
- The row count is sized to the card (memory.py) unless given; the LoRA is merged into the weights for the stage
  (merge.py), each layer's query, key and value projections one matmul (fused_qkv.py), the norms' scales cached
  (norms.py), on a GPU RMSNorm and RoPE one Triton kernel each (triton_kernels.py).

The reference paths tests compare it with (HF ``generate``, one sample at a time) are in engine/reference.py.

Shape letters:
    Q  the queries a refill prefills (one prompt each)
    N  the samples a refill seats (one row each)
    A  the rows the step decodes
    B  all rows of the step's buffers (A <= B once the tail shrinks)
    P  the prompt region (every prompt left-padded to the longest of the stage)
    T  new tokens, up to max_new_tokens
    V  the vocabulary
    K  the placeholder positions of an oracle prompt (where the vectors go)
    D  the model's hidden size
    R  the rows of a prefill batch being injected
    E  stop (eos) token ids
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ao_resampling.config import Decoding
from ao_resampling.engine.decoding import memory
from ao_resampling.engine.decoding.decode_step import SlotStep, synced_clock
from ao_resampling.engine.decoding.fused_qkv import fused_qkv
from ao_resampling.engine.decoding.merge import merged_lora
from ao_resampling.engine.decoding import triton_kernels
from ao_resampling.engine.decoding.norms import cached_norm_scales
from ao_resampling.engine.decoding.nucleus import sample_next_tokens
from ao_resampling.engine.decoding.scheduler import GRAPH_MIN_ROWS, Seat, SlotScheduler
from ao_resampling.engine.decoding.streams import sample_key
from ao_resampling.engine.hooks import injecting, left_pad, position_ids_from_mask
from ao_resampling.engine.loading.adapters import adapter_disabled
from ao_resampling.engine.loading.models import model_device, model_devices, text_config

# Prompts per prompt pass: queries are prefilled in fixed blocks of this many (0-31, 32-63, ...), each block once,
# its KV kept until every sample of its queries is seated. A 27B prompt pass is launch-bound (~83 ms on an H100 for
# ~200 tokens, ~14 ms of it matmuls), so one pass per 32 queries instead of one per refill; the block is also what
# the row budget sets aside for a prefill (memory.py), and it does not depend on the rows or the refills.
PREFILL_QUERIES = 32
STOP_BOOST = 30.0  # logits the stop token gets above the top one where a stand-in's answer length says it ends


@dataclass(frozen=True)
class Query:
    """One prompt to be answered n times. ``vectors_KD`` None = no injection (the target-model baseline).
    ``answer_lengths``: stand-ins only, sample i draws its stop token at token ``answer_lengths[i]``."""

    key: str
    input_ids: tuple[int, ...]
    n: int
    vectors_KD: torch.Tensor | None = None
    positions_K: tuple[int, ...] = ()
    answer_lengths: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    text: str
    finish_reason: Literal["eos", "length"]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Layout:
    """How the stage decoded: recorded in meta and timings.json."""

    rows: int
    rows_setting: str
    runs: int = 0  # queries (runs) sampled
    rows_that_fit: int | None = None
    peak_memory_bytes: int | None = None
    device: str = "cpu"
    refills: int = 0
    prompt_passes: int = 0
    decode_steps: int = 0
    captured_graphs: list[tuple[int, int]] = field(default_factory=list)
    on_answers_seconds: float = 0.0  # spent in the caller's on_answers (journaling): the GPU waits meanwhile
    triton_kernels: list[str] = field(default_factory=list)  # the step's Triton kernels (triton_kernels.py)
    setup_s: float = 0.0  # entering the stage: the kernels' probes (compiles), the weight snapshot, the LoRA merge
    teardown_s: float = 0.0  # leaving it: the base weights restored
    capture_s: float = 0.0  # CUDA graph captures, each with the eager step before it
    prompt_s: float = 0.0  # the prompt passes (eager, injection on)


class Sampler:
    def __init__(self, model: nn.Module, tokenizer, *, decoding: Decoding, injection_layer: int, coefficient: float,
                 rows: int | Literal["auto"] = "auto", use_adapter: bool = True, merge_lora: bool = True,
                 last_use: bool = False):
        if not decoding.is_resolved:
            raise ValueError("the sampler takes a decoding merged with the model's generation_config "
                             "(engine/decoding/settings.py resolve_decoding)")
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.injection_layer, self.coefficient = injection_layer, coefficient
        self.rows_setting, self.use_adapter, self.merge_lora = rows, use_adapter, merge_lora
        self.last_use = last_use  # the model's last use in the process: the merge is kept (merge.py, restore=False)
        self.stop_ids = list(decoding.eos_token_ids)
        self.pad_id = tokenizer.pad_token_id
        self.layout: Layout | None = None

    def run(self, queries: Sequence[Query], *, on_answers: Callable[[str, list[Sample]], None] | None = None,
            progress: bool = True, desc: str = "AO samples") -> dict[str, list[Sample]]:
        """Sample every query. ``on_answers(key, samples)`` gets each query's n answers once its last one ended
        (the caller journals them); returns them all."""
        queries = list(queries)
        answers: dict[str, list[Sample | None]] = {q.key: [None] * q.n for q in queries}
        if not queries:
            return {}
        device = model_device(self.model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        with self._stage() as kernels:
            setup_s = synced_clock(device) - started  # the merge's adds are queued on the GPU: done, not just queued
            run = _Run(self, queries, self._layout(queries, device), device)
            run.layout.triton_kernels = kernels
            with tqdm(total=sum(q.n for q in queries), desc=desc, unit="sample", disable=not progress) as bar:
                for seat, sample in run.answers():
                    key = queries[seat.query].key
                    answers[key][seat.sample] = sample
                    bar.update(1)
                    if on_answers and all(a is not None for a in answers[key]):
                        start = time.perf_counter()
                        on_answers(key, answers[key])
                        run.layout.on_answers_seconds += time.perf_counter() - start
            self.layout = run.layout
            leaving = time.perf_counter()
        self.layout.setup_s, self.layout.teardown_s = setup_s, time.perf_counter() - leaving
        self.layout.capture_s = run.step.capture_s
        if device.type == "cuda":
            self.layout.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
        return answers

    def _layout(self, queries: Sequence[Query], device: torch.device) -> Layout:
        """The step's row count: sized to the card ("auto"), or the one asked for if it fits."""
        samples = sum(q.n for q in queries)
        prompt_len = max(len(q.input_ids) for q in queries)
        free = memory.free_bytes(device)
        if free is None:
            fit = None
            rows = memory.CPU_ROWS if self.rows_setting == "auto" else self.rows_setting
        else:
            budget = memory.row_budget(text_config(self.model), next(self.model.parameters()).dtype)
            fit = memory.rows_that_fit(free, budget, prompt_len=prompt_len,
                                       max_new_tokens=self.decoding.max_new_tokens,
                                       prefill_tokens=PREFILL_QUERIES * prompt_len)
            if fit < 1:
                raise memory.BatchTooLarge(f"not even one row of {prompt_len} + {self.decoding.max_new_tokens} "
                                           f"positions fits in the {free / 2**30:.1f} GiB left on {device}")
            if self.rows_setting != "auto" and self.rows_setting > fit:
                raise memory.BatchTooLarge(f"batch_rows = {self.rows_setting} does not fit on {device}: at most "
                                           f"{fit} rows of {prompt_len} + {self.decoding.max_new_tokens} positions "
                                           f"fit in the {free / 2**30:.1f} GiB left after the weights")
            rows = fit if self.rows_setting == "auto" else self.rows_setting
        return Layout(rows=min(rows, samples), rows_setting=str(self.rows_setting), rows_that_fit=fit,
                      device=str(device), runs=len(queries))

    @contextlib.contextmanager
    def _stage(self) -> Iterator[list[str]]:
        """What every step of a stage shares: the adapter (off for the baseline) or the merged LoRA, the norms'
        cached scales, and on a GPU RMSNorm and RoPE as one Triton kernel a call; yields the Triton kernels in use.
        (The decode attention is the step's own: prompt passes keep the model's.)"""
        adapter = contextlib.nullcontext() if self.use_adapter else adapter_disabled(self.model)
        merged = (merged_lora(self.model, restore=not self.last_use) if self.merge_lora and self.use_adapter
                  else contextlib.nullcontext())
        devices = model_devices(self.model)
        with adapter, merged, fused_qkv(self.model), cached_norm_scales(self.model), \
                triton_kernels.fused_rotary(devices) as rotary:
            norms = all(triton_kernels.available(device, "rms_norm") for device in devices)  # each norm: its own
            attention = all(triton_kernels.available(device, "attention") for device in devices)  # each layer: its own
            seat = all(triton_kernels.available(device, "seat") for device in devices)  # each device's slots: its own
            yield [name for name, used in (("rms_norm", norms), ("rotary", rotary), ("attention", attention),
                                           ("seat", seat)) if used]

    # -- the pieces a run uses ----------------------------------------------------------------------------------------

    def draw(self, logits_AV: torch.Tensor, keys_A: torch.Tensor, steps_A: torch.Tensor,
             ends_A: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's next token from its own stream; a stand-in's answer length (``ends_A``, None when no query
        has one) makes the stop token win there, written into ``logits_AV``'s stop column in place (the caller's
        logits are scratch: a gather, or the step's output buffer, read by nothing after the draw)."""
        d = self.decoding
        if ends_A is not None:  # no host sync: rows not ending here keep their stop logit
            stop = self.stop_ids[-1]
            logits_AV[:, stop] = torch.where(ends_A == steps_A + 1, logits_AV.amax(-1) + STOP_BOOST,
                                             logits_AV[:, stop])
        return sample_next_tokens(logits_AV, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k,
                                  keys_B=keys_A, steps_B=steps_A)

    def prefill(self, queries: Sequence[Query], step: SlotStep, device: torch.device):
        """The prompt pass of ``queries`` (injection on), left-padded to the step's prompt region; their KV goes into
        the step's prompt buffer (``step.seat`` copies it into rows). Returns (mask_QP, last logits_QV)."""
        ids_QP, mask_QP = left_pad([q.input_ids for q in queries], self.pad_id, device, length=step.P)
        with injection_for_rows(self.model, queries, step.P, device, self.injection_layer, self.coefficient):
            out = self.model(input_ids=ids_QP, position_ids=position_ids_from_mask(mask_QP), use_cache=True,
                             logits_to_keep=1, **step.prompt_inputs(mask_QP))
        return mask_QP, out.logits[:, -1].to(device)


@dataclass
class _PromptBlock:
    """The prompt pass of queries [first, first + Q): masks and last logits (their KV: in the step's prompt
    buffer)."""

    first: int
    mask_QP: torch.Tensor
    logits_QV: torch.Tensor


class _Run:
    """One stage's decode loop: the step's rows, each sample's stream, the answers as they end."""

    def __init__(self, sampler: Sampler, queries: list[Query], layout: Layout, device: torch.device):
        self.sampler, self.queries, self.layout, self.device = sampler, queries, layout, device
        d = sampler.decoding
        self.T = d.max_new_tokens
        self.P = max(len(q.input_ids) for q in queries)
        window = getattr(text_config(sampler.model), "sliding_window", None)
        self.step = SlotStep(sampler.model, layout.rows, self.P, self.T, sliding_window=window, device=device)
        self.scheduler = SlotScheduler(queries, layout.rows,
                                       min_rows=GRAPH_MIN_ROWS if self.step.use_graphs else 1)
        B = layout.rows
        self.keys_B = torch.zeros(B, dtype=torch.long, device=device)
        self.ends_B = torch.zeros(B, dtype=torch.long, device=device)  # 0: no stand-in length
        self.with_lengths = any(q.answer_lengths for q in queries)
        self.tokens_BT = torch.full((B, self.T), sampler.pad_id, dtype=torch.long, device=device)
        self.current_B = torch.zeros(B, dtype=torch.long, device=device)  # each row's last token
        self.stop_E = torch.tensor(sampler.stop_ids, dtype=torch.long, device=device)  # () too: a forced run
        self.drawn = [0] * B  # tokens drawn so far by the sample in each row (host: no sync needed)
        self.ended_B = torch.zeros(B, dtype=torch.bool, device=device)
        self.prompts: _PromptBlock | None = None

    def answers(self) -> Iterator[tuple[Seat, Sample]]:
        """Decode until every sample has ended; yields each (seat, answer) as it ends.

        The answers that ended are yielded once the next step is queued on the device, before its draw: their text
        and the caller's journaling (``on_answers``) run on the host while the device runs the step, not between
        steps with the device idle. A kill still loses only answers not yet journaled, as the caller journals each
        before asking for the next."""
        while not self.scheduler.done():
            seats = self.scheduler.admit()
            if seats:
                self._seat(seats)
            ended = self._ended()
            self._compact()
            step = self._queue_step() if self.scheduler.live else None
            for seat, tokens in ended:
                yield seat, make_sample(self.sampler.tokenizer, tokens, self.sampler.stop_ids)
            if step is not None:
                self._draw_step(step)
        self.layout.captured_graphs = sorted(self.step.graphs)

    def _seat(self, seats: list[Seat]) -> None:
        """Seat the admitted samples, each from its query's block of prompt passes."""
        self.layout.refills += 1
        blocks = list(dict.fromkeys(seat.query // PREFILL_QUERIES for seat in seats))
        for block in blocks:
            group = [seat for seat in seats if seat.query // PREFILL_QUERIES == block]
            self._seat_group(group, self._prompts(block))
        if not self.scheduler.pending:
            self.prompts = None  # every sample is seated: the last block's KV is not needed any more
            self.step.release_prompts()

    def _prompts(self, block: int) -> "_PromptBlock":
        """The prompt pass of block ``block`` (queries ``block * PREFILL_QUERIES`` on), made once: samples are
        admitted in query order, so a block is never needed again once the next one is."""
        first = block * PREFILL_QUERIES
        if self.prompts is None or self.prompts.first != first:
            started = synced_clock(self.device)  # the next pass overwrites the previous block's KV, not needed now
            mask_QP, logits_QV = self.sampler.prefill(self.queries[first:first + PREFILL_QUERIES], self.step,
                                                      self.device)
            self.prompts = _PromptBlock(first, mask_QP, logits_QV)
            self.layout.prompt_passes += 1
            self.layout.prompt_s += synced_clock(self.device) - started
        return self.prompts

    def _seat_group(self, seats: list[Seat], prompts: "_PromptBlock") -> None:
        """Seat ``seats`` (samples of queries in ``prompts``' block) in their rows and draw their first tokens."""
        query_of_N = torch.tensor([s.query - prompts.first for s in seats], device=self.device)
        rows_N = torch.tensor([s.row for s in seats], device=self.device)
        self.step.seat(rows_N, query_of_N, prompts.mask_QP)
        seated = [self.queries[s.query] for s in seats]
        self.keys_B[rows_N] = torch.tensor([sample_key(self.sampler.decoding.seed or 0, q.key, s.sample)
                                            for q, s in zip(seated, seats)], device=self.device)
        self.ends_B[rows_N] = torch.tensor([q.answer_lengths[s.sample] if q.answer_lengths else 0
                                            for q, s in zip(seated, seats)], device=self.device)
        self.tokens_BT[rows_N] = self.sampler.pad_id
        zeros_N = torch.zeros_like(rows_N)
        first_N = self.sampler.draw(prompts.logits_QV[query_of_N], self.keys_B[rows_N], zeros_N,
                                    self._ends(rows_N))
        self._record(rows_N, zeros_N, first_N)
        for s in seats:
            self.drawn[s.row] = 1

    def _ends(self, rows_N: torch.Tensor | slice) -> torch.Tensor | None:
        return self.ends_B[rows_N] if self.with_lengths else None

    def _record(self, rows_N: torch.Tensor, steps_N: torch.Tensor, tokens_N: torch.Tensor) -> None:
        self.tokens_BT[rows_N, steps_N] = tokens_N
        self.current_B[rows_N] = tokens_N
        self.ended_B[rows_N] = torch.isin(tokens_N, self.stop_E) | (steps_N + 1 >= self.T)

    def _ended(self) -> list[tuple[Seat, list[int]]]:
        """The samples whose last draw ended them, with their tokens; their rows are free from now on."""
        live = sorted(self.scheduler.seats)
        if not live:
            return []
        ended_rows = [row for row, ended in zip(live, self.ended_B[live].tolist()) if ended]
        if not ended_rows:
            return []
        rows_tokens = self.tokens_BT[ended_rows].tolist()
        drawn = [self.drawn[row] for row in ended_rows]
        return [(seat, tokens[:n]) for seat, tokens, n in zip(self.scheduler.finish(ended_rows), rows_tokens, drawn)]

    def _compact(self) -> None:
        keep = self.scheduler.compaction()
        if keep is None:
            return
        keep_N = torch.tensor(keep, device=self.device)
        self.step.select(keep_N)
        for buffer in (self.keys_B, self.ends_B, self.tokens_BT, self.current_B, self.ended_B):
            buffer[:len(keep)] = buffer[keep_N]
        self.drawn[:len(keep)] = [self.drawn[row] for row in keep]
        self.scheduler.compact(keep)

    def _queue_step(self) -> "_QueuedStep":
        """Queue a decode step of the live rows on the device; nothing here waits for it."""
        A = self.scheduler.rows
        live = sorted(self.scheduler.seats)
        length = self.P + max(self.drawn[row] for row in live)
        # The row indices go to the device before the step is queued: a blocking copy from host memory waits for
        # the device's queue, which is empty now and would hold the whole step after it.
        rows_N = torch.tensor(live, device=self.device)
        steps_N = torch.tensor([self.drawn[row] for row in live], device=self.device)
        logits_AV = self.step(self.current_B[:A], length).to(self.device)
        self.layout.decode_steps += 1
        return _QueuedStep(live, rows_N, steps_N, logits_AV)

    def _draw_step(self, step: "_QueuedStep") -> None:
        """Each live row's next token from the queued step's logits."""
        A = step.logits_AV.shape[0]
        live_N = slice(None, A) if len(step.live) == A else step.rows_N  # every row live: views, no gather
        tokens_N = self.sampler.draw(step.logits_AV[live_N], self.keys_B[live_N], step.steps_N, self._ends(live_N))
        self._record(step.rows_N, step.steps_N, tokens_N)
        for row in step.live:
            self.drawn[row] += 1


@dataclass(frozen=True)
class _QueuedStep:
    """A decode step queued on the device, waiting for its draw."""

    live: list[int]  # the rows it decodes for, ascending
    rows_N: torch.Tensor
    steps_N: torch.Tensor  # each row's tokens drawn before this step
    logits_AV: torch.Tensor


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
