"""Sweeps on real token ids and the tiny model: where the position rules land in a real Gemma 3 encoding, K positions
captured in one pass and injected at K placeholders, one model load for a sweep whose read layer varies, and a 2x2
sweep through the CLI killed once (SIGKILL, a real subprocess) and resumed to the end, then refused with other
settings (both in-process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ao_resampling import pipeline
from ao_resampling.cli import app
from ao_resampling.engine.loading import adapters
from ao_resampling.config import build_config
from ao_resampling.engine.hooks import capture_activations_at
from ao_resampling.engine.loading.models import LoadedOracle
from ao_resampling.inputs.oracle import placeholder_token_id
from ao_resampling.results import load_results_file
from ao_resampling.stages.generate import capture_targets
from ao_resampling.stages.plan import build_plan
from ao_resampling.store import ResultsStore
from ao_resampling.sweep import plan_conditions, run_sweep
from tests.support.openai_server import FakeOpenAIServer

WAIT_S = 240


@pytest.fixture(scope="module", autouse=True)
def no_ambient_openai_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("OPENAI_API_KEY", raising=False)
        mp.delenv("OPENAI_BASE_URL", raising=False)
        yield


def tiny(**overrides):
    settings_ = dict(model="synthetic:tiny", oracle_lora="random", dtype="float32", device="cpu", num_targets=3,
                     num_questions=2, samples_per_query=2, max_new_tokens=3, top_p=2e-5, judge=False,
                     embedding_model="none", bootstrap_resamples=200)
    return build_config(preset="experiment", overrides={**settings_, **overrides})


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(1, 8))
def test_window_rule_plans_k_placeholders_and_k_read_positions(gemma_tokenizer, k):
    plan, _ = build_plan(tiny(position_rule=f"window:{k}"), gemma_tokenizer)
    ph = placeholder_token_id(gemma_tokenizer)
    for run in plan.runs:
        assert run.position_rule == f"window:{k}"
        assert run.context_positions == list(range(run.assistant_start_idx - k + 1, run.assistant_start_idx + 1))
        assert len(run.placeholder_positions) == k
        assert [run.oracle_input_ids[p] for p in run.placeholder_positions] == [ph] * k
        assert gemma_tokenizer.decode(run.oracle_input_ids).count(" ?") == k


def test_last_user_token_is_the_end_of_the_user_message(gemma_tokenizer):
    plan, _ = build_plan(tiny(position_rule="last_user_token"), gemma_tokenizer)
    targets = {t.id: t for t in plan.targets}
    for run in plan.runs:
        (i,) = run.context_positions
        ids = run.context_input_ids
        assert gemma_tokenizer.convert_ids_to_tokens(ids[i + 1:i + 2]) == ["<end_of_turn>"]
        user = [m.content for m in targets[run.target_id].messages if m.role == "user"][-1]
        assert gemma_tokenizer.decode(ids[:i + 1]).endswith(user.rstrip())
        assert i < run.assistant_start_idx


def _end_of_last_user_turn(tokens: list[str]) -> int:
    """Independently of the template's text: the token before the <end_of_turn> that closes the last user turn."""
    starts = [i for i, t in enumerate(tokens[:-1]) if t == "<start_of_turn>" and tokens[i + 1] == "user"]
    return tokens.index("<end_of_turn>", starts[-1]) - 1


@pytest.mark.parametrize("messages, last_token", [
    pytest.param([("user", "Hello"), ("assistant", "Hello there, friend")], "Hello", id="reply_repeats_the_user"),
    pytest.param([("user", "Say yes"), ("assistant", "Say yes"), ("user", "Say yes")], "▁yes",
                 id="every_turn_the_same_words"),
    pytest.param([("user", "  padded  ")], "padded", id="content_padded_with_spaces"),
    pytest.param([("user", "ends in whitespace \n\t")], "▁whitespace", id="user_message_ends_in_whitespace"),
])
def test_last_user_token_is_found_by_the_turn_not_by_the_text(gemma_tokenizer, messages, last_token):
    from ao_resampling.inputs.encoding import encode_target
    from ao_resampling.inputs.positions import last_user_token_index

    messages = [{"role": role, "content": content} for role, content in messages]
    enc = encode_target(gemma_tokenizer, messages)
    i = last_user_token_index(gemma_tokenizer, messages, enc.input_ids)
    tokens = gemma_tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert i == _end_of_last_user_turn(tokens)
    assert tokens[i] == last_token


def test_capture_reads_k_positions_in_one_pass_as_a_full_forward_sees_them(tiny_oracle, gemma_tokenizer):
    plan, _ = build_plan(tiny(position_rule="window:3"), gemma_tokenizer)
    runs = list({r.target_id: r for r in plan.runs}.values())
    layer = 2
    oracle = LoadedOracle(tiny_oracle, gemma_tokenizer, 4, layer, 1)
    acts = capture_targets(oracle, runs)
    for run in runs:  # independent: each target alone, every hidden state, no padding, adapter off
        with adapters.adapter_disabled(tiny_oracle), torch.inference_mode():
            hidden = tiny_oracle(input_ids=torch.tensor([run.context_input_ids]), output_hidden_states=True)
        expected_KD = hidden.hidden_states[layer + 1][0, run.context_positions]
        assert acts[run.target_id].shape == (3, expected_KD.shape[-1])
        torch.testing.assert_close(acts[run.target_id], expected_KD, rtol=0, atol=1e-5)
    # one position per row through the same function is the old single-position capture
    one = capture_activations_at(tiny_oracle, [runs[0].context_input_ids], [[runs[0].assistant_start_idx]], layer,
                                 gemma_tokenizer.pad_token_id)
    torch.testing.assert_close(one[0, 0], acts[runs[0].target_id][-1], rtol=0, atol=1e-5)


def test_sweep_loads_the_model_once_with_each_conditions_layers(tmp_path, folder_reads):
    loads = []

    def load(config):
        loads.append(config)
        return pipeline.load_oracle(config)

    with FakeOpenAIServer() as server:
        base = tiny(judge_api="chat", judge_base_url=server.base_url)
        planned = plan_conditions(base, [{"layer_percent": 25, "position_rule": "window:2"}, {"layer_percent": 75}])
        outcome = run_sweep(base, planned, tmp_path, judge=True, progress=False, log=lambda _: None, load=load)
    assert len(loads) == 1 and outcome.model_loads == 1
    assert folder_reads == ["replay", "file"] * 2  # each condition's folder read once, for its run and the report
    first, second = (load_results_file(tmp_path / c.name / "results.json") for c in planned)
    assert (first.meta.layer, second.meta.layer) == (1, 3)  # 4 layers: int(4 * .25), int(4 * .75)
    assert all(len(r.responses) == 2 and len(r.placeholder_positions) == 2 for r in first.runs)
    assert all(len(r.responses) == 2 and r.position_rule == "assistant_start" for r in second.runs)
    folder_reads.clear()
    again = run_sweep(base, planned, tmp_path, judge=False, progress=False, log=lambda _: None, load=load)
    assert again.model_loads == 0 and len(loads) == 1  # nothing missing: no weights read
    assert folder_reads == ["replay", "file"] * 2  # checked against its plan, analysed, reported: one read each
    summary = json.loads((tmp_path / "report" / "sweep_summary.json").read_text())
    assert summary["varied"] == ["layer_percent", "position_rule"]
    assert summary["metrics"]["distinct_fraction"]["paired"][0]["n_pairs"] == 6
    judged = summary["metrics"]["judge_score"]
    for c, results in zip(planned, (first, second)):  # independent: the verdicts stored in each run folder
        scores = [r.judge.parsed.similarity_1_to_10 for r in results.runs]
        assert judged["per_condition"][c.name]["mean"] == pytest.approx(sum(scores) / len(scores))
    diffs = [b.judge.parsed.similarity_1_to_10 - a.judge.parsed.similarity_1_to_10
             for a, b in zip(first.runs, second.runs)]  # same plan order: same (target, question)
    assert judged["paired"][0]["mean_diff"] == pytest.approx(sum(diffs) / len(diffs))
    assert "## judge_score" in (tmp_path / "report" / "sweep_report.md").read_text()


def test_temperature_sweep_reports_pairwise_agreement_paired_by_run(tmp_path):
    """Each condition's runs get a cluster call; the sweep report's pairwise agreement, per condition and paired by
    (target, question), is what the stored answers give under the loopback judge's rule (identical = one meaning)."""
    with FakeOpenAIServer() as server:
        base = tiny(judge=True, judge_api="chat", judge_base_url=server.base_url, samples_per_query=4, top_k=0)
        planned = plan_conditions(base, [{"temperature": 0.3}, {"temperature": 1.5}])
        run_sweep(base, planned, tmp_path, judge=True, progress=False, log=lambda _: None)
    cold, hot = (load_results_file(tmp_path / c.name / "results.json") for c in planned)

    def agreement(run) -> float:  # from the stored answers, not from the stored clusters
        texts = [r.text for r in run.responses]
        n = len(texts)
        return sum(texts.count(t) * (texts.count(t) - 1) for t in set(texts)) / (n * (n - 1))

    assert all(r.clusters.parsed is not None for res in (cold, hot) for r in res.runs)
    block = json.loads((tmp_path / "report" / "sweep_summary.json").read_text())["metrics"]["pairwise_agreement"]
    for c, results in zip(planned, (cold, hot)):
        values = [agreement(r) for r in results.runs]
        assert block["per_condition"][c.name]["mean"] == pytest.approx(sum(values) / len(values))
    diffs = [agreement(b) - agreement(a) for a, b in zip(cold.runs, hot.runs)]  # same plan order
    (paired,) = block["paired"]
    assert paired["n_pairs"] == 6 and paired["mean_diff"] == pytest.approx(sum(diffs) / len(diffs))
    assert "## pairwise_agreement: chance two answers mean the same" in (
        tmp_path / "report" / "sweep_report.md").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# The CLI, killed once and resumed

CANARY = " [kept from before the kill]"


def sweep_args(out: Path, samples: int = 2) -> list[str]:
    return ["sweep", "--preset", "experiment", "--model", "synthetic:tiny", "--oracle-lora", "random",
            "--dtype", "float32", "--device", "cpu", "--num-targets", "2", "--num-questions", "2",
            "--samples", str(samples), "--set", "max_new_tokens=3", "--set", "top_p=2e-5", "--set", "batch_rows=2",
            "--set", "bootstrap_resamples=200", "--embedding-model", "none", "--no-judge",
            "--vary", "temperature=0.5,1.0", "--vary", "position_rule=assistant_start,window:2",
            "--out", str(out), "--quiet"]


def sweep_command(out: Path, samples: int = 2) -> list[str]:
    return [sys.executable, "-m", "ao_resampling", *sweep_args(out, samples)]


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    return subprocess.Popen(args, cwd=Path(__file__).resolve().parents[2], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def test_cli_sweep_2x2_killed_once_and_resumed(tmp_path):
    out = tmp_path / "sweep"
    log = tmp_path / "first.log"
    proc = spawn(sweep_command(out), log)
    manifest_path = out / "sweep.json"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:  # kill once the first condition is done and a later one is generating
        assert proc.poll() is None, f"the sweep ended before it could be killed:\n{log.read_text()[-3000:]}"
        if manifest_path.exists():  # written once every condition's plan is
            names = [c["name"] for c in json.loads(manifest_path.read_text())["conditions"]]
            if any((out / name / "journal.jsonl").exists() for name in names[1:]):
                break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail(f"the second condition never started within {WAIT_S} s:\n{log.read_text()[-3000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "report").exists()  # killed before the end

    # Mark the first condition's answers: a resume that redid them would drop the mark.
    first = ResultsStore(out / names[0])
    done = first.load()
    assert all(len(r.responses) == 2 for r in done.runs)
    for run in done.runs:
        for response in run.responses:
            response.text += CANARY
    first.compact(done)

    # The resume and the refusal below run in this process (what a real process proves, the kill, is done): the
    # same command line through the CLI's own entry point, without a second interpreter start and model import.
    resumed = CliRunner().invoke(app, sweep_args(out), catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert "model loaded 1 time(s)" in resumed.output
    for name in names:
        results = ResultsStore(out / name).load()
        assert len(results.runs) == 4 and all(len(r.responses) == 2 for r in results.runs), name
        assert len({r.run_id for r in results.runs}) == 4
        marked = all(resp.text.endswith(CANARY) for r in results.runs for resp in r.responses)
        assert marked == (name == names[0]), name
        k = 2 if "window" in name else 1
        assert all(len(r.context_positions) == k == len(r.placeholder_positions) for r in results.runs)
    summary = json.loads((out / "report" / "sweep_summary.json").read_text())
    assert [c["present"] for c in summary["conditions"]] == [True] * 4
    assert len(summary["metrics"]["distinct_fraction"]["paired"]) == 6  # 4 conditions: 6 pairs
    assert {p.name for p in (out / "report").glob("*.png")} == {"sweep_lines.png", "sweep_heatmap.png"}

    # Other settings on the same folder: refused, naming what differs, nothing touched.
    refused = CliRunner().invoke(app, sweep_args(out, samples=3))
    assert refused.exit_code == 2, refused.output
    assert "samples_per_query: 2 -> 3" in refused.stderr and "refusing to mix" in refused.stderr


def test_cli_sweep_whose_judge_calls_fail_exits_3_saying_how_many_and_how_to_retry(tmp_path):
    from typer.testing import CliRunner

    from ao_resampling.cli import app
    from ao_resampling.errors import EXIT_CALLS_FAILED
    from tests.integration.test_run_folder_cli import free_port

    out = tmp_path / "sweep"
    args = sweep_command(out)[3:]  # the same sweep in this process, judged by a server that is not there
    args.remove("--no-judge")
    args += ["--set", "judge_api=chat", "--set", f"judge_base_url=http://127.0.0.1:{free_port()}/v1",
             "--set", "judge_max_retries=0", "--no-clusters"]  # verdicts alone: the count below is theirs
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == EXIT_CALLS_FAILED, result.output
    n_failed = sum(r.judge.failure is not None for c in json.loads((out / "sweep.json").read_text())["conditions"]
                   for r in load_results_file(out / c["folder"] / "results.json").runs)
    assert n_failed == 16  # 4 conditions x 2 targets x 2 questions, every call refused
    assert "16 judge call(s) failed" in result.output and "Re-run the same sweep command" in result.output


def test_a_sweep_over_a_judge_url_with_credentials_writes_and_prints_none_of_them(tmp_path, openai_server,
                                                                                  monkeypatch):
    from typer.testing import CliRunner

    from ao_resampling.cli import app

    monkeypatch.setenv("OPENAI_API_KEY", "sk-loopback")  # the pre-flight check looks at the base settings' judge
    out = tmp_path / "sweep"
    secret_url = openai_server.base_url.replace("http://", "http://me:hunter2@")  # usable: the path stays the API's
    args = sweep_command(out)[3:]
    args.remove("--no-judge")
    args[args.index("--vary") + 1] = f"judge_base_url={secret_url}"  # one judge URL x two position rules
    result = CliRunner().invoke(app, [*args, "--set", "judge_api=chat", "--no-clusters"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(openai_server.requests) == 8  # the URL was used as given: 2 conditions x 2 targets x 2 questions
    written = [p for p in out.rglob("*")]
    assert len([p for p in written if p.name == "results.json"]) == 2 and (out / "report" / "sweep_report.md").exists()
    assert "hunter2" not in result.output
    assert not [p for p in written if "hunter2" in p.name]
    assert not [p for p in written if p.is_file() and b"hunter2" in p.read_bytes()]
    assert "REDACTED" in (out / "sweep.json").read_text()


def test_window_queries_k_vectors_fast_path_equals_plain_generate(tiny_oracle, gemma_tokenizer):
    """window:3 end to end through generation: 3 captured vectors at 3 placeholders, the batched sampler's greedy
    answers token for token those of plain HF generate with the same injection; and the vectors are used (others give
    other answers)."""
    from ao_resampling.config import Decoding
    from ao_resampling.engine.decoding.sampler import Query, Sampler
    from ao_resampling.engine.reference import sample_hf_batched

    plan, _ = build_plan(tiny(position_rule="window:3", num_questions=3), gemma_tokenizer)
    oracle = LoadedOracle(tiny_oracle, gemma_tokenizer, 4, 2, 1)
    acts = capture_targets(oracle, plan.runs)
    runs = [plan.runs[0], plan.runs[4], plan.runs[8]]  # three targets, three questions: padded, mixed lengths

    def queries(scale: float) -> list[Query]:
        return [Query(key=r.run_id, input_ids=tuple(r.oracle_input_ids), n=1,
                      positions_K=tuple(r.placeholder_positions),
                      vectors_KD=acts[r.target_id] * torch.tensor([[scale], [1.0], [-scale]])) for r in runs]

    decoding = Decoding(temperature=0, top_p=1.0, top_k=0, max_new_tokens=8, do_sample=False, seed=0,
                        eos_token_ids=(1, 106))
    sampler = Sampler(tiny_oracle, gemma_tokenizer, decoding=decoding, injection_layer=1, coefficient=1.0, rows=2)
    fast = sampler.run(queries(1.0), progress=False)
    plain = sample_hf_batched(tiny_oracle, gemma_tokenizer, queries(1.0), injection_layer=1, coefficient=1.0,
                              decoding=decoding)
    assert {k: [s.token_ids for s in v] for k, v in fast.items()} == {k: [s.token_ids for s in v]
                                                                      for k, v in plain.items()}
    flipped = sampler.run(queries(-1.0), progress=False)  # vectors 1 and 3 reversed: the direction matters
    assert any(fast[k][0].token_ids != flipped[k][0].token_ids for k in fast)


def test_a_condition_folder_in_use_stops_the_sweep_before_any_work(tmp_path):
    from ao_resampling.store import FolderBusyError, folder_lock

    base = tiny()
    planned = plan_conditions(base, [{"temperature": 0.5}, {"temperature": 1.0}])
    with folder_lock(tmp_path / planned[1].name, command="ao-resampling judge (another process)"):
        with pytest.raises(FolderBusyError, match="in use by .*ao-resampling judge"):
            run_sweep(base, planned, tmp_path, judge=False, progress=False, log=lambda _: None,
                      load=lambda _: pytest.fail("no model may be loaded"))
    assert not (tmp_path / "sweep.json").exists() and not (tmp_path / planned[0].name / "results.json").exists()
