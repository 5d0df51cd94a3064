"""CUDA graphs through the row drops real answers cause: ``pytest -m gpu tests/experiments/test_cuda_graphs.py``.

On CPU the decode step runs eagerly, so the default suite never captures a graph. Real answers stop early and finished
rows are dropped mid-batch; the step then decodes fewer rows of the same buffers (decode_step.py) and needs a graph
for that row count. Here, on the tiny multimodal oracle on the GPU, two batches of the same shape, each dropping rows
twice: answers equal to HF ``generate``'s, every (rows, cut length) captured once in the stage (the second batch
replays the first one's graphs), and never a fallback to eager steps. (An H200 run at full size once fell back at
the first drop of every batch: the released graph pool could not be reopened.)
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import ao_resampling.engine.decoding.decode_step as decode_step
import ao_resampling.engine.decoding.sampler as sampling
from ao_resampling.engine.loading.adapters import attach_oracle
from ao_resampling.engine.loading.models import load_model, load_tokenizer
from ao_resampling.engine.reference import sample_hf_batched
from ao_resampling.engine.decoding.sampler import BatchedSampler, DecodeParams, Query
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


def candidates(tokenizer, question: str) -> list[Query]:
    """One query per vector, all asking ``question`` (one prompt length): prompts to find two early stops among."""
    vectors_VD = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    oq = build_oracle_query(tokenizer, layer=READ_LAYER, question=question)
    return [Query(key=f"c{v}", input_ids=tuple(oq.input_ids), n=1, vectors_KD=vector_D[None].cuda(),
                  positions_K=tuple(oq.placeholder_positions)) for v, vector_D in enumerate(vectors_VD)]


def hf_generate(model, tokenizer, qs, params):
    result = sample_hf_batched(model, tokenizer, qs, injection_layer=INJECTION_LAYER, coefficient=1.0, params=params)
    return {key: [s.token_ids for s in samples] for key, samples in result.items()}


def two_stops(greedy: dict[str, list[int]]):
    """Three queries and two stop ids: the first query ends at step a, the second at a later step b, the third runs
    on (a random model repeats itself, so a token new at step a is searched for). None if there are none."""
    keys = list(greedy)
    for a in range(1, STEPS - 3):
        for k0 in keys:
            stop_a = greedy[k0][a]
            if stop_a in greedy[k0][:a]:
                continue
            for b in range(a + 1, STEPS - 1):
                for k1 in keys:
                    stop_b = greedy[k1][b]
                    stops = {stop_a, stop_b}
                    if k1 == k0 or len(stops) < 2 or stops & set(greedy[k0][:a] + greedy[k1][:b]):
                        continue
                    k2 = next((k for k in keys if k not in (k0, k1) and not stops & set(greedy[k])), None)
                    if k2 is not None:
                        return (k0, a, stop_a), (k1, b, stop_b), k2
    return None


def two_batches_with_two_drops_each(oracle, tokenizer, params):
    """(queries, stop ids, stop steps): two identical batches of 8 rows (4 + 2 + 2); 4 rows stop at step a, 2 more
    at step b, 2 run on."""
    for question in QUESTIONS:
        pool = {q.key: q for q in candidates(tokenizer, question)}
        reference = hf_generate(oracle, tokenizer, list(pool.values()), params)
        found = two_stops({k: v[0] for k, v in reference.items()})
        if found:
            (k0, a, stop_a), (k1, b, stop_b), k2 = found
            batch = [dataclasses.replace(pool[k], n=n) for k, n in ((k0, 4), (k1, 2), (k2, 2))]
            again = [dataclasses.replace(q, key="z" + q.key) for q in batch]  # sorted after: the second batch
            return batch + again, (stop_a, stop_b), (a, b)
    pytest.fail("the random oracle repeats itself: no two stop ids give two drops")


def test_graphs_are_captured_once_per_row_count_and_replayed_by_the_next_batch(oracle, tokenizer, monkeypatch):
    assert oracle.config.get_text_config(decoder=True).hidden_size == 64, "candidates() draws 64-wide vectors"
    params = DecodeParams(temperature=0, top_p=0.9, max_new_tokens=STEPS)
    queries, stops, (a, b) = two_batches_with_two_drops_each(oracle, tokenizer, params)
    params = dataclasses.replace(params, eos_token_ids=stops)

    monkeypatch.setattr(sampling, "SYNC_EVERY", 1)  # look for finished rows after every step
    steps, captured, replays = [], [], []
    step_init, capture = decode_step.StaticDecodeStep.__init__, decode_step.StaticDecodeStep._run_then_capture
    monkeypatch.setattr(decode_step.StaticDecodeStep, "__init__",
                        lambda self, *a, **k: steps.append(self) or step_init(self, *a, **k))
    monkeypatch.setattr(decode_step.StaticDecodeStep, "_run_then_capture",
                        lambda self, cut: captured.append((self.rows, cut)) or capture(self, cut))
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or replay(self))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = BatchedSampler(oracle, tokenizer, injection_layer=INJECTION_LAYER, coefficient=1.0, params=params,
                              max_rows=8, attention="gqa", cuda_graphs=True).run(queries, progress=False)

    assert not [w for w in caught if "without CUDA graphs" in str(w.message)], [str(w.message) for w in caught]
    assert {k: [s.token_ids for s in v] for k, v in fast.items()} == hf_generate(oracle, tokenizer, queries, params)
    assert [s.n_tokens for q in queries for s in fast[q.key]] == ([a + 1] * 4 + [b + 1] * 2 + [STEPS] * 2) * 2
    (step,) = steps
    assert step.use_graphs, "still decoding through graphs at the end"
    assert {rows for rows, _ in captured} == {8, 4, 2}, "graphs for all rows, then after each drop"
    assert len(set(captured)) == len(captured), "each (rows, cut length) captured once: the second batch replays"
    decode_calls = 2 * (STEPS - 1)  # per batch: a forward for every token after the first
    assert len(replays) == decode_calls - len(captured)
