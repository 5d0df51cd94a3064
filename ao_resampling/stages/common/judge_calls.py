"""The LLM judge's edge, shared by every stage that judges (the AO runs' judge stage, the target-model baseline).

``judge_prompt`` is one call into the ``openai`` client, of either kind (a 1-10 verdict or a partition into
meanings), which never raises for API or output problems but returns a ``JudgeRecord`` holding either the parsed reply
or a failure with its reason, always with the prompt and the raw reply (unscored is not zero). ``run_calls`` runs a
stage's owed calls concurrently and hands each record back (to be journaled) as it lands, so a kill loses only the
calls in flight; ``job_caller`` is the call of any owed job. ``CallCounts`` counts one kind of call;
``check_one_judge`` keeps one judge model per folder.

Retries are the SDK's own (``max_retries``); nothing here loops. The API key never leaves the client: error texts
and raw replies are scrubbed of it before they are stored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import openai
from tqdm.auto import tqdm

from ao_resampling.config import ExperimentConfig
from ao_resampling.errors import AOResamplingError, PipelineError
from ao_resampling.redaction import redact
from ao_resampling.results import (
    ClusterRecord, ClusterVerdict, FailureReason, JudgeFailure, JudgeRecord, Results, Verdict,
)
from ao_resampling.stages.common.judge_prompt import RESPONSE_SCHEMAS, CallKind, JudgeOutputError, parse_reply
from ao_resampling.stages.common.prompts import build_prompt

# Local OpenAI-compatible servers ignore the key, but the SDK refuses to build a client without one.
PLACEHOLDER_API_KEY = "sk-local-no-key"


class JudgeConfigError(AOResamplingError, RuntimeError):
    """The judge cannot be reached as configured (no key, no server); raised before any expensive work."""


# ---------------------------------------------------------------------------------------------------------------------
# Client (the edge)


def _base_url(config: ExperimentConfig) -> str | None:
    return config.judge_base_url or os.environ.get("OPENAI_BASE_URL") or None


def check_judge_access(config: ExperimentConfig) -> None:
    """Fail early, before any model is loaded, when the judge has neither a key nor a server to talk to."""
    if not os.environ.get("OPENAI_API_KEY") and _base_url(config) is None:
        raise JudgeConfigError(
            "the judge needs an OpenAI API key or an OpenAI-compatible server: set OPENAI_API_KEY, or set "
            "judge_base_url (or OPENAI_BASE_URL) to a local server, or turn judging off (judge = false)"
        )


def make_client(config: ExperimentConfig) -> openai.OpenAI:
    """An ``openai.OpenAI`` with the config's timeout and the SDK's own retries (``max_retries``)."""
    check_judge_access(config)
    return openai.OpenAI(
        api_key=os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_API_KEY,
        base_url=_base_url(config),
        timeout=config.judge_timeout_s,
        max_retries=config.judge_max_retries,
    )


@dataclass(frozen=True)
class _Reply:
    text: str | None
    refusal: str | None = None
    incomplete: str | None = None  # why the reply was cut short, when it was


def _call(client: Any, *, model: str, api: str, prompt: str, kind: CallKind) -> _Reply:
    # No temperature: gpt-5 models reject it, and the judge's own noise is measured by repeats instead.
    # with_raw_response: a 200 whose body is not the API's object (an HTML error page, cut-off JSON) is kept verbatim.
    name, schema = RESPONSE_SCHEMAS[kind]
    if api == "chat":
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": prompt}], response_format=fmt
        )
        return _parsed(raw, _chat_reply, api)
    fmt = {"type": "json_schema", "name": name, "schema": schema, "strict": True}
    raw = client.responses.with_raw_response.create(model=model, input=prompt, text={"format": fmt})
    return _parsed(raw, _responses_reply, api)


def _parsed(raw: Any, read: Any, api: str) -> _Reply:
    try:
        return read(raw.parse())
    except _BadStatus as e:
        e.body = raw.text
        raise
    except (ValueError, AttributeError, TypeError, KeyError) as e:
        raise _Malformed(raw.text, f"the server's reply is not a well-formed {api} object: {type(e).__name__}: {e}") \
            from e


class _Malformed(Exception):
    """A reply the server sent with success status that is not the API's object; ``body`` is its raw text."""

    def __init__(self, body: str, detail: str):
        super().__init__(detail)
        self.body, self.detail = body, detail


def _responses_reply(resp: Any) -> _Reply:
    texts, refusals = [], []
    for item in resp.output or []:
        if getattr(item, "type", None) != "message":
            continue  # reasoning items and the like carry no answer
        for part in getattr(item, "content", None) or []:
            if getattr(part, "type", None) == "output_text":
                texts.append(part.text or "")
            elif getattr(part, "type", None) == "refusal":
                refusals.append(part.refusal or "")
    incomplete = None
    if resp.status == "incomplete":
        incomplete = f"response status 'incomplete' (reason: {getattr(resp.incomplete_details, 'reason', None)})"
    elif resp.status not in (None, "completed"):
        raise _BadStatus(f"response status {resp.status!r}: {getattr(resp.error, 'message', None)}")
    return _Reply("".join(texts) if texts else None, "\n".join(refusals) if refusals else None, incomplete)


def _chat_reply(resp: Any) -> _Reply:
    if not resp.choices:
        return _Reply(None)
    choice = resp.choices[0]
    refusal = choice.message.refusal
    if choice.finish_reason == "content_filter" and refusal is None:
        refusal = "finish_reason 'content_filter'"
    incomplete = "finish_reason 'length'" if choice.finish_reason == "length" else None
    return _Reply(choice.message.content, refusal, incomplete)


class _BadStatus(Exception):
    """A Responses object whose status is 'failed' or 'cancelled': the API's failure, not the model's reply."""

    body: str | None = None


def _scrub(text: str | None, secret: str | None) -> str | None:
    if text is None or not secret:
        return text
    return text.replace(secret, "[api key redacted]")


def _detail(text: str, secret: str | None) -> str:
    """A failure's detail as stored: an error may quote the URL it was sent to, credentials and all."""
    return _scrub(redact(text), secret)


def _describe(e: Exception) -> tuple[str | None, str]:
    """(raw body, detail) for an API exception; the body is whatever the server said, when it said anything."""
    if isinstance(e, openai.APIStatusError):
        body = e.response.text if e.response is not None else None
        return body, f"{type(e).__name__} (HTTP {e.status_code}, after any SDK retries): {e}"
    if isinstance(e, _BadStatus):
        return e.body, str(e)
    return None, f"{type(e).__name__}: {e}"


def judge_once(
    *,
    client: Any,
    model: str,
    api: str,
    question: str,
    answers: Sequence[str],
    judge_call_id: str,
    answer_order: list[int] | None = None,
) -> JudgeRecord:
    """One judge call. Never raises for API or output problems: they become a ``failure`` on the record."""
    return judge_prompt(client=client, model=model, api=api, prompt=build_prompt(question=question, answers=answers),
                        judge_call_id=judge_call_id, answer_order=answer_order)


def judge_prompt(
    *,
    client: Any,
    model: str,
    api: str,
    prompt: str,
    judge_call_id: str,
    answer_order: Sequence[int] | None = None,
    kind: CallKind = "verdict",
    shuffle_seed: int | None = None,
) -> JudgeRecord | ClusterRecord:
    """One call of ``kind`` for a built prompt (``judge_once``'s, a cluster prompt, the target-model baseline's):
    the kind's schema and parser, the same failure rules. A cluster call's reply is mapped back through
    ``answer_order``, the order its answers were shown in (drawn with ``shuffle_seed``)."""
    if api not in ("responses", "chat"):
        raise ValueError(f"unknown judge api {api!r}; expected 'responses' or 'chat'")
    secret = getattr(client, "api_key", None)
    secret = secret if isinstance(secret, str) else None
    created_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    started = time.perf_counter()
    raw, failure, parsed = _ask(client, model=model, api=api, prompt=prompt, kind=kind, answer_order=answer_order)
    latency_s = round(time.perf_counter() - started, 3)
    kind_fields = {"shuffle_seed": shuffle_seed} if kind == "clusters" else {}
    return (ClusterRecord if kind == "clusters" else JudgeRecord)(
        judge_call_id=judge_call_id,
        model=model,
        prompt=prompt,
        raw_output=_scrub(raw, secret),
        parsed=parsed,
        failure=JudgeFailure(reason=failure[0], detail=_detail(failure[1], secret)) if failure else None,
        api=api,
        answer_order=list(answer_order) if answer_order is not None else None,
        latency_s=latency_s,
        created_at=created_at,
        **kind_fields,
    )


def _ask(client: Any, *, model: str, api: str, prompt: str, kind: CallKind, answer_order: Sequence[int] | None
         ) -> tuple[str | None, tuple[FailureReason, str] | None, Verdict | ClusterVerdict | None]:
    """(raw reply, failure, parsed) of one call: every API or output problem is a failure, never an exception."""
    raw: str | None = None
    try:
        reply = _call(client, model=model, api=api, prompt=prompt, kind=kind)
        # A reply with no text is stored as "" (the server answered, with nothing), not None (no reply at all).
        raw = reply.refusal if reply.refusal is not None else (reply.text or "")
        if reply.refusal is not None:
            return raw, ("refusal", f"the model refused: {reply.refusal[:200]}"), None
        if reply.incomplete is not None:
            return raw, ("incomplete", reply.incomplete), None
        if reply.text is None:
            return raw, ("empty_output", "the reply holds no output text (no message from the model)"), None
        return raw, None, parse_reply(reply.text or "", kind=kind, answer_order=answer_order)
    except JudgeOutputError as e:
        return raw, (e.reason, e.detail), None
    except openai.APITimeoutError as e:
        return raw, ("timeout", f"no reply within the client timeout after the SDK's retries: {e}"), None
    except (openai.OpenAIError, _BadStatus) as e:
        body, detail = _describe(e)
        return body, ("api_error", detail), None
    except _Malformed as e:  # a server that answered 200 with something that is not a Responses / chat object
        return e.body, ("api_error", e.detail), None


# ---------------------------------------------------------------------------------------------------------------------
# Counting and checking the calls


@dataclass
class CallCounts:
    """One kind of call in one stage: sent, parsed, failed by FailureReason, skipped (already had a parsed reply)."""

    sent: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    skipped: int = 0

    def add(self, record: JudgeRecord) -> None:
        self.sent += 1
        self.ok += record.failure is None
        if record.failure is not None:
            self.failed[record.failure.reason] = self.failed.get(record.failure.reason, 0) + 1

    def line(self, what: str, done: str) -> str:
        return f"{what}: {self.sent} call(s) sent, {self.ok} {done}" + _failures(self.failed)


def _failures(by_reason: dict[str, int]) -> str:
    if not by_reason:
        return ""
    return f", {sum(by_reason.values())} failed (" + ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items())) + ")"


def latest_records(results: Results) -> list[JudgeRecord]:
    """The latest record of every judge call made (AO runs' verdicts and clusters, their repeats, the baseline's)."""
    records = [rec for r in results.runs for rec in (r.judge, r.clusters, *r.judge_repeats, *r.cluster_repeats)]
    records += [rec for r in results.baseline.runs for rec in (r.judge, r.clusters)] if results.baseline else []
    return [r for r in records if r is not None]


def judge_models(results: Results) -> set[str]:
    """Every judge model a folder names: meta (planned and configured) and each judge record, failed ones included."""
    models = {m for r in latest_records(results) for m in [r.model, *(f.model for f in r.previous_failures)]}
    models.add(results.meta.judge_model)
    models.add((results.meta.config or {}).get("judge_model"))
    return {m for m in models if isinstance(m, str)}


def check_one_judge(results: Results, config: ExperimentConfig, source: Any) -> None:
    """Refuse a judge model other than the folder's: its verdicts would join the same score distribution, while meta
    and the report name only one judge (as ``run`` refuses any other result-changing setting)."""
    others = sorted(judge_models(results) - {config.judge_model})
    if others:
        raise PipelineError(
            f"{source} is judged by {', '.join(map(repr, others))}; judging it with {config.judge_model!r} would mix "
            f"two judges' verdicts in one distribution. Use --judge-model {others[0]!r} to continue, or run the "
            "experiment again into another --out folder with the other judge.")


# ---------------------------------------------------------------------------------------------------------------------
# Running the calls


def job_caller(client: Any, config: ExperimentConfig) -> Callable[[Any], JudgeRecord]:
    """The one call of any owed job (an AO run's or the baseline's, a verdict or clusters): it holds its ``prompt``,
    ``kind``, ``judge_call_id`` and, shuffled, its ``answer_order`` and ``shuffle_seed``."""

    def call(job: Any) -> JudgeRecord:
        return judge_prompt(client=client, model=config.judge_model, api=config.judge_api, prompt=job.prompt,
                            judge_call_id=job.judge_call_id, answer_order=job.answer_order, kind=job.kind,
                            shuffle_seed=job.shuffle_seed)

    return call


def run_calls(jobs: Sequence[Any], call: Callable[[Any], JudgeRecord], keep: Callable[[Any, JudgeRecord], None], *,
              concurrency: int, desc: str, progress: bool, log: Callable[[str], None], resume: str) -> None:
    """``call`` every job, ``concurrency`` at a time, and ``keep`` (journal) each record from this thread as it lands,
    so a kill loses only the calls in flight. On Ctrl-C nothing new is sent, the calls in flight are still kept
    (they are paid for), and KeyboardInterrupt goes on up."""
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=desc.replace(" ", "-"))
    bar = tqdm(total=len(jobs), desc=desc, unit="call", disable=not progress)
    futures: dict[Future, Any] = {}
    n_failed = 0

    def land(future: Future) -> None:
        nonlocal n_failed
        record = future.result()
        keep(futures[future], record)
        del futures[future]  # only once kept: a Ctrl-C during keep() leaves it to be kept again (replay-safe)
        n_failed += record.failure is not None
        if n_failed:
            bar.set_postfix(failed=n_failed)
        bar.update(1)

    try:
        futures.update({executor.submit(call, job): job for job in jobs})
        for future in as_completed(list(futures)):
            land(future)
    except KeyboardInterrupt:
        _finish_in_flight(futures, land, log, kept=len(jobs) - len(futures), what=desc, resume=resume)
        raise
    finally:
        bar.close()
        executor.shutdown(wait=False, cancel_futures=True)


def _finish_in_flight(futures: dict[Future, Any], land: Callable[[Future], None], log: Callable[[str], None], *,
                      kept: int, what: str, resume: str) -> None:
    """On Ctrl-C: send nothing new, but keep the replies of the calls already sent."""
    in_flight = [f for f in futures if not f.cancel()]  # cancel() fails only for calls already running or done
    log(f"\n{what}: interrupted. {kept} reply(ies) already journaled; waiting for the {len(in_flight)} call(s) in "
        "flight so their replies are kept (Ctrl-C again to give them up).")
    try:
        for future in as_completed(in_flight):
            land(future)
    except KeyboardInterrupt:
        log(f"{what}: gave up waiting; the {len(futures)} call(s) not journaled are sent again by a re-run.")
        return
    log(f"{what}: kept {len(in_flight)} more; {len(futures)} call(s) never sent. Re-run `{resume}` to do the rest.")
