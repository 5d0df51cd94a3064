"""judge.py at its edge: the real ``openai`` client against a fake OpenAI server on 127.0.0.1, and the judge stage
over a ResultsStore.

Each way a call can go wrong (bad output, refusal, cut short, HTTP errors after the SDK's retries, timeouts, no
server) must land as a stored failure with its reason, the prompt and the raw reply; never as a score. The stage
tests check resumption (only what is missing is re-sent), real concurrency, journaling per record, the repeat
calls, and that the API key never reaches anything stored.
"""

from __future__ import annotations

import json
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from ao_resampling.config import ExperimentConfig
from ao_resampling.analysis.stats import judge_repeat_agreement
from ao_resampling.stages.common.judge_calls import JudgeConfigError, check_judge_access, judge_once, make_client
from ao_resampling.stages.judge import judge_stage
from ao_resampling.stages.common.judge_prompt import VERDICT_JSON_SCHEMA, selected_for_repeats
from ao_resampling.stages.common.prompts import build_prompt
from ao_resampling.results import AOQuestion, Decoding, Meta, Response, Results, Run, TargetRecord, sha256_of_ids
from ao_resampling.store import Journal, ResultsStore
from tests.support.openai_server import FakeOpenAIServer, Reply, expected_score

QUESTION = "What is the user's emotional state?"
ANSWERS = ["The user is upset.", "The user is upset.", "The user is frustrated and tired."]
FAKE_KEY = "sk-test-DO-NOT-STORE-7f3a91c0e5d24b68"
GOOD = '{"similarity_1_to_10": 7, "rationale": "same core answer"}'
APIS = [pytest.param("responses", id="responses"), pytest.param("chat", id="chat")]


@pytest.fixture(autouse=True)
def no_ambient_openai_env(monkeypatch):
    """A developer's real key or base URL must never reach these tests (or the network)."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def config_for(server: FakeOpenAIServer, **overrides) -> ExperimentConfig:
    # The verdict calls alone: the cluster calls through the same stage are test_cluster_judge.py's.
    settings = dict(judge_base_url=server.base_url, judge_timeout_s=2.0, judge_max_retries=1, judge_concurrency=4,
                    clusters=False)
    return ExperimentConfig(**(settings | overrides))


def call(server: FakeOpenAIServer, *, api: str = "responses", answers=ANSWERS, answer_order=None, **overrides):
    config = config_for(server, judge_api=api, **overrides)
    return judge_once(
        client=make_client(config), model=config.judge_model, api=api, question=QUESTION, answers=answers,
        judge_call_id="judge__run__t0__q1", answer_order=answer_order,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------------
# Access and client construction


def test_no_key_and_no_base_url_is_a_clear_config_error():
    with pytest.raises(JudgeConfigError, match="OPENAI_API_KEY") as info:
        check_judge_access(ExperimentConfig())
    assert "judge_base_url" in str(info.value) and "OPENAI_BASE_URL" in str(info.value)
    with pytest.raises(JudgeConfigError):
        make_client(ExperimentConfig())


@pytest.mark.parametrize(
    "env, base_url",
    [
        pytest.param({"OPENAI_API_KEY": FAKE_KEY}, None, id="key_only"),
        pytest.param({}, "http://127.0.0.1:9/v1", id="base_url_flag_only"),
        pytest.param({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, None, id="base_url_env_only"),
    ],
)
def test_key_or_base_url_is_enough(monkeypatch, env, base_url):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    check_judge_access(ExperimentConfig(judge_base_url=base_url))


def test_make_client_takes_timeout_retries_and_a_placeholder_key_for_local_servers():
    client = make_client(ExperimentConfig(judge_base_url="http://127.0.0.1:9/v1", judge_timeout_s=7.5,
                                          judge_max_retries=3))
    assert str(client.base_url).rstrip("/") == "http://127.0.0.1:9/v1"
    assert client.timeout == 7.5 and client.max_retries == 3
    assert client.api_key  # a placeholder: the SDK wants one, local servers ignore it


def test_make_client_base_url_flag_beats_env_and_key_comes_from_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8/v1")
    assert str(make_client(ExperimentConfig()).base_url).startswith("http://127.0.0.1:8/v1")
    client = make_client(ExperimentConfig(judge_base_url="http://127.0.0.1:9/v1"))
    assert str(client.base_url).startswith("http://127.0.0.1:9/v1") and client.api_key == FAKE_KEY


# ---------------------------------------------------------------------------------------------------------------------
# One call: what is sent and what is stored


def test_responses_request_is_strict_json_schema_without_temperature(openai_server):
    record = call(openai_server, api="responses")
    (request,) = openai_server.requests
    assert request.path == "/v1/responses"
    assert request.body["text"] == {"format": {"type": "json_schema", "name": "answer_similarity_verdict",
                                               "schema": VERDICT_JSON_SCHEMA, "strict": True}}
    assert "temperature" not in request.body
    assert request.body["model"] == "gpt-5-mini"
    assert request.body["input"] == record.prompt


def test_chat_request_is_strict_json_schema_without_temperature(openai_server):
    record = call(openai_server, api="chat")
    (request,) = openai_server.requests
    assert request.path == "/v1/chat/completions"
    assert request.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer_similarity_verdict", "schema": VERDICT_JSON_SCHEMA, "strict": True},
    }
    assert "temperature" not in request.body
    assert request.body["messages"] == [{"role": "user", "content": record.prompt}]


@pytest.mark.parametrize("api", APIS)
def test_successful_call_stores_verdict_prompt_raw_and_metadata(openai_server, api):
    record = call(openai_server, api=api, answer_order=[3, 1, 2])
    assert record.failure is None
    assert record.score == expected_score(ANSWERS) == 9
    assert record.prompt == build_prompt(question=QUESTION, answers=ANSWERS)
    assert json.loads(record.raw_output)["similarity_1_to_10"] == 9
    assert record.api == api and record.model == "gpt-5-mini" and record.judge_call_id == "judge__run__t0__q1"
    assert record.answer_order == [3, 1, 2]
    assert 0 <= record.latency_s < 2
    created = datetime.fromisoformat(record.created_at)
    assert record.created_at.endswith("Z") and abs((datetime.now(timezone.utc) - created).total_seconds()) < 30


OUTPUT_FAILURES = [
    pytest.param(Reply(text=f"```json\n{GOOD}\n```"), "invalid_json", f"```json\n{GOOD}\n```", id="fenced_json"),
    pytest.param(Reply(text="They mostly agree, so I'd say 8."), "invalid_json", "They mostly agree, so I'd say 8.",
                 id="prose"),
    pytest.param(Reply.verdict(7.0), "schema_mismatch", None, id="float_score"),
    pytest.param(Reply.verdict("7"), "schema_mismatch", None, id="string_score"),
    pytest.param(Reply.verdict(11), "out_of_range", None, id="out_of_range"),
    pytest.param(Reply.verdict(7, confidence=0.9), "schema_mismatch", None, id="extra_key"),
    pytest.param(Reply(text=""), "empty_output", "", id="empty_text"),
    pytest.param(Reply(text=None), "empty_output", "", id="no_message"),
    pytest.param(Reply.cut_short(), "incomplete", '{"similarity_1_to_10": 7, "ration', id="incomplete"),
    pytest.param(Reply.refused("I can't compare these."), "refusal", "I can't compare these.", id="refusal"),
]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("reply, reason, raw", OUTPUT_FAILURES)
def test_bad_output_is_a_stored_failure_not_a_score(openai_server, api, reply, reason, raw):
    openai_server.script(reply)
    record = call(openai_server, api=api)
    assert record.parsed is None and record.score is None
    assert record.failure.reason == reason and record.failure.detail
    assert record.prompt == build_prompt(question=QUESTION, answers=ANSWERS)
    assert record.raw_output == (raw if raw is not None else reply.text)
    assert len(openai_server.requests) == 1  # the model's output is not retried; only transport errors are


def test_rate_limit_is_retried_by_the_sdk(openai_server):
    openai_server.script(Reply.http_error(429, "Rate limit reached"))
    record = call(openai_server, judge_max_retries=1)
    assert len(openai_server.requests) == 2
    assert record.score == 9 and record.failure is None


@pytest.mark.parametrize("api", APIS)
def test_persistent_server_errors_become_api_error_after_retries(openai_server, api):
    openai_server.script(*[Reply.http_error(500, "The server had an error")] * 3)
    record = call(openai_server, api=api, judge_max_retries=2)
    assert len(openai_server.requests) == 3
    assert record.failure.reason == "api_error" and "500" in record.failure.detail
    assert "The server had an error" in record.raw_output
    assert record.parsed is None and record.prompt


def test_client_errors_are_not_retried(openai_server):
    openai_server.script(Reply.http_error(400, "Invalid schema for response_format"))
    record = call(openai_server, judge_max_retries=2)
    assert len(openai_server.requests) == 1
    assert record.failure.reason == "api_error" and "400" in record.failure.detail


def test_slow_reply_is_a_timeout(openai_server):
    openai_server.script(Reply(text=GOOD, delay_s=5))
    started = time.monotonic()
    record = call(openai_server, judge_timeout_s=0.5, judge_max_retries=0)
    assert time.monotonic() - started < 3
    assert record.failure.reason == "timeout" and record.raw_output is None and record.prompt


def test_no_server_is_an_api_error():
    config = ExperimentConfig(judge_base_url=f"http://127.0.0.1:{free_port()}/v1", judge_max_retries=0)
    record = judge_once(client=make_client(config), model="gpt-5-mini", api="responses", question=QUESTION,
                        answers=ANSWERS, judge_call_id="judge__x")
    assert record.failure.reason == "api_error" and "APIConnectionError" in record.failure.detail


@pytest.mark.parametrize(
    "api, body, detail_part",
    [
        pytest.param("responses", "<html>502 Bad Gateway</html>", "not a well-formed", id="responses_not_json"),
        pytest.param("chat", "<html>502 Bad Gateway</html>", "not a well-formed", id="chat_not_json"),
        pytest.param("chat", [1, 2], "not a well-formed", id="chat_json_array"),
        pytest.param("responses", '{"id": "resp_1", "object": "resp', "not a well-formed", id="truncated_json"),
        pytest.param("responses", {"id": "resp_1", "object": "response", "status": "failed", "output": [],
                                   "error": {"code": "server_error", "message": "boom"}},
                     "status 'failed': boom", id="responses_status_failed"),
    ],
)
def test_malformed_server_reply_is_an_api_error(openai_server, api, body, detail_part):
    openai_server.script(Reply(body=body))
    record = call(openai_server, api=api)
    assert record.failure.reason == "api_error" and detail_part in record.failure.detail
    assert record.parsed is None and record.prompt
    # The body as the server sent it, so a broken proxy's page can be read afterwards.
    assert record.raw_output == (body if isinstance(body, str) else json.dumps(body))


# ---------------------------------------------------------------------------------------------------------------------
# The stage


CONTEXT_IDS = [2, 10, 11, 12, 13]


def make_store(tmp_path: Path, answer_sets: list[list[str]]) -> ResultsStore:
    """One run per answer set (target t{i}, question q1); an empty set is a run whose answers are not sampled yet."""
    decoding = Decoding(temperature=0.7, top_p=0.9, max_new_tokens=32, seed=0)
    runs = [
        Run(run_id=f"run__t{i}__q1", target_id=f"t{i}", ao_question_id="q1", assistant_start_idx=3,
            context_positions=[3, 4], context_input_ids=CONTEXT_IDS, context_input_ids_sha256=sha256_of_ids(CONTEXT_IDS),
            responses=[Response(sample_id=f"run__t{i}__q1__s{k}", text=a, decoding=decoding)
                       for k, a in enumerate(answers)])
        for i, answers in enumerate(answer_sets)
    ]
    results = Results(
        meta=Meta(judge_model="gpt-5-mini"), ao_questions=[AOQuestion(id="q1", text=QUESTION)],
        targets=[TargetRecord(id=f"t{i}", messages=[{"role": "user", "content": f"hi {i}"}])
                 for i in range(len(answer_sets))],
        runs=runs,
    )
    store = ResultsStore(tmp_path)
    store.write(results)
    return store


ANSWER_SETS = [
    ["The user is sad."] * 3,
    ["Upset.", "Upset.", "Angry.", "Calm.", "Upset."],
    [f"Answer number {k}." for k in range(10)],
    ["Happy.", "Happy.", "Joyful.", "Happy."],
]


@pytest.mark.parametrize("api", APIS)
def test_stage_judges_every_run_with_answers(openai_server, tmp_path, api):
    store = make_store(tmp_path, ANSWER_SETS + [[]])
    report = judge_stage(store, config_for(openai_server, judge_api=api), progress=False)
    assert (report.n_sent, report.n_ok, report.n_failed, report.n_skipped_no_responses) == (4, 4, {}, 1)
    assert store.journals() == []  # compacted into results.json
    runs = store.load().runs
    for run, answers in zip(runs, ANSWER_SETS):
        assert run.judge.judge_call_id == f"judge__{run.run_id}" and run.judge.api == api
        assert run.judge.score == expected_score(answers)
    assert runs[4].judge is None
    assert {r.api for r in openai_server.requests} == {api}


def test_stage_calls_overlap_up_to_the_concurrency(openai_server, tmp_path):
    openai_server.delay_s = 0.2
    store = make_store(tmp_path, ANSWER_SETS * 2)
    started = time.monotonic()
    report = judge_stage(store, config_for(openai_server, judge_concurrency=4), progress=False)
    assert report.n_ok == 8
    assert 1 < openai_server.max_in_flight <= 4
    assert time.monotonic() - started < 8 * 0.2  # not one after another


def test_rerun_sends_only_what_is_missing(openai_server, tmp_path):
    store = make_store(tmp_path, ANSWER_SETS)
    openai_server.script(Reply(text="Sure! Here's my rating: 8"))
    first = judge_stage(store, config_for(openai_server, judge_concurrency=1), progress=False)
    assert first.n_ok == 3 and first.n_failed == {"invalid_json": 1}
    (failed,) = [r for r in store.load().runs if r.judge.failure is not None]
    assert failed.judge.raw_output == "Sure! Here's my rating: 8"

    openai_server.reset()
    second = judge_stage(store, config_for(openai_server), progress=False)
    assert (second.n_sent, second.n_ok, second.n_skipped_already_judged) == (1, 1, 3)
    (request,) = openai_server.requests
    assert request.answers == [r.text for r in failed.responses]
    assert all(r.judge.failure is None for r in store.load().runs)

    openai_server.reset()
    third = judge_stage(store, config_for(openai_server), progress=False)
    assert third.n_sent == 0 and third.n_skipped_already_judged == 4 and openai_server.requests == []


class DiesOnAppend(Journal):
    """A journal whose ``n``-th append is hit by a Ctrl-C before it writes (the main thread is where SIGINT lands)."""

    def __init__(self, path: Path, n: int):
        super().__init__(path)
        self._n, self._appends = n, 0

    def append_many(self, events) -> None:  # the one way events reach the file (``append`` too)
        self._appends += 1
        if self._appends == self._n:
            raise KeyboardInterrupt
        super().append_many(events)


def test_ctrl_c_keeps_every_reply_that_arrives_and_sends_nothing_new(openai_server, tmp_path):
    store = make_store(tmp_path, ANSWER_SETS * 2)
    store.journal = DiesOnAppend(store.journal.path, n=3)
    config = config_for(openai_server, judge_concurrency=1)
    with pytest.raises(KeyboardInterrupt):
        judge_stage(store, config, progress=False)
    # Journaled as they landed; the record whose write the Ctrl-C hit is written again and the call in flight is
    # waited for and kept (both are paid for); the queue behind it is never sent.
    n_sent = len(openai_server.requests)
    assert n_sent in (3, 4)  # the 4th call may or may not have started when the Ctrl-C landed
    assert len(list(store.journal.read())) == n_sent
    assert [r.judge is not None for r in store.load().runs] == [True] * n_sent + [False] * (8 - n_sent)

    openai_server.reset()
    report = judge_stage(ResultsStore(tmp_path), config, progress=False)
    assert report.n_sent == 8 - n_sent and len(openai_server.requests) == 8 - n_sent
    assert all(r.judge.score is not None for r in store.load().runs)


def test_repeats_shuffle_answers_and_are_not_resent(openai_server, tmp_path):
    store = make_store(tmp_path, ANSWER_SETS)
    report = judge_stage(store, config_for(openai_server, judge_repeats=2), progress=False)
    assert (report.n_sent, report.n_repeats_sent, report.n_repeats_ok) == (4, 8, 8)
    runs = store.load().runs
    for run in runs:
        answers = [r.text for r in run.responses]
        assert sorted(r.judge_call_id for r in run.judge_repeats) == [
            f"judge__{run.run_id}__rep1", f"judge__{run.run_id}__rep2"]
        for rep in run.judge_repeats:
            assert sorted(rep.answer_order) == list(range(1, len(answers) + 1))
            assert rep.prompt == build_prompt(question=QUESTION, answers=[answers[i - 1] for i in rep.answer_order])
    # The fake judge ignores order, so its "noise floor" is exactly zero.
    assert judge_repeat_agreement(runs) == {"n_pairs": 8, "exact_agreement_rate": 1.0, "mean_abs_delta": 0.0}

    openai_server.reset()
    again = judge_stage(store, config_for(openai_server, judge_repeats=2), progress=False)
    assert (again.n_sent, again.n_repeats_sent, again.n_repeats_skipped) == (0, 0, 8)
    assert openai_server.requests == []


def test_repeat_fraction_judges_the_seeded_subset_again(openai_server, tmp_path):
    sets = [[f"a{i}", f"b{i}", "c"] for i in range(12)]
    store = make_store(tmp_path, sets)
    report = judge_stage(store, config_for(openai_server, judge_repeats=1, judge_repeat_fraction=0.5), progress=False)
    chosen = {f"run__t{i}__q1" for i in range(12) if selected_for_repeats(f"run__t{i}__q1", 0.5)}
    assert 0 < len(chosen) < 12
    assert {r.run_id for r in store.load().runs if r.judge_repeats} == chosen
    assert report.n_repeats_sent == len(chosen)


# ---------------------------------------------------------------------------------------------------------------------
# The API key


def test_api_key_never_reaches_records_files_or_errors(openai_server, tmp_path, monkeypatch):
    """A server that echoes the key (in errors and in output) must not get it into anything we keep."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    openai_server.script(
        Reply.http_error(401, f"Incorrect API key provided: {FAKE_KEY}."),
        Reply(text=f"your key is {FAKE_KEY}"),
        Reply.http_error(500, f"internal error for key {FAKE_KEY}"),
        Reply.http_error(500, f"internal error for key {FAKE_KEY}"),
    )
    store = make_store(tmp_path, ANSWER_SETS[:3])
    report = judge_stage(store, config_for(openai_server, judge_concurrency=1, judge_max_retries=1), progress=False)
    assert report.n_failed == {"api_error": 2, "invalid_json": 1}
    records = [r.judge for r in store.load().runs]
    for record in records:
        dumped = record.model_dump_json()
        assert FAKE_KEY not in dumped
        assert "[api key redacted]" in dumped  # the server really did echo it
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_KEY not in path.read_text()
    assert all(FAKE_KEY not in json.dumps(r.headers) for r in openai_server.requests)
    assert all(r.headers["authorization"] == "<redacted>" for r in openai_server.requests)


def test_the_loopback_server_does_not_count_a_request_whose_body_never_arrived():
    """A client killed between its headers and its body (the crash-safety tests kill mid-judging) made no call: the
    fake server must not record one, or a test would look for the prompt of an empty request."""
    import socket
    from urllib.parse import urlparse

    with FakeOpenAIServer() as server:
        url = urlparse(server.base_url)
        with socket.create_connection((url.hostname, url.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 500\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)  # the body never comes
            sock.recv(1024)  # the server closes without an answer
        call(server, api="chat")  # a whole request afterwards is answered and recorded

        assert [r.api for r in server.requests] == ["chat"]
        assert QUESTION in server.requests[0].prompt
