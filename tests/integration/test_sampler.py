"""The sampler on the tiny random oracle (both classes), and end to end on real Gemma 3 270M.

The sampler (continuously refilled rows, KV slots, a random stream per sample) must give, greedily, token for token
what plain HF ``generate`` gives, through refills and tail compactions, and each query must get exactly what it would
get alone; sampled, a sample's answer must not depend on the row count. The tiny model's answers are noise, which is
fine: only tokens are compared.

The random model almost never emits a stop token, so tests that need early stops make a token it does emit a stop
id (the decoding's ``eos_token_ids``).
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

import ao_resampling.engine.decoding.attention as attention
import ao_resampling.engine.decoding.decode_step as decode_step
import ao_resampling.engine.decoding.sampler as sampler_module
from ao_resampling.config import Decoding
from ao_resampling.engine.decoding.sampler import Query, Sample, Sampler, make_sample, until_stop
from ao_resampling.engine.decoding.settings import model_generation_config, resolve_decoding
from ao_resampling.engine.hooks import capture_activations, injecting, left_pad, position_ids_from_mask
from ao_resampling.engine.loading.models import layer_at_percent, num_layers, stop_token_ids
from ao_resampling.engine.reference import sample_hf_batched, sample_sequential
from ao_resampling.inputs.encoding import encode_target
from ao_resampling.inputs.oracle import build_oracle_query

from tests.support.conversations import CONVERSATIONS

INJECTION_LAYER = 1
READ_LAYER = 2  # int(4 layers * 0.5): the tiny model's 50% layer, named in the oracle prompt
COEFFICIENT = 1.0
ROWS = pytest.mark.parametrize("rows", [pytest.param(2, id="rows2_refills"), pytest.param(3, id="rows3_refills"),
                                        pytest.param(64, id="rows64_one_fill")])


def record_compactions(monkeypatch) -> list[list[int]]:
    """The rows each tail compaction keeps (indices into the rows then decoding)."""
    kept: list[list[int]] = []
    select = decode_step.SlotStep.select
    monkeypatch.setattr(decode_step.SlotStep, "select", lambda self, keep: kept.append(keep.tolist())
                        or select(self, keep))
    return kept


QUESTIONS = [
    "What is the persona?",
    "Is the user asking about the weather, and if so, in which city and on which day of the week?",
    "Colour?",
]


def decoding_of(model, *, temperature: float, max_new_tokens: int, seed: int = 0, top_k: int | None = None,
                eos: tuple[int, ...] | None = None) -> Decoding:
    """The run's settings merged with the model's generation_config, as the plan makes it; ``eos`` replaces the
    stop ids (a token the random model does emit)."""
    d = resolve_decoding(model_generation_config(model), temperature=temperature, top_p=0.9, top_k=top_k,
                         max_new_tokens=max_new_tokens, seed=seed, fallback_eos=[1, 106])
    return d if eos is None else d.model_copy(update={"eos_token_ids": eos})


def tokens(result: dict[str, list[Sample]]) -> dict[str, list[list[int]]]:
    return {key: [s.token_ids for s in samples] for key, samples in result.items()}


def fast(model, tokenizer, queries, decoding: Decoding, rows: int | str = "auto", **kwargs) -> dict[str, list[Sample]]:
    return Sampler(model, tokenizer, decoding=decoding, injection_layer=INJECTION_LAYER, coefficient=COEFFICIENT,
                   rows=rows, **kwargs).run(queries, progress=False)


def plain(model, tokenizer, queries, decoding: Decoding) -> dict[str, list[Sample]]:
    return sample_hf_batched(model, tokenizer, queries, injection_layer=INJECTION_LAYER, coefficient=COEFFICIENT,
                             decoding=decoding)


@pytest.fixture(scope="module", params=[pytest.param(False, id="text_only"), pytest.param(True, id="multimodal")])
def tiny_oracle(tiny_oracle, request):
    """Every test runs on the text-only class and on Gemma3ForConditionalGeneration (the hub checkpoint's class)."""
    return request.getfixturevalue("tiny_multimodal_oracle") if request.param else tiny_oracle


@pytest.fixture(scope="module")
def greedy(tiny_oracle):
    def make(max_new_tokens: int = 8, eos: tuple[int, ...] | None = None) -> Decoding:
        return decoding_of(tiny_oracle, temperature=0, max_new_tokens=max_new_tokens, eos=eos)
    return make


@pytest.fixture(scope="module")
def sampled(tiny_oracle):
    def make(max_new_tokens: int = 6, seed: int = 0) -> Decoding:
        return decoding_of(tiny_oracle, temperature=0.7, max_new_tokens=max_new_tokens, seed=seed)
    return make


@pytest.fixture(scope="module")
def acts_BD(tiny_oracle, gemma_tokenizer):
    encoded = [encode_target(gemma_tokenizer, m) for m in CONVERSATIONS]
    assert layer_at_percent(num_layers(tiny_oracle), 50) == READ_LAYER
    return capture_activations(tiny_oracle, [e.input_ids for e in encoded], [e.assistant_start_idx for e in encoded],
                               READ_LAYER, gemma_tokenizer.pad_token_id)


def make_queries(tokenizer, acts_BD, n: int = 2, vectors: dict[int, torch.Tensor] | None = None) -> list[Query]:
    """Query i asks QUESTIONS[i] about target i (prompts of three different lengths)."""
    out = []
    for i, question in enumerate(QUESTIONS):
        oq = build_oracle_query(tokenizer, layer=READ_LAYER, question=question)
        vector = (vectors or {}).get(i, acts_BD[i])
        out.append(Query(key=f"q{i}", input_ids=tuple(oq.input_ids), n=n, vectors_KD=vector[None],
                         positions_K=tuple(oq.placeholder_positions)))
    return out


@pytest.fixture(scope="module")
def queries(gemma_tokenizer, acts_BD) -> list[Query]:
    qs = make_queries(gemma_tokenizer, acts_BD)
    assert len({len(q.input_ids) for q in qs}) == len(qs), "mixed lengths, so prompts are padded"
    return qs


@pytest.fixture(scope="module")
def greedy_reference(tiny_oracle, gemma_tokenizer, queries, greedy):
    return tokens(plain(tiny_oracle, gemma_tokenizer, queries, greedy()))


@pytest.fixture(scope="module")
def early_eos(tiny_oracle, gemma_tokenizer, queries, greedy_reference) -> int:
    """An eos id that q0 greedily emits at step 2 and q1 never emits: q0 stops early, q1 runs on."""
    q0, q1 = greedy_reference["q0"][0], greedy_reference["q1"][0]
    eos = q0[2]
    assert eos not in q0[:2] and eos not in q1, "pick another step: the random model repeats itself here"
    return eos


# ---------------------------------------------------------------------------------------------------------------------
# Cross-batch isolation


def test_each_query_gets_what_it_gets_alone(tiny_oracle, gemma_tokenizer, queries, greedy):
    together = tokens(fast(tiny_oracle, gemma_tokenizer, queries, greedy()))
    for q in queries:
        alone = tokens(fast(tiny_oracle, gemma_tokenizer, [q], greedy()))
        assert alone[q.key] == together[q.key], q.key
    # Two rows: the queries' samples come and go through refills; nothing changes either.
    assert tokens(fast(tiny_oracle, gemma_tokenizer, queries, greedy(), rows=2)) == together


def test_changing_one_rows_vector_leaves_the_other_rows_bit_identical(tiny_oracle, gemma_tokenizer, acts_BD, queries,
                                                                      greedy):
    changed = make_queries(gemma_tokenizer, acts_BD, vectors={1: -3 * acts_BD[0]})
    a = fast(tiny_oracle, gemma_tokenizer, queries, greedy())
    b = fast(tiny_oracle, gemma_tokenizer, changed, greedy())
    assert a["q0"] == b["q0"] and a["q2"] == b["q2"]

    # Bit-identical logits on the prompt pass, where the injection happens.
    ids_BL, mask_BL = left_pad([q.input_ids for q in queries], gemma_tokenizer.pad_token_id)
    L = ids_BL.shape[1]
    positions_BK = torch.tensor([[L - len(q.input_ids) + p for p in q.positions_K] for q in queries])

    def prompt_logits(qs):
        vectors_BKD = torch.stack([q.vectors_KD for q in qs])
        with torch.inference_mode(), injecting(tiny_oracle, INJECTION_LAYER, vectors_BKD, positions_BK, COEFFICIENT):
            return tiny_oracle(input_ids=ids_BL, attention_mask=mask_BL,
                               position_ids=position_ids_from_mask(mask_BL)).logits

    before, after = prompt_logits(queries), prompt_logits(changed)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1])


# ---------------------------------------------------------------------------------------------------------------------
# The sampler == plain HF generate, greedily, through refills


@ROWS
def test_greedy_answers_through_refills_equal_plain_generate(tiny_oracle, gemma_tokenizer, queries, greedy_reference,
                                                             greedy, rows):
    sampler = Sampler(tiny_oracle, gemma_tokenizer, decoding=greedy(), injection_layer=INJECTION_LAYER,
                      coefficient=COEFFICIENT, rows=rows)
    result = sampler.run(queries, progress=False)
    assert tokens(result) == greedy_reference
    assert all(s.finish_reason == "length" and s.n_tokens == 8 for v in result.values() for s in v)
    assert sampler.layout.rows == min(rows, 6)
    assert sampler.layout.refills == (1 if rows >= 6 else 6 // rows), "a refill each time the rows came free"


def test_decode_steps_run_through_gqa_attention(tiny_oracle, gemma_tokenizer, queries, greedy, monkeypatch):
    """The fast attention is really used on decode steps (and only there: prompt passes keep the model's own), each
    step reading the KV slots cut to the sequence so far rounded up to BUCKET positions; the model gets its own
    attention back after."""
    calls, original = [], attention.gqa_attention

    def spy(module, query_BHQD, key_BKSD, value_BKSD, attention_mask, **kwargs):
        calls.append((query_BHQD.shape[2], attention_mask.shape[-1], key_BKSD.shape[2]))
        return original(module, query_BHQD, key_BKSD, value_BKSD, attention_mask, **kwargs)

    monkeypatch.setattr(attention, "gqa_attention", spy)
    monkeypatch.setattr(decode_step, "BUCKET", 4)
    before = tiny_oracle.config._attn_implementation
    one = [dataclasses.replace(queries[0], n=1)]
    fast(tiny_oracle, gemma_tokenizer, one, greedy(max_new_tokens=9))

    L, total = len(queries[0].input_ids), len(queries[0].input_ids) + 9
    n_layers = num_layers(tiny_oracle)
    # 8 decode steps (the first token comes from the prompt pass), one call per layer each, query length 1.
    cuts = [min(-(-(L + 1 + i) // 4) * 4, total) for i in range(8)]
    assert [(q, s) for q, s, _ in calls] == [(1, cut) for cut in cuts for _ in range(n_layers)]
    assert len(set(cuts)) >= 2, "the steps cross a bucket boundary"
    assert {k for _, _, k in calls} == {total}, "the KV slots are allocated once, for the whole answer"
    assert tiny_oracle.config._attn_implementation == before


@pytest.mark.parametrize("bucket", [1, 3, 32])
def test_greedy_answers_equal_plain_generate_for_any_bucket(tiny_oracle, gemma_tokenizer, queries, greedy_reference,
                                                            greedy, bucket, monkeypatch):
    monkeypatch.setattr(decode_step, "BUCKET", bucket)
    assert tokens(fast(tiny_oracle, gemma_tokenizer, queries, greedy(), rows=4)) == greedy_reference


@ROWS
def test_early_stops_free_rows_for_the_next_samples(tiny_oracle, gemma_tokenizer, queries, early_eos, greedy, rows):
    """q0's rows stop at step 2; their rows take the next samples while q1's rows decode on."""
    decoding = greedy(eos=(early_eos,))
    result = fast(tiny_oracle, gemma_tokenizer, queries, decoding, rows=rows)

    assert tokens(result) == tokens(plain(tiny_oracle, gemma_tokenizer, queries, decoding))
    assert [s.finish_reason for s in result["q0"]] == ["eos", "eos"] and result["q0"][0].n_tokens == 3
    assert [s.finish_reason for s in result["q1"]] == ["length", "length"] and result["q1"][0].n_tokens == 8


def test_ended_answers_are_handed_over_while_the_next_step_runs(tiny_oracle, gemma_tokenizer, queries, early_eos,
                                                                greedy, monkeypatch):
    """q0 ends at step 2 while q1 and q2 decode on: q0's answers reach ``on_answers`` (the caller journals there)
    after the next decode step is queued and before that step's draw, so the host's work overlaps the device's.
    Once no row is left to decode, the last answers come after the last draw."""
    events: list[str] = []
    step, draw = decode_step.SlotStep.__call__, Sampler.draw
    monkeypatch.setattr(decode_step.SlotStep, "__call__", lambda self, *a: events.append("step") or step(self, *a))
    monkeypatch.setattr(Sampler, "draw", lambda self, *a: events.append("draw") or draw(self, *a))
    sampler = Sampler(tiny_oracle, gemma_tokenizer, decoding=greedy(eos=(early_eos,)),
                      injection_layer=INJECTION_LAYER, coefficient=COEFFICIENT, rows=64)
    result = sampler.run(queries, progress=False, on_answers=lambda key, samples: events.append(key))

    assert [s.n_tokens for s in result["q0"]] == [3, 3] and {s.n_tokens for s in result["q1"]} == {8}
    at = events.index("q0")
    assert events[at - 1] == "step" and events[at + 1] == "draw", events
    assert events.count("step") == 7, "one step per token after the first, which the prompt pass gives"
    assert sorted(events[-2:]) == ["q1", "q2"] and events[-3] == "draw", events


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_each_block_of_queries_is_prefilled_once_whatever_the_rows(tiny_oracle, gemma_tokenizer, queries,
                                                                  greedy_reference, greedy, monkeypatch, rows):
    """Prompts are prefilled in fixed blocks of queries (two here), each block once, however the refills split a
    query's samples; the answers stay HF generate's."""
    monkeypatch.setattr(sampler_module, "PREFILL_QUERIES", 2)
    passes = []
    real_prefill = Sampler.prefill
    monkeypatch.setattr(Sampler, "prefill", lambda self, qs, *a: passes.append([q.key for q in qs])
                        or real_prefill(self, qs, *a))
    sampler = Sampler(tiny_oracle, gemma_tokenizer, decoding=greedy(), injection_layer=INJECTION_LAYER,
                      coefficient=1.0, rows=rows)
    result = sampler.run(queries, progress=False)

    assert passes == [["q0", "q1"], ["q2"]]
    assert sampler.layout.prompt_passes == 2 and sampler.layout.refills >= 2
    assert tokens(result) == greedy_reference


def test_the_tail_shrinks_onto_the_ladder_in_place(tiny_oracle, gemma_tokenizer, acts_BD, greedy_reference, greedy,
                                                   monkeypatch):
    """Once the queue is empty and at most a quarter of the rows are live, the live rows move to the front of the
    same KV buffers (the addresses a CUDA graph reads), onto the ladder's row counts, and the answers stay HF
    generate's."""
    kept = record_compactions(monkeypatch)
    addresses = []
    select = decode_step.SlotStep.select

    def select_and_look(self, keep_N):
        before = [(k.data_ptr(), v.data_ptr()) for k, v in self.kv]
        select(self, keep_N)
        addresses.append(before == [(k.data_ptr(), v.data_ptr()) for k, v in self.kv])

    monkeypatch.setattr(decode_step.SlotStep, "select", select_and_look)
    g0, g1, g2 = (greedy_reference[k][0] for k in ("q0", "q1", "q2"))
    decoding = greedy(eos=(g0[1], g1[3]))
    assert not set(decoding.eos_token_ids) & set(g0[:1] + g1[:3] + g2), "pick other steps: the model repeats itself"
    four_two_two = [dataclasses.replace(q, n=n) for q, n in zip(make_queries(gemma_tokenizer, acts_BD), (4, 2, 2))]

    result = fast(tiny_oracle, gemma_tokenizer, four_two_two, decoding, rows=8)

    assert tokens(result) == tokens(plain(tiny_oracle, gemma_tokenizer, four_two_two, decoding))
    assert [s.n_tokens for k in ("q0", "q1", "q2") for s in result[k]] == [2] * 4 + [4] * 2 + [8] * 2
    assert [len(keep) for keep in kept] == [2], "8 rows; 4 live: kept; 2 live (q2): -> 2"
    assert all(addresses)


def test_a_step_that_replays_graphs_gets_the_ladders_floor_an_eager_one_none(tiny_oracle, gemma_tokenizer, queries,
                                                                              greedy, monkeypatch):
    """The ladder stops at GRAPH_MIN_ROWS only where new rungs cost captures (CUDA graphs; on a CPU the step is
    eager). Which the step does is its own ``use_graphs``: forced on here, the run is only built, not decoded."""
    sampler = Sampler(tiny_oracle, gemma_tokenizer, decoding=greedy(), injection_layer=INJECTION_LAYER,
                      coefficient=1.0, rows=8)
    layout = sampler_module.Layout(rows=8, rows_setting="8")
    eager = sampler_module._Run(sampler, queries, layout, torch.device("cpu"))
    assert not eager.step.use_graphs and eager.scheduler.min_rows == 1
    init = decode_step.SlotStep.__init__

    def with_graphs(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.use_graphs = True

    monkeypatch.setattr(decode_step.SlotStep, "__init__", with_graphs)
    assert sampler_module._Run(sampler, queries, layout, torch.device("cpu")).scheduler.min_rows == \
        sampler_module.GRAPH_MIN_ROWS == 64


@pytest.mark.parametrize("words", [(488, 470), (505, 490)], ids=["answer-past-window", "prompt-past-window"])
def test_past_the_sliding_window_equals_plain_generate(tiny_oracle, gemma_tokenizer, acts_BD, greedy, words):
    """Prompt + answer longer than the tiny model's 512-token window: the sliding layers see only the last W
    positions of each row (their own mask), as HF's windowed cache does; a prompt longer than the window too (the
    prompt pass's own sliding mask, its KV kept whole for the slots)."""
    window = tiny_oracle.get_base_model().config.get_text_config(decoder=True).sliding_window
    long = []
    for i, n_words in enumerate(words):
        oq = build_oracle_query(gemma_tokenizer, layer=READ_LAYER, question="word " * n_words + "ok?")
        long.append(Query(key=f"long{i}", input_ids=tuple(oq.input_ids), n=2, vectors_KD=acts_BD[i][None],
                          positions_K=tuple(oq.placeholder_positions)))
    decoding = greedy(12)
    assert max(len(q.input_ids) for q in long) + decoding.max_new_tokens > window
    assert (max(len(q.input_ids) for q in long) > window) == (words[0] > 500)
    assert tokens(fast(tiny_oracle, gemma_tokenizer, long, decoding, rows=3)) == \
        tokens(plain(tiny_oracle, gemma_tokenizer, long, decoding))


def test_a_prompt_pass_gives_hfs_own_logits_and_kv(tiny_oracle, gemma_tokenizer, acts_BD, greedy):
    """The prompt pass with the step's own masks and prompt buffer against HF's forward (its own masks and
    ``DynamicCache``) on the same left-padded batch, injection on: the last logits and every layer's KV bit for bit,
    with one prompt longer than the tiny model's 512-token window (its sliding layers' own mask)."""
    from transformers import DynamicCache

    window = tiny_oracle.get_base_model().config.get_text_config(decoder=True).sliding_window
    long = []
    for i, n_words in enumerate((505, 200)):
        oq = build_oracle_query(gemma_tokenizer, layer=READ_LAYER, question="word " * n_words + "ok?")
        long.append(Query(key=f"long{i}", input_ids=tuple(oq.input_ids), n=1, vectors_KD=acts_BD[i][None],
                          positions_K=tuple(oq.placeholder_positions)))
    P = max(len(q.input_ids) for q in long)
    assert P > window
    cpu = torch.device("cpu")
    sampler = Sampler(tiny_oracle, gemma_tokenizer, decoding=greedy(), injection_layer=INJECTION_LAYER,
                      coefficient=COEFFICIENT)
    step = decode_step.SlotStep(tiny_oracle, 2, P, 4, sliding_window=window, device=cpu)
    with torch.inference_mode():
        mask_QP, logits_QV = sampler.prefill(long, step, cpu)
        ids_QP, hf_mask_QP = left_pad([q.input_ids for q in long], gemma_tokenizer.pad_token_id, length=P)
        hf_cache = DynamicCache()
        with sampler_module.injection_for_rows(tiny_oracle, long, P, cpu, INJECTION_LAYER, COEFFICIENT):
            out = tiny_oracle(input_ids=ids_QP, attention_mask=hf_mask_QP,
                              position_ids=position_ids_from_mask(hf_mask_QP), use_cache=True, logits_to_keep=1,
                              **decode_step.cache_kwargs(tiny_oracle, hf_cache))
        step.seat(torch.tensor([1, 0]), torch.tensor([0, 1]), mask_QP)

    assert torch.equal(mask_QP, hf_mask_QP)
    assert torch.equal(logits_QV, out.logits[:, -1])
    for (keys_BHSD, values_BHSD), layer in zip(step.kv, hf_cache.layers, strict=True):
        kept = layer.keys.shape[2]  # a sliding layer of HF's cache keeps only the last positions
        assert torch.equal(keys_BHSD[[1, 0], :, P - kept:P], layer.keys)
        assert torch.equal(values_BHSD[[1, 0], :, P - kept:P], layer.values)


def test_without_injection_equals_plain_generate(tiny_oracle, gemma_tokenizer, queries, greedy):
    baseline = [dataclasses.replace(q, vectors_KD=None, positions_K=()) for q in queries]
    assert tokens(fast(tiny_oracle, gemma_tokenizer, baseline, greedy())) == \
        tokens(plain(tiny_oracle, gemma_tokenizer, baseline, greedy()))


def test_a_stages_kv_slots_are_freed_when_it_ends_not_when_the_collector_runs(tiny_oracle, gemma_tokenizer, queries,
                                                                               greedy):
    # The step's buffers hold every row's KV (tens of GB at 27B): a reference cycle would keep them until a full
    # garbage collection, and the next stage of the process (a sweep's next condition) would find the card full.
    gc.collect()
    gc.disable()
    try:
        fast(tiny_oracle, gemma_tokenizer, queries, greedy(), rows=3)
        alive = [o for o in gc.get_objects() if isinstance(o, decode_step.SlotStep)]
    finally:
        gc.enable()
    assert alive == []


def test_a_refill_mixing_injected_and_plain_queries_is_refused(tiny_oracle, gemma_tokenizer, queries, greedy):
    mixed = [queries[0], dataclasses.replace(queries[1], vectors_KD=None, positions_K=())]
    with pytest.raises(ValueError, match="mixes"):
        fast(tiny_oracle, gemma_tokenizer, mixed, greedy())


# ---------------------------------------------------------------------------------------------------------------------
# A random stream per sample


def test_same_seed_same_samples_other_seed_other_samples(tiny_oracle, gemma_tokenizer, queries, sampled):
    first = tokens(fast(tiny_oracle, gemma_tokenizer, queries, sampled(seed=0)))
    again = tokens(fast(tiny_oracle, gemma_tokenizer, queries, sampled(seed=0)))
    other = tokens(fast(tiny_oracle, gemma_tokenizer, queries, sampled(seed=1)))
    assert first == again
    assert first != other
    assert first["q0"][0] != first["q0"][1], "the n samples of one query are drawn independently"


def test_a_samples_answer_does_not_depend_on_the_row_count(tiny_oracle, gemma_tokenizer, acts_BD, sampled):
    """Rows 3, 7 and 64: other neighbours, other refills, other slots; the same answers (each sample's draws come
    from its own stream). Before, one generator per batch gave 0 of 24 equal answers across these row counts."""
    four = make_queries(gemma_tokenizer, acts_BD, n=8)
    by_rows = [tokens(fast(tiny_oracle, gemma_tokenizer, four, sampled(max_new_tokens=10), rows=rows))
               for rows in (3, 7, 64)]
    assert by_rows[0] == by_rows[1] == by_rows[2]
    assert len({tuple(t) for v in by_rows[0].values() for t in v}) > 12, "the samples are not all alike"


def test_a_sample_keeps_its_answer_whatever_else_is_sampled(tiny_oracle, gemma_tokenizer, queries, sampled):
    """What a resume does: the runs not yet journaled are sampled again, without the ones that were. A kill after
    the first query's answers, then the rest: the same answers as the uninterrupted run."""
    decoding = sampled(max_new_tokens=8)
    whole = tokens(fast(tiny_oracle, gemma_tokenizer, queries, decoding, rows=3))

    class Killed(Exception):
        pass

    journaled: dict[str, list[Sample]] = {}

    def journal_then_die(key: str, samples: list[Sample]) -> None:
        journaled[key] = samples
        raise Killed

    sampler = Sampler(tiny_oracle, gemma_tokenizer, decoding=decoding, injection_layer=INJECTION_LAYER,
                      coefficient=COEFFICIENT, rows=3)
    with pytest.raises(Killed):
        sampler.run(queries, on_answers=journal_then_die, progress=False)
    assert len(journaled) == 1
    rest = fast(tiny_oracle, gemma_tokenizer, [q for q in queries if q.key not in journaled], decoding, rows=5)
    assert tokens({**journaled, **rest}) == whole


def test_the_injected_vector_changes_the_answer(tiny_oracle, gemma_tokenizer, acts_BD, greedy_reference, greedy):
    # Another target's activation in q0's placeholder: a different greedy answer.
    swapped = make_queries(gemma_tokenizer, acts_BD, vectors={0: acts_BD[1]})
    result = tokens(fast(tiny_oracle, gemma_tokenizer, swapped[:1], greedy()))
    assert result["q0"] != greedy_reference["q0"]


# ---------------------------------------------------------------------------------------------------------------------
# A stand-in with the real oracle's answer lengths


def test_answer_lengths_end_each_sample_with_a_sampled_stop_token(tiny_oracle, gemma_tokenizer, queries, sampled):
    """Each sample ends on <end_of_turn> at its own length; before it, the tokens are exactly those the same sample
    draws without a length (its stream is the same), so the stop token replaced a draw, at that step only."""
    decoding = sampled(max_new_tokens=10)
    free = tokens(fast(tiny_oracle, gemma_tokenizer, queries, decoding, rows=4))
    lengths = {"q0": (1, 4), "q1": (10, 7), "q2": (3, 12)}  # 12 > max_new_tokens: capped, ends by length
    capped = [dataclasses.replace(q, answer_lengths=lengths[q.key]) for q in queries]

    result = fast(tiny_oracle, gemma_tokenizer, capped, decoding, rows=4)

    end_of_turn = gemma_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    for key, samples in result.items():
        for sample, length, drawn in zip(samples, lengths[key], free[key]):
            if length <= decoding.max_new_tokens:
                assert sample.token_ids == drawn[:length - 1] + [end_of_turn], (key, length)
                assert sample.finish_reason == "eos"
            else:
                assert sample.token_ids == drawn and sample.finish_reason == "length"


def test_make_sample_finish_reason_and_text(gemma_tokenizer):
    stop_ids = stop_token_ids(gemma_tokenizer)
    end_of_turn = gemma_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in stop_ids and gemma_tokenizer.eos_token_id in stop_ids
    hello = gemma_tokenizer(" Hello there", add_special_tokens=False)["input_ids"]

    ended = make_sample(gemma_tokenizer, hello + [end_of_turn], stop_ids)
    assert ended.finish_reason == "eos" and ended.text == " Hello there" and ended.n_tokens == len(hello) + 1
    cut = make_sample(gemma_tokenizer, hello, stop_ids)
    assert cut.finish_reason == "length" and cut.text == " Hello there"  # as decoded, not stripped
    assert make_sample(gemma_tokenizer, [], stop_ids).finish_reason == "length"


@pytest.mark.parametrize(
    "generated, expected",
    [
        pytest.param([5, 106, 0, 0], [5, 106], id="stopped_then_padded"),
        pytest.param([5, 1, 9, 9], [5, 1], id="stopped_on_eos"),
        pytest.param([5, 7, 9], [5, 7, 9], id="ran_to_length"),
        pytest.param([106], [106], id="stopped_at_once"),
        # generate pads only rows that stopped; a row without a stop token generated its trailing <pad> itself.
        pytest.param([5, 0, 0], [5, 0, 0], id="ran_to_length_ending_in_pad_tokens"),
    ],
)
def test_until_stop(generated, expected):
    assert until_stop(generated, [1, 106], pad_id=0) == expected


def test_sample_sequential_returns_n_samples_per_query(tiny_oracle, gemma_tokenizer, queries, greedy, sampled):
    three = [dataclasses.replace(q, n=3) for q in queries[:2]]
    result = sample_sequential(tiny_oracle, gemma_tokenizer, three, injection_layer=INJECTION_LAYER,
                               coefficient=COEFFICIENT, decoding=sampled(max_new_tokens=4))
    assert list(result) == ["q0", "q1"]
    assert all(len(v) == 3 and all(1 <= s.n_tokens <= 4 for s in v) for v in result.values())
    greedy_sequential = sample_sequential(tiny_oracle, gemma_tokenizer, queries[:2], injection_layer=INJECTION_LAYER,
                                          coefficient=COEFFICIENT, decoding=greedy(4))
    assert tokens(greedy_sequential) == tokens(fast(tiny_oracle, gemma_tokenizer, queries[:2], greedy(4)))


# ---------------------------------------------------------------------------------------------------------------------
# Real Gemma 3 270M, end to end on CPU


@pytest.mark.slow
def test_gemma270m_end_to_end(gemma270m_oracle, gemma_tokenizer, shared_data):
    import json

    oracle, tok = gemma270m_oracle, gemma_tokenizer
    layer = layer_at_percent(num_layers(oracle), 50)
    assert layer == 9
    targets = json.loads((shared_data / "target_model_queries.json").read_text())[:3]
    encoded = [encode_target(tok, t["messages"], target_id=t["id"]) for t in targets]
    acts_BD = capture_activations(oracle, [e.input_ids for e in encoded], [e.assistant_start_idx for e in encoded],
                                  layer, tok.pad_token_id)
    assert acts_BD.shape == (3, oracle.get_base_model().config.hidden_size) and torch.isfinite(acts_BD).all()

    oq = build_oracle_query(tok, layer=layer, question="What is the assistant's persona?")
    queries = [Query(key=t["id"], input_ids=tuple(oq.input_ids), n=2, vectors_KD=acts_BD[i][None],
                     positions_K=tuple(oq.placeholder_positions)) for i, t in enumerate(targets)]
    # 8 tokens: each decode step of the real 270M reads its 0.7 GB of float32 weights (~0.13 s here), and 6 samples
    # on 4 rows still refill two of them.
    decoding = decoding_of(oracle, temperature=0.7, max_new_tokens=8)
    assert (decoding.top_k, decoding.eos_token_ids) == (64, (1, 106)), "Gemma 3 instruct's generation_config"
    sampler = Sampler(oracle, tok, decoding=decoding, injection_layer=INJECTION_LAYER, coefficient=COEFFICIENT, rows=4)
    result = sampler.run(queries, progress=False)
    assert sampler.layout.refills >= 2, "rows freed by answers were filled again (the first fill counts one)"
    assert sorted(result) == sorted(t["id"] for t in targets)
    for samples in result.values():
        assert len(samples) == 2
        assert all(1 <= s.n_tokens <= 8 for s in samples), [s.text for s in samples]
        assert all(s.finish_reason == ("eos" if s.token_ids[-1] in (1, 106) else "length") for s in samples)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding = HF generate's: the model's generation_config merged with the run's settings


def hf_warped_probs(model, input_ids_BL: torch.Tensor, logits_BV: torch.Tensor, **generate_kwargs) -> torch.Tensor:
    """What HF generate samples from: its own merge of generate's kwargs over model.generation_config and its
    defaults, its own logits processors, softmax."""
    from transformers import LogitsProcessorList

    config, _ = model._prepare_generation_config(None, **generate_kwargs)
    processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=input_ids_BL.shape[1],
                                             encoder_input_ids=input_ids_BL, prefix_allowed_tokens_fn=None,
                                             logits_processor=LogitsProcessorList(), device=logits_BV.device,
                                             model_kwargs={})
    return processors(input_ids_BL, logits_BV.float()).softmax(-1)


def decode_steps_logits(model, queries, steps: int):
    """(input_ids, next-token logits) at each of ``steps`` greedy steps, for each query alone (no padding)."""
    out = []
    for q in queries:
        ids_1L = torch.tensor([q.input_ids])
        for _ in range(steps):
            logits_1V = model(input_ids=ids_1L).logits[:, -1]
            out.append((ids_1L, logits_1V))
            ids_1L = torch.cat([ids_1L, logits_1V.argmax(-1, keepdim=True)], dim=1)
    return out


def boundary_margin(scaled_V: torch.Tensor, tokens_V: torch.Tensor, top_p: float) -> float:
    """How far the 'mass above' of the given tokens is from top_p (0 when there are none)."""
    if not tokens_V.any():
        return 0.0
    probs_V = scaled_V.double().softmax(-1)
    above_V = torch.stack([probs_V[probs_V > probs_V[t]].sum() for t in tokens_V.nonzero().squeeze(-1)])
    return (above_V - top_p).abs().max().item()


@pytest.mark.parametrize("model_top_k,run_top_k", [(1, None), (64, None), (None, None), (64, 0), (64, 7)],
                         ids=["model_k1", "model_k64", "model_none_hf_default", "run_k0_off", "run_k7"])
def test_each_steps_kept_set_and_probabilities_are_hf_generates(tiny_oracle, gemma_tokenizer, queries, model_top_k,
                                                                run_top_k, monkeypatch):
    from ao_resampling.engine.decoding.nucleus import sampling_weights

    base = tiny_oracle.get_base_model()
    monkeypatch.setattr(base.generation_config, "top_k", model_top_k)
    monkeypatch.setattr(base.generation_config, "top_p", 0.95)  # the model's; the run's 0.9 wins, as in HF
    sampling = decoding_of(tiny_oracle, temperature=0.7, max_new_tokens=4, top_k=run_top_k)
    run_kwargs = dict(do_sample=True, temperature=0.7, top_p=0.9) | ({} if run_top_k is None else {"top_k": run_top_k})

    with torch.inference_mode():
        for ids_1L, logits_1V in decode_steps_logits(base, queries[:2], steps=3):
            ours_1V = sampling_weights(logits_1V, temperature=0.7, top_p=0.9, top_k=sampling.top_k)
            hf_1V = hf_warped_probs(base, ids_1L, logits_1V, **run_kwargs)
            differ_V = ((ours_1V > 0) ^ (hf_1V > 0))[0]
            if sampling.top_k:
                assert not differ_V.any(), "kept token sets differ"
            else:  # 262k near-flat probabilities: only float rounding of the cumulative mass may move the boundary
                assert boundary_margin(logits_1V[0] / 0.7, differ_V, 0.9) < 1e-4, "kept token sets differ"
            torch.testing.assert_close(ours_1V[0, ~differ_V], hf_1V[0, ~differ_V], rtol=1e-4, atol=1e-8)
    expected_k = {None: 50 if model_top_k is None else model_top_k}.get(run_top_k, run_top_k)
    assert sampling.top_k == expected_k


def test_top_k_1_in_the_generation_config_makes_every_sample_the_same(tiny_oracle, gemma_tokenizer, queries,
                                                                      monkeypatch):
    """The issue's reproduction: HF generate with top_k 1 gives n identical answers; so must the sampler."""
    monkeypatch.setattr(tiny_oracle.get_base_model().generation_config, "top_k", 1)
    decoding = decoding_of(tiny_oracle, temperature=0.7, max_new_tokens=6)
    assert decoding.top_k == 1
    four = [dataclasses.replace(q, n=4) for q in queries[:2]]
    result = tokens(fast(tiny_oracle, gemma_tokenizer, four, decoding))
    assert all(len({tuple(t) for t in rows}) == 1 for rows in result.values()), result
    assert result == tokens(plain(tiny_oracle, gemma_tokenizer, four, decoding))


# ---------------------------------------------------------------------------------------------------------------------
# A stand-in whose answers end at EOS on their own (loading/end_gate.py)


_ENDING: dict[str, torch.nn.Module] = {}


def ending(tokenizer, kind: str) -> torch.nn.Module:
    """A fresh tiny oracle whose <end_of_turn> wins ~5% of its decode steps (built once per kind). "peaked": its
    final norm scaled up so that, like the 27B random model's, every step puts >= 90% on one token (top-p 0.9 then
    keeps only it, and a stop-token bias calibrated elsewhere never gets drawn)."""
    from ao_resampling.engine.loading.adapters import attach_oracle
    from ao_resampling.engine.loading.end_gate import end_answers_at_rate
    from ao_resampling.engine.loading.models import load_model

    if kind not in _ENDING:
        model = attach_oracle(load_model("synthetic:tiny", dtype="float32", device="cpu"), "random", seed=0)
        if kind == "peaked":
            with torch.no_grad():
                model.get_base_model().model.norm.weight += 1000.0
        end_answers_at_rate(model, (1, 106), rate=0.05)
        _ENDING[kind] = model
    return _ENDING[kind]


@pytest.fixture(scope="module", params=["flat", "peaked"])
def ending_oracle(gemma_tokenizer, request):
    return ending(gemma_tokenizer, request.param)


def test_a_stand_in_in_eos_mode_ends_answers_at_varied_lengths(ending_oracle, gemma_tokenizer, queries):
    eight = [dataclasses.replace(q, n=8) for q in queries]
    result = fast(ending_oracle, gemma_tokenizer, eight, decoding_of(ending_oracle, temperature=0.7,
                                                                     max_new_tokens=60))
    samples = [s for v in result.values() for s in v]
    lengths = [s.n_tokens for s in samples]
    assert sum(s.finish_reason == "eos" for s in samples) >= len(samples) // 2, lengths
    assert all(s.token_ids[-1] == 106 for s in samples if s.finish_reason == "eos")
    # Spread out, not one forced length. A peaked model draws one answer per query (top-p keeps one token a step),
    # so its samples share a length: the spread is then across the three queries, as across the 27B stand-in's.
    assert len(set(lengths)) >= (len(queries) if ending_oracle is _ENDING.get("peaked") else 6), lengths
    assert min(lengths) < 15, lengths


def test_the_peaked_stand_in_keeps_one_token_under_top_p(gemma_tokenizer):
    """The case a calibrated stop-token bias could not serve (0 of 10,000 answers ended on the H200)."""
    from ao_resampling.engine.decoding.nucleus import sampling_weights

    model = ending(gemma_tokenizer, "peaked")
    ids_1L = torch.tensor([gemma_tokenizer("Hello there, how are you today my friend?").input_ids])
    out = model.generate(input_ids=ids_1L, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=40,
                         min_new_tokens=40, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    kept_T = (sampling_weights(torch.cat(out.logits).float(), temperature=0.7, top_p=0.9, top_k=64) > 0).sum(-1)
    assert (kept_T == 1).float().mean() > 0.9, kept_T.tolist()


def test_a_stand_in_in_eos_mode_still_decodes_as_plain_generate(ending_oracle, gemma_tokenizer, queries):
    """Greedily the gate may or may not open at a step; whatever it does, the sampler and HF generate agree."""
    decoding = decoding_of(ending_oracle, temperature=0, max_new_tokens=40)
    assert tokens(fast(ending_oracle, gemma_tokenizer, queries, decoding, rows=4)) == \
        tokens(plain(ending_oracle, gemma_tokenizer, queries, decoding))


def test_decoding_passes_the_cache_under_the_name_this_transformers_takes(tiny_oracle, gemma_tokenizer, queries,
                                                                          greedy):
    """transformers 5.24 renamed the forward's past_key_values= to cache= (the old name warns, and goes in 5.40);
    5.17 knows only the old one. Neither the sampler nor the reference may use a deprecated name."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast(tiny_oracle, gemma_tokenizer, queries[:1], greedy(3))
        plain(tiny_oracle, gemma_tokenizer, queries[:1], greedy(3))
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
