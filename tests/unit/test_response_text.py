"""Answers are stored as decoded (the reference kept them so, and its judge saw them so); files from before, whose
answers were stored ``.strip()``ped, still load and say so."""

from __future__ import annotations

import json

import pytest

from ao_resampling.stages.common.sampling import to_responses
from ao_resampling.results import Decoding, Response, Results
from ao_resampling.engine.decoding.sampler import Sample, make_sample

from tests.support.results_factory import make_results

DECODING = Decoding(temperature=0.7, top_p=0.9, max_new_tokens=120, seed=0)
DECODED = " The assistant is a pirate.\n"  # what a Gemma answer decodes to: a leading space, a trailing newline


class FakeTokenizer:
    """decode() gives a fixed text, whatever the ids (no model, no files)."""

    def decode(self, token_ids, skip_special_tokens=False):
        assert skip_special_tokens
        return DECODED


@pytest.mark.parametrize("token_ids, finish", [pytest.param([5, 6, 106], "eos", id="stopped"),
                                               pytest.param([5, 6, 7], "length", id="cut_off")])
def test_a_sample_keeps_the_decoded_text_as_it_is(token_ids, finish):
    sample = make_sample(FakeTokenizer(), token_ids, stop_ids=[1, 106])
    assert sample.text == DECODED and sample.finish_reason == finish


def test_responses_store_the_text_as_decoded_and_record_it():
    stored = to_responses("run__t1__q1", [Sample(token_ids=[5, 6, 106], text=DECODED, finish_reason="eos")], DECODING)
    response = Response.model_validate(json.loads(json.dumps(stored[0])))  # through the JSON a journal holds
    assert response.text == DECODED and response.text_stripped is False
    assert response.stripped == DECODED.strip()


def test_a_file_written_before_the_field_loads_with_its_text_marked_stripped():
    data = make_results([[5]]).model_dump(mode="json")
    for run in data["runs"]:
        for response in run["responses"]:
            del response["text_stripped"]  # as today's files are written
    results = Results.model_validate(data)
    assert all(r.text_stripped for run in results.runs for r in run.responses)
    assert results.runs[0].responses[0].text == data["runs"][0]["responses"][0]["text"]
