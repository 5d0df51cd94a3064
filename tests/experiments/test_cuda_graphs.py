"""CUDA graphs of the decode step through refills and the tail's compactions (``pytest -m gpu``; the tiny multimodal
oracle on CUDA, seconds).

The step decodes a fixed number of rows, each holding one sample at its own position; samples end at varied lengths
(the answer-length stand-in: the stop token wins at a chosen token), their rows take the next samples, and once the
queue is empty the live rows move onto the ladder's row counts. Every (rows, cut length) must be captured once and
replayed after, never falling back to eager; the answers must be HF ``generate``'s, token for token up to each
sample's end.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import ao_resampling.engine.decoding.decode_step as decode_step
import ao_resampling.engine.decoding.sampler as sampler_module
from ao_resampling.engine.decoding.sampler import Query, Sampler
from ao_resampling.engine.decoding.settings import model_generation_config, resolve_decoding
from ao_resampling.engine.loading.adapters import attach_oracle
from ao_resampling.engine.loading.models import load_model, load_tokenizer
from ao_resampling.engine.reference import sample_hf_batched
from ao_resampling.inputs.oracle import build_oracle_query
from tests.experiments.conftest import option

pytestmark = pytest.mark.gpu

INJECTION_LAYER, READ_LAYER = 1, 2
QUESTIONS = ["What is the persona?", "Is the user asking about the weather, and if so, in which city?", "Colour?"]
STEPS = 12


@pytest.fixture(scope="module")
def oracle():
    if not torch.cuda.is_available():
        pytest.fail("needs CUDA: this test is about CUDA graphs", pytrace=False)
    return attach_oracle(load_model("synthetic:tiny-multimodal", dtype="float32", device="cuda", seed=6), "random",
                         seed=0)


@pytest.fixture(scope="module")
def tokenizer(request):
    return load_tokenizer(option(request.config, "--ao-tokenizer") or "gemma3-270m-gguf")


def queries(tokenizer) -> list[Query]:
    """Three prompt lengths, 4 samples each, ending at 12 different lengths (some run to max_new_tokens)."""
    vectors_QD = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    lengths = [(2, 5, 9, 40), (3, 3, 12, 7), (1, 40, 6, 10)]
    out = []
    for i, question in enumerate(QUESTIONS):
        oq = build_oracle_query(tokenizer, layer=READ_LAYER, question=question)
        out.append(Query(key=f"q{i}", input_ids=tuple(oq.input_ids), n=4, vectors_KD=vectors_QD[i][None].cuda(),
                         positions_K=tuple(oq.placeholder_positions), answer_lengths=lengths[i]))
    return out


def test_graphs_are_captured_once_per_row_count_through_refills_and_compactions(oracle, tokenizer, monkeypatch):
    decoding = resolve_decoding(model_generation_config(oracle), temperature=0, top_p=0.9, top_k=None,
                                max_new_tokens=STEPS, seed=0, fallback_eos=[1, 106])
    qs = queries(tokenizer)
    captured, replays = [], []
    capture = decode_step.SlotStep._run_then_capture
    monkeypatch.setattr(decode_step.SlotStep, "_run_then_capture",
                        lambda self, cut: captured.append((self.rows, cut)) or capture(self, cut))
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or replay(self))
    monkeypatch.setattr(sampler_module, "GRAPH_MIN_ROWS", 1)  # 4 rows: the tail shrinks under graphs here too
    sampler = Sampler(oracle, tokenizer, decoding=decoding, injection_layer=INJECTION_LAYER, coefficient=1.0, rows=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = sampler.run(qs, progress=False)

    assert not [w for w in caught if "without CUDA graphs" in str(w.message)], [str(w.message) for w in caught]
    free = [dataclasses.replace(q, answer_lengths=None) for q in qs]
    reference = sample_hf_batched(oracle, tokenizer, free, injection_layer=INJECTION_LAYER, coefficient=1.0,
                                  decoding=decoding)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    for q in qs:
        for sample, length, hf in zip(fast[q.key], q.answer_lengths, reference[q.key]):
            expected = hf.token_ids[:length - 1] + [end_of_turn] if length <= STEPS else hf.token_ids
            assert sample.token_ids == expected, (q.key, length)
    assert sampler.layout.refills > 1, "rows were refilled"
    assert 4 in {rows for rows, _ in captured}, "graphs for the full step (and any rung the tail shrank to)"
    assert len(set(captured)) == len(captured), "each (rows, cut length) captured once, then replayed"
    assert len(replays) == sampler.layout.decode_steps - len(captured)
