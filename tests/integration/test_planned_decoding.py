"""meta.decoding is the decoding the answers were drawn with: planned from the model's files, checked on load."""

from __future__ import annotations

import pytest

from ao_resampling import pipeline
from ao_resampling.errors import PipelineError
from ao_resampling.stages.generate import generate
from ao_resampling.stages.common.sampling import load_oracle
from ao_resampling.stages.plan import prepare
from ao_resampling.config import build_config
from ao_resampling.results import load_results_file


def tiny(tmp_path, **overrides):
    settings = dict(model="synthetic:tiny", oracle_lora="random", dtype="float32", device="cpu", num_targets=2,
                    num_questions=1, samples_per_query=2, max_new_tokens=2, judge=False, embedding_model="none")
    return build_config(preset="experiment", overrides={**settings, **overrides})


@pytest.mark.parametrize("top_k, expected", [(None, 64), (5, 5), (0, 0)], ids=["model's", "run's", "off"])
def test_meta_and_every_response_record_the_effective_decoding(tmp_path, top_k, expected):
    config = tiny(tmp_path, top_k=top_k)
    pipeline.run_experiment(config, tmp_path / "run", progress=False, log=lambda _: None)
    results = load_results_file(tmp_path / "run" / "results.json")
    meta = results.meta.decoding
    # synthetic stand-ins carry google/gemma-3-27b-it's generation_config: top_k 64, eos [1, 106]
    assert (meta.top_k, meta.eos_token_ids) == (expected, (1, 106))
    assert all(r.decoding == meta for run in results.runs for r in run.responses)


def test_a_model_that_decodes_otherwise_than_planned_is_refused(tmp_path):
    config = tiny(tmp_path)
    store, _ = prepare(config, tmp_path / "run")
    oracle = load_oracle(config)
    oracle.model.get_base_model().generation_config.top_k = 3  # as if its generation_config.json had been edited
    with pytest.raises(PipelineError, match="'top_k': 3"):
        generate(store, config, oracle=oracle, progress=False)


def test_the_run_records_how_it_decoded(tmp_path, monkeypatch):
    """meta.decode_layout: the rows the step held (sized on the CPU: at most the samples), the processes, and where
    the stage's time went outside the decode steps, each piece slowed here by a known amount: each journal write
    0.2 s, the prompt pass 0.3 s, the LoRA merge (entering the stage) 0.25 s, the restore (leaving it) 0.35 s."""
    import contextlib
    import time

    from ao_resampling.engine.decoding import sampler
    from ao_resampling.store import ResultsStore

    def slowed(function, seconds, *, after=False):
        def slow(*args, **kwargs):
            if not after:
                time.sleep(seconds)
            out = function(*args, **kwargs)
            if after:
                time.sleep(seconds)
            return out
        return slow

    record = ResultsStore.record

    def slow_record(self, events):
        if any(e.type == "responses" for e in events):
            time.sleep(0.2)
        record(self, events)

    monkeypatch.setattr(ResultsStore, "record", slow_record)
    monkeypatch.setattr(sampler.Sampler, "prefill", slowed(sampler.Sampler.prefill, 0.3))
    merged_lora = sampler.merged_lora

    @contextlib.contextmanager
    def slow_merged_lora(model, **kwargs):
        time.sleep(0.25)
        with merged_lora(model, **kwargs):
            yield
        time.sleep(0.35)

    monkeypatch.setattr(sampler, "merged_lora", slow_merged_lora)
    config = tiny(tmp_path)
    pipeline.run_experiment(config, tmp_path / "run", progress=False, log=lambda _: None)
    layout = load_results_file(tmp_path / "run" / "results.json").meta.decode_layout
    assert layout["batch_rows"] == 4 and layout["batch_rows_setting"] == "auto"  # 2 runs x 2 samples
    assert (layout["processes"], layout["device"], layout["runs_sampled"]) == (1, "cpu", 2)
    assert 0.4 <= layout["journal_s"] < 1.0  # two runs journaled, 0.2 s each
    assert 0.3 <= layout["prompt_s"] < 0.9
    assert 0.25 <= layout["setup_s"] < 0.9 and 0.35 <= layout["teardown_s"] < 1.0
    assert layout["capture_s"] == 0.0 and layout["triton_kernels"] == []  # a CPU: no graphs, torch's kernels
    assert layout["prompt_passes"] == 1  # both queries' prompts in one block


def test_a_stand_in_with_answer_lengths_ends_its_answers_at_the_real_oracles_lengths(tmp_path, shared_data):
    """Every answer ends on <end_of_turn> (drawn, not appended) at a length the real oracle's answers had."""
    import json

    path = shared_data / "ao_answer_lengths.json"
    real_lengths = {int(k) for k, v in json.loads(path.read_text())["counts_by_length"].items() if v}
    config = tiny(tmp_path, answer_lengths=path, max_new_tokens=60, num_targets=3, samples_per_query=4)
    pipeline.run_experiment(config, tmp_path / "run", progress=False, log=lambda _: None)
    results = load_results_file(tmp_path / "run" / "results.json")
    answers = [r for run in results.runs for r in run.responses]
    assert len(answers) == 12 and all(r.finish_reason == "eos" for r in answers)
    assert {r.n_tokens for r in answers} <= real_lengths and len({r.n_tokens for r in answers}) > 3
    assert "answer" in results.meta.note and str(path) in results.meta.note, "flagged as a stand-in's numbers"


def test_answer_lengths_are_refused_with_real_weights(tmp_path, shared_data):
    from ao_resampling.config import ConfigError

    with pytest.raises(ConfigError, match="answer_lengths"):
        build_config(overrides={"answer_lengths": shared_data / "ao_answer_lengths.json"})


def test_a_run_keeps_the_merge_of_a_model_it_loaded_and_restores_one_it_was_given(tmp_path, monkeypatch):
    """The generate stage is the last use of a model the run loaded (no copy of the base weights is needed); a
    model passed in (a sweep's, used again by its next condition) gets its base weights back."""
    from ao_resampling.engine.loading.adapters import LORA_MERGED_FOR_GOOD

    loaded = []
    load = pipeline.load_oracle
    monkeypatch.setattr(pipeline, "load_oracle", lambda config: loaded.append(load(config)) or loaded[-1])
    pipeline.run_experiment(tiny(tmp_path), tmp_path / "own", progress=False, log=lambda _: None)
    given = load(tiny(tmp_path))
    pipeline.run_experiment(tiny(tmp_path), tmp_path / "given", progress=False, log=lambda _: None, oracle=given)

    assert len(loaded) == 1 and getattr(loaded[0].model, LORA_MERGED_FOR_GOOD, False)
    assert not getattr(given.model, LORA_MERGED_FOR_GOOD, False)
