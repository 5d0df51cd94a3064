"""A fake OpenAI server on 127.0.0.1 that the real ``openai`` client can talk to.

It speaks ``POST /v1/responses`` and ``POST /v1/chat/completions`` closely enough for the SDK's response models, so
tests exercise the real client (its retries, timeouts, error classes) with no network. By default it answers a
verdict call with a verdict computed from the answers it was shown (10 when all are identical, one point less per
extra distinct answer), and a cluster call (asked for the cluster schema) with the partition in which answers of
identical text, and only those, are one meaning (``expected_clusters``), so end-to-end numbers can be recomputed
from the stored answers; a test can script the next replies (``script``) or swap the ``behaviour`` for anything
else. It records every request (secrets removed) and the most requests in flight at once.

Use the ``openai_server`` fixture (register with ``pytest_plugins = ["tests.support.openai_server"]``), or
``with FakeOpenAIServer() as server:``; point a client at ``server.base_url``.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ao_resampling.stages.common.judge_prompt import CLUSTER_SCHEMA_NAME
from ao_resampling.stages.common.prompts import answers_in_prompt, numbered_blocks

SECRET_HEADERS = {"authorization", "api-key", "x-api-key", "openai-api-key"}
ENDPOINTS = {"/v1/responses": "responses", "/v1/chat/completions": "chat"}


@dataclass(frozen=True)
class Reply:
    """What the server sends for one request. ``text=None`` means the model produced no message at all."""

    text: str | None = None
    status: int = 200
    error: str = "error"  # message of a non-200 reply
    refusal: str | None = None
    incomplete: bool = False  # Responses status "incomplete" / chat finish_reason "length"
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None  # sent as-is instead of a well-formed object (a str verbatim, anything else as JSON)

    @classmethod
    def verdict(cls, score: Any, rationale: str = "scripted verdict", **extra: Any) -> "Reply":
        return cls(text=json.dumps({"similarity_1_to_10": score, "rationale": rationale, **extra}))

    @classmethod
    def http_error(cls, status: int, message: str = "scripted error", *, retry_after_ms: int | None = 10) -> "Reply":
        # A short retry-after-ms keeps the SDK's retries (0.5-8 s backoff otherwise) fast in tests.
        headers = {"retry-after-ms": str(retry_after_ms)} if retry_after_ms is not None else {}
        return cls(status=status, error=message, headers=headers)

    @classmethod
    def refused(cls, message: str = "I'm sorry, but I can't help with that.") -> "Reply":
        return cls(refusal=message)

    @classmethod
    def cut_short(cls, text: str | None = '{"similarity_1_to_10": 7, "ration') -> "Reply":
        return cls(text=text, incomplete=True)


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    api: str  # "responses" | "chat"
    body: dict[str, Any]
    headers: dict[str, str]  # lower-case names; secret ones replaced by "<redacted>"
    arrived_at: float  # time.monotonic()

    @property
    def prompt(self) -> str:
        """The user text sent, whichever API and input shape was used."""
        if self.api == "chat":
            return _text_of(self.body["messages"][-1]["content"])
        value = self.body.get("input", "")
        return value if isinstance(value, str) else _text_of(value[-1].get("content", ""))

    @property
    def answers(self) -> list[str]:
        return answers_in_prompt(self.prompt)

    @property
    def shown(self) -> list[str]:
        """The texts the prompt numbers: an AO prompt's answers, else a baseline prompt's replies."""
        return self.answers or numbered_blocks(self.prompt, "response")

    @property
    def schema_name(self) -> str | None:
        """The name of the structured-output schema the call asked for (which kind of call it is)."""
        fmt = self.body.get("response_format", {}).get("json_schema", {}) if self.api == "chat" else \
            self.body.get("text", {}).get("format", {})
        return fmt.get("name") if isinstance(fmt, dict) else None

    @property
    def is_cluster_call(self) -> bool:
        return self.schema_name == CLUSTER_SCHEMA_NAME


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def expected_score(answers: list[str]) -> int:
    """The default behaviour's score: 10 when all answers are identical, one less per extra distinct answer."""
    return min(10, max(1, 10 - (len(set(answers)) - 1)))  # prompts without <answer> blocks (baseline) score 10


def deterministic_verdict(request: RecordedRequest) -> Reply:
    answers = request.answers
    return Reply.verdict(expected_score(answers), f"{len(set(answers))} distinct answer(s) out of {len(answers)}")


def expected_clusters(texts: list[str]) -> list[list[int]]:
    """The default behaviour's partition of the shown texts: identical texts (and only those) are one cluster, as
    1-based shown numbers, clusters in order of first appearance."""
    clusters: dict[str, list[int]] = {}
    for i, text in enumerate(texts, start=1):
        clusters.setdefault(text, []).append(i)
    return list(clusters.values())


def deterministic_clusters(request: RecordedRequest) -> Reply:
    shown = request.shown
    clusters = [{"meaning": f"says {shown[c[0] - 1][:30]!r}", "answers": c} for c in expected_clusters(shown)]
    return Reply(text=json.dumps({"clusters": clusters}))


def deterministic_reply(request: RecordedRequest) -> Reply:
    """A cluster call gets ``deterministic_clusters``, any other call ``deterministic_verdict``."""
    return deterministic_clusters(request) if request.is_cluster_call else deterministic_verdict(request)


Behaviour = Callable[[RecordedRequest], Reply]


class FakeOpenAIServer:
    def __init__(self, behaviour: Behaviour = deterministic_reply, *, delay_s: float = 0.0):
        self.behaviour = behaviour
        self.delay_s = delay_s  # added to every reply (e.g. to make concurrent calls overlap)
        self.errors: list[str] = []  # exceptions raised by a behaviour (answered as HTTP 500)
        self._requests: list[RecordedRequest] = []
        # scripted replies, one queue per kind of call, so a cluster call never takes a reply meant for a verdict
        self._queues: dict[str, collections.deque[Reply]] = {"verdict": collections.deque(),
                                                              "clusters": collections.deque()}
        self._lock = threading.Lock()
        self._in_flight = 0
        self._max_in_flight = 0
        self._ids = itertools.count(1)
        self._closing = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # Idle keep-alive connections must not hold up close(); handler threads are daemons.
        self._httpd.block_on_close = False
        # close() waits for the serving loop to notice, up to one poll interval: short, as ~140 tests close one.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.005},
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()  # wakes handlers sleeping in a scripted delay
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # -- scripting and inspection ------------------------------------------------------------------------------------
    def script(self, *replies: Reply, kind: str = "verdict") -> None:
        """Queue replies for the next requests of ``kind`` ("verdict" or "clusters"), in arrival order; after them the
        ``behaviour`` answers again."""
        with self._lock:
            self._queues[kind].extend(replies)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            for queue in self._queues.values():
                queue.clear()
            self._max_in_flight = 0
            self.errors.clear()

    # -- serving -----------------------------------------------------------------------------------------------------
    def _serve(self, handler: "_Handler") -> None:
        path = handler.path.split("?", 1)[0]
        length = int(handler.headers.get("content-length", 0))
        raw = handler.rfile.read(length) if length else b""
        if len(raw) < length:  # the client died between its headers and the end of its body (a test's kill): no call
            return
        api = ENDPOINTS.get(path)
        if api is None:
            handler.send_json(404, _error_body(f"unknown path {path}", "invalid_request_error"))
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            handler.send_json(400, _error_body("request body is not JSON", "invalid_request_error"))
            return
        headers = {k.lower(): ("<redacted>" if k.lower() in SECRET_HEADERS else v) for k, v in handler.headers.items()}
        request = RecordedRequest(path=path, api=api, body=body, headers=headers, arrived_at=time.monotonic())
        with self._lock:
            self._requests.append(request)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            queue = self._queues["clusters" if request.is_cluster_call else "verdict"]
            reply = queue.popleft() if queue else None
        try:
            if reply is None:
                try:
                    reply = self.behaviour(request)
                except Exception as e:  # a broken behaviour is the test's bug: answer 500 and keep it for the test
                    self.errors.append(f"{type(e).__name__}: {e}")
                    reply = Reply.http_error(500, f"fake server behaviour raised {type(e).__name__}: {e}")
            if self._closing.wait(reply.delay_s + self.delay_s):
                return
            if reply.body is not None:
                handler.send_raw(reply.status, reply.body, reply.headers)
            elif reply.status != 200:
                handler.send_json(reply.status, _error_body(reply.error, "server_error"), reply.headers)
            else:
                make = _responses_body if api == "responses" else _chat_body
                handler.send_json(200, make(reply, body.get("model", "unknown"), next(self._ids)), reply.headers)
        finally:
            with self._lock:
                self._in_flight -= 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection ends its thread after this
    fake: FakeOpenAIServer

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            self.fake._serve(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout) before we answered: that is the case under test

    def send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.send_raw(status, payload, headers)

    def send_raw(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _usage_tokens(reply: Reply) -> int:
    return len((reply.text or reply.refusal or "").split())


def _responses_body(reply: Reply, model: str, n: int) -> dict[str, Any]:
    # gpt-5 models put a reasoning item before the message; the judge must skip it.
    output: list[dict[str, Any]] = [{"type": "reasoning", "id": f"rs_{n:06d}", "summary": []}]
    if reply.refusal is not None:
        content = [{"type": "refusal", "refusal": reply.refusal}]
    elif reply.text is not None:
        content = [{"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}]
    else:
        content = None
    if content is not None:
        status = "incomplete" if reply.incomplete else "completed"
        output.append({"type": "message", "id": f"msg_{n:06d}", "role": "assistant", "status": status,
                       "content": content})
    out_tokens = _usage_tokens(reply)
    return {
        "id": f"resp_{n:06d}", "object": "response", "created_at": time.time(), "model": model,
        "status": "incomplete" if reply.incomplete else "completed", "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if reply.incomplete else None,
        "instructions": None, "metadata": {}, "output": output, "parallel_tool_calls": True,
        "temperature": None, "tool_choice": "auto", "tools": [], "top_p": None,
        "usage": {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": out_tokens,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 100 + out_tokens},
    }


def _chat_body(reply: Reply, model: str, n: int) -> dict[str, Any]:
    finish = "length" if reply.incomplete else "stop"
    message = {"role": "assistant", "content": None if reply.refusal is not None else reply.text,
               "refusal": reply.refusal, "annotations": []}
    out_tokens = _usage_tokens(reply)
    return {
        "id": f"chatcmpl-{n:06d}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 100, "completion_tokens": out_tokens, "total_tokens": 100 + out_tokens},
    }


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAIServer]:
    """A started FakeOpenAIServer, closed after the test."""
    server = FakeOpenAIServer().start()
    try:
        yield server
    finally:
        server.close()


__all__ = ["FakeOpenAIServer", "RecordedRequest", "Reply", "deterministic_clusters", "deterministic_reply",
           "deterministic_verdict", "expected_clusters", "expected_score", "openai_server"]
