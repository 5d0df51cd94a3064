"""The pipeline's wiring, checked against an independent computation in plain Hugging Face / torch.

Every other end-to-end test compares two paths of this package that share its wiring (which layer is read, at
which token, where the vector goes, what the prompt says), so a wiring mistake shared by both passes unnoticed. Here
one real ``pipeline.run_experiment`` (greedy: ``temperature = 0``) writes a results.json on the real experiment's
targets and questions, and each of its runs is recomputed with code written in this file alone, from the AO
recipe, without ao_resampling's encoding / oracle / hooks / sampling helpers:

- context ids = ``apply_chat_template(messages, add_generation_prompt=True)``; ``assistant_start_idx`` = the length
  of the same without the generation prompt;
- the activation = ``hidden_states[read_layer + 1][assistant_start_idx]`` of the base model (adapter disabled),
  ``read_layer = int(num_layers * 0.5)``;
- the oracle prompt = ``"Layer: {read_layer}\\n" + " ?" * k + " \\n" + question`` as the only user turn + the
  generation prompt; the placeholders = the first k ``" ?"`` tokens;
- the greedy answer = ``model.generate(do_sample=False)`` with a plain forward hook on decoder layer
  ``injection_layer`` doing ``h[p] += normalize(v) * ||h[p]|| * c`` on the prompt pass only.

results.json does not keep the activation, so the one the pipeline computed is observed by wrapping
``stages.generate.capture_targets`` (the wrapper returns its result unchanged); the answers, which depend on it, are
compared too. The model object is the one the pipeline loaded (a random LoRA is not reproducible across loads).
The spec list is the place to add another model class (a multimodal stand-in joins as soon as it exists).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from ao_resampling import pipeline
from ao_resampling.engine.loading import models
from ao_resampling.stages import generate as generate_stage
from ao_resampling.config import build_config

MULTIMODAL_SPEC = "synthetic:tiny-multimodal"  # the tiny Gemma3ForConditionalGeneration stand-in (issue 17, point 2)


# Per model: targets x questions and answer length. Real 270M weights cost ~2 s a token on this CPU, so fewer.
GRID = {"synthetic:tiny": (3, 2, 10), "gemma3-270m-gguf": (2, 2, 8), MULTIMODAL_SPEC: (3, 2, 10)}


def _model_specs() -> list:
    specs = [pytest.param("synthetic:tiny", id="tiny"),
             pytest.param("gemma3-270m-gguf", id="gemma3-270m", marks=pytest.mark.slow)]
    try:  # covered from the day the package knows it; no skip while it does not exist
        models.check_resolvable(MULTIMODAL_SPEC)
    except models.ModelLoadError:
        return specs
    return specs + [pytest.param(MULTIMODAL_SPEC, id="tiny-multimodal")]


@dataclass(frozen=True)
class PipelineRun:
    spec: str
    config: object  # the ExperimentConfig it ran with
    results: dict  # results.json as written, read as plain JSON
    model: torch.nn.Module  # the oracle the pipeline loaded (base + LoRA), after the run
    acts: dict[str, torch.Tensor]  # target_id -> the activations the pipeline captured (acts_KD, K read positions)


@pytest.fixture(scope="module", params=_model_specs())
def pipeline_run(request, shared_data, tmp_path_factory) -> PipelineRun:
    spec = request.param
    num_targets, num_questions, max_new_tokens = GRID[spec]
    config = build_config(preset="experiment", overrides=dict(
        model=spec, oracle_lora="random", dtype="float32", device="cpu",
        targets=shared_data / "target_model_queries.json", questions=shared_data / "sycophancy_questions.json",
        num_targets=num_targets, num_questions=num_questions, samples_per_query=2, max_new_tokens=max_new_tokens,
        temperature=0.0, judge=False, embedding_model="none", bootstrap_resamples=100,
    ))
    # The run is given the oracle (loaded as the pipeline loads it): a model the run loads itself ends the generate
    # stage with the LoRA merged into its weights for good, and the checks below need its base weights.
    seen: dict = {"acts": {}, "oracle": pipeline.load_oracle(config)}
    real_capture = generate_stage.capture_targets

    def capture_and_keep(oracle, runs):
        acts = real_capture(oracle, runs)
        seen["acts"].update({k: v.detach().clone() for k, v in acts.items()})
        return acts

    out = tmp_path_factory.mktemp("wiring") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("OPENAI_API_KEY", raising=False)
        mp.delenv("OPENAI_BASE_URL", raising=False)
        mp.setattr(generate_stage, "capture_targets", capture_and_keep)
        pipeline.run_experiment(config, out, judge=False, progress=False, log=lambda _: None, oracle=seen["oracle"])
    results = json.loads((Path(out) / "results.json").read_text())
    return PipelineRun(spec, config, results, seen["oracle"].model, seen["acts"])


# ---------------------------------------------------------------------------------------------------------------------
# The independent computation: plain transformers / torch, nothing from ao_resampling


def chat_ids(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False))


def text_config(model):
    return model.get_base_model().config.get_text_config(decoder=True)


def read_layer_of(model) -> int:
    return int(text_config(model).num_hidden_layers * 0.5)


def decoder_layer(model, index: int) -> torch.nn.Module:
    return model.get_base_model().get_decoder().layers[index]


def placeholder_id(tokenizer) -> int:
    ids = tokenizer.encode(" ?", add_special_tokens=False)
    assert len(ids) == 1, ids
    return ids[0]


def oracle_prompt_ids(tokenizer, *, layer: int, question: str, k: int = 1) -> list[int]:
    content = f"Layer: {layer}\n" + " ?" * k + " \n" + question
    return chat_ids(tokenizer, [{"role": "user", "content": content}], generation_prompt=True)


def placeholder_positions_of(tokenizer, ids: list[int], k: int = 1) -> list[int]:
    # The template's header and "Layer: N\n" hold no " ?", so the first k are the placeholders (the question may
    # hold more, after them).
    return [i for i, t in enumerate(ids) if t == placeholder_id(tokenizer)][:k]


@torch.inference_mode()
def base_activation(model, ids: list[int], *, layer: int, position: int) -> torch.Tensor:
    """hidden_states[0] is the embeddings, hidden_states[i + 1] the output of decoder layer i (the final norm only
    touches the last entry, and the read layer is the middle one)."""
    with model.disable_adapter():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True, logits_to_keep=1).hidden_states
    assert layer + 1 < len(hidden) - 1, "the read layer must not be the last (its hidden state is normed)"
    return hidden[layer + 1][0, position]


def stop_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]


@torch.inference_mode()
def greedy_answer(model, tokenizer, prompt_ids: list[int], *, positions: list[int], vector_D: torch.Tensor,
                  layer: int, coefficient: float, max_new_tokens: int) -> list[int]:
    """The injected oracle's greedy answer, up to and including its stop token."""

    def add_vector(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[1] == 1:  # a decode step: the placeholders are already in the KV cache
            return output
        h = h.clone()
        for p in positions:
            h[0, p] = h[0, p] + F.normalize(vector_D, dim=-1) * h[0, p].norm() * coefficient
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = decoder_layer(model, layer).register_forward_hook(add_vector)
    try:
        out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), do_sample=False, top_p=None, top_k=None, temperature=None,
                             max_new_tokens=max_new_tokens, eos_token_id=stop_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id)
    finally:
        handle.remove()
    answer = out[0, len(prompt_ids):].tolist()
    ends = [i for i, t in enumerate(answer) if t in stop_ids(tokenizer)]
    return answer[: ends[0] + 1] if ends else answer


# ---------------------------------------------------------------------------------------------------------------------
# Helpers over the stored file


def runs(r: PipelineRun) -> list[dict]:
    assert len(r.results["runs"]) == r.config.num_targets * r.config.num_questions
    return r.results["runs"]


def messages_of(r: PipelineRun, target_id: str) -> list[dict]:
    return next(t["messages"] for t in r.results["targets"] if t["id"] == target_id)


def question_of(r: PipelineRun, question_id: str) -> str:
    return next(q["text"] for q in r.results["ao_questions"] if q["id"] == question_id)


# ---------------------------------------------------------------------------------------------------------------------
# The checks


def test_context_ids_and_assistant_start_are_the_chat_templates(pipeline_run, gemma_tokenizer, shared_data):
    # What the recomputation starts from: the input files' first targets and questions from its pool, as stored.
    source = json.loads((shared_data / "target_model_queries.json").read_text())[: pipeline_run.config.num_targets]
    assert [{"id": t["id"], "messages": t["messages"]} for t in source] == pipeline_run.results["targets"]
    pool = json.loads((shared_data / "sycophancy_questions.json").read_text())
    assert all(q["text"] in pool for q in pipeline_run.results["ao_questions"])
    for run in runs(pipeline_run):
        messages = messages_of(pipeline_run, run["target_id"])
        with_prompt = chat_ids(gemma_tokenizer, messages, generation_prompt=True)
        without = chat_ids(gemma_tokenizer, messages, generation_prompt=False)
        assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)
        assert run["context_input_ids"] == with_prompt, run["run_id"]
        assert run["assistant_start_idx"] == len(without), run["run_id"]
        assert gemma_tokenizer.convert_ids_to_tokens(with_prompt[len(without)]) == "<start_of_turn>"


def test_activation_is_the_base_models_hidden_state_at_the_read_layer_and_assistant_start(pipeline_run,
                                                                                          gemma_tokenizer):
    model = pipeline_run.model
    layer = read_layer_of(model)
    assert pipeline_run.results["meta"]["layer"] == layer
    targets = {run["target_id"] for run in runs(pipeline_run)}
    assert set(pipeline_run.acts) == targets
    for target_id in sorted(targets):
        messages = messages_of(pipeline_run, target_id)
        ids = chat_ids(gemma_tokenizer, messages, generation_prompt=True)
        start = len(chat_ids(gemma_tokenizer, messages, generation_prompt=False))
        expected_D = base_activation(model, ids, layer=layer, position=start)
        # The pipeline reads a left-padded batch before its decode merged and unmerged the LoRA: equal up to float32
        # rounding (~5e-7 of the norm, measured), where a neighbouring token or layer differs by O(1) of it.
        got_KD = pipeline_run.acts[target_id].float()  # the default rule reads one position: K = 1
        assert got_KD.shape == (1, *expected_D.shape), f"target {target_id}: captured {tuple(got_KD.shape)}"
        error = float((got_KD[0] - expected_D.float()).norm() / expected_D.float().norm())
        assert error < 1e-5, f"target {target_id}: relative error {error:.2e}"


def test_oracle_prompt_names_the_read_layer_and_its_placeholders_are_where_stored(pipeline_run, gemma_tokenizer):
    layer = read_layer_of(pipeline_run.model)
    assert pipeline_run.config.injection_layer != layer, "the two layers must differ for this check to mean anything"
    for run in runs(pipeline_run):
        ids = oracle_prompt_ids(gemma_tokenizer, layer=layer, question=question_of(pipeline_run, run["ao_question_id"]))
        assert run["oracle_input_ids"] == ids, run["run_id"]
        assert run["placeholder_positions"] == placeholder_positions_of(gemma_tokenizer, ids), run["run_id"]


def test_greedy_answers_are_plain_generates_with_the_published_injection(pipeline_run, gemma_tokenizer):
    model, config = pipeline_run.model, pipeline_run.config
    layer = read_layer_of(model)
    activations: dict[str, torch.Tensor] = {}
    compared = []
    for run in runs(pipeline_run):
        target_id = run["target_id"]
        if target_id not in activations:
            messages = messages_of(pipeline_run, target_id)
            activations[target_id] = base_activation(
                model, chat_ids(gemma_tokenizer, messages, generation_prompt=True), layer=layer,
                position=len(chat_ids(gemma_tokenizer, messages, generation_prompt=False)))
        prompt = oracle_prompt_ids(gemma_tokenizer, layer=layer, question=question_of(pipeline_run,
                                                                                      run["ao_question_id"]))
        answer = greedy_answer(model, gemma_tokenizer, prompt, positions=placeholder_positions_of(gemma_tokenizer,
                               prompt), vector_D=activations[target_id], layer=config.injection_layer,
                               coefficient=config.steering_coefficient, max_new_tokens=config.max_new_tokens)
        text = gemma_tokenizer.decode(answer, skip_special_tokens=True)
        assert len(run["responses"]) == config.samples_per_query
        for response in run["responses"]:  # greedy: every sample of a run is the same answer
            assert (response["n_tokens"], response["text"].strip()) == (len(answer), text.strip()), run["run_id"]
            assert response["finish_reason"] == ("eos" if answer[-1] in stop_ids(gemma_tokenizer) else "length")
        compared.append(text)
    assert sum(bool(t.strip()) for t in compared) >= len(compared) // 2, "compared on real text, not blanks"
