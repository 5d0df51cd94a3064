"""Targets and the question pool: load, validate, and sample questions with stable ids.

A *target* is a chat conversation whose activations the Activation Oracle is asked about; the *question pool*
is the list of questions we may ask it. Both come from user files (or the small examples in `builtin_data/`), so
every check fails with a `DataError` naming the file, the item and the field: someone with 100 conversations
should not have to bisect their file to find the bad one. Validated targets go on to encoding.py.

The pool can also be read straight out of a research script's `.py` file, which is parsed and never run
(py_source.py): the list read is the one importing the file would give, or the line it cannot follow is refused.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict
from ao_resampling.errors import AOResamplingError

from ao_resampling.inputs.py_source import PySourceError, read_string_list

ROLES = ("system", "user", "assistant")
_TARGET_KEYS = ("id", "messages")
_MESSAGE_KEYS = ("role", "content")


class DataError(AOResamplingError, ValueError):
    """Bad input data. The message names the file, the item (index and id) and the field, and what was expected."""


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class Target(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    messages: tuple[Message, ...]


class Question(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    text: str


# ---------------------------------------------------------------------------------------------- reading files


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _got(mapping: dict, key: str) -> str:
    return _show(mapping[key]) if key in mapping else "nothing (the field is missing)"


def _open(path: Path | str | None, builtin_name: str) -> tuple[str, str, str]:
    """(text, source name for messages, lower-case suffix) of a user file, or of a built-in one when path is None."""
    if path is None:
        resource = resources.files("ao_resampling") / "builtin_data" / builtin_name
        return resource.read_text(encoding="utf-8"), f"built-in {builtin_name}", Path(builtin_name).suffix
    path = Path(path)
    # str(path) rather than path.name: the user sees the path as they typed it, which tells two targets.json apart.
    source = str(path)
    try:  # -sig: an editor's byte-order mark is no part of the first question (or JSON's first character)
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{source}: cannot read file: {e}") from e
    return text, source, path.suffix.lower()


def _parse_json(text: str, source: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None


# ---------------------------------------------------------------------------------------------- targets


def load_targets(path: Path | None = None) -> list[Target]:
    """The target conversations in a JSON file (`path=None`: the built-in examples), validated."""
    text, source, _ = _open(path, "targets.json")
    data = _parse_json(text, source)
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of targets, got {type(data).__name__} {_show(data)}")
    if not data:
        raise DataError(f"{source}: expected at least one target, got an empty list")
    targets: list[Target] = []
    first_seen: dict[str, int] = {}
    for index, item in enumerate(data):
        target = _parse_target(item, f"{source}: item {index}")
        if target.id in first_seen:
            raise DataError(
                f"{source}: item {index} (id {target.id!r}): field 'id': expected a unique id, "
                f"but item {first_seen[target.id]} has the same one"
            )
        first_seen[target.id] = index
        targets.append(target)
    return targets


def _check_keys(mapping: dict, allowed: tuple[str, ...], where: str, prefix: str = "") -> None:
    # Unknown keys are usually typos ("contnet"); reporting them first beats a puzzling "field missing".
    for key in mapping:
        if key not in allowed:
            expected = " and ".join(repr(k) for k in allowed)
            raise DataError(f"{where}: field '{prefix}{key}': unknown field; expected only {expected}")


def _parse_target(item: object, where: str) -> Target:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with 'id' and 'messages', got {_show(item)}")
    target_id = item.get("id")
    valid_id = isinstance(target_id, str) and bool(target_id.strip())
    # Name the id as soon as it is usable; unknown keys come first since a misspelt "Id" explains a missing "id".
    _check_keys(item, _TARGET_KEYS, f"{where} (id {target_id!r})" if valid_id else where)
    if not valid_id:
        raise DataError(f"{where}: field 'id': expected a non-empty string, got {_got(item, 'id')}")
    where = f"{where} (id {target_id!r})"
    messages = item.get("messages")
    if not isinstance(messages, list) or not messages:
        got = _got(item, "messages")
        raise DataError(f"{where}: field 'messages': expected a non-empty list of messages, got {got}")
    parsed = [_parse_message(message, where, f"messages[{i}]") for i, message in enumerate(messages)]
    _check_turn_order(parsed, where)
    return Target(id=target_id, messages=tuple(parsed))


def _parse_message(message: object, where: str, field: str) -> Message:
    if not isinstance(message, dict):
        raise DataError(f"{where}: field '{field}': expected an object with 'role' and 'content', got {_show(message)}")
    _check_keys(message, _MESSAGE_KEYS, where, prefix=f"{field}.")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        got = _got(message, "role")
        raise DataError(f"{where}: field '{field}.role': expected one of {'/'.join(ROLES)}, got {got}")
    content = message.get("content")
    # Whitespace-only content would encode to a turn with nothing in it for the oracle to read.
    if not isinstance(content, str) or not content.strip():
        got = _got(message, "content")
        raise DataError(f"{where}: field '{field}.content': expected a non-empty string, got {got}")
    return Message(role=role, content=content)


def _check_turn_order(messages: list[Message], where: str) -> None:
    # Gemma's chat template raises unless turns alternate user/assistant starting with user; a system
    # message is folded into the first user turn, so it may only come first. Catching it here names the turn.
    start = 1 if messages[0].role == "system" else 0
    if start == len(messages):
        raise DataError(f"{where}: field 'messages': expected a user message after the system message, got none")
    for i in range(start, len(messages)):
        role = messages[i].role
        if role == "system":
            raise DataError(f"{where}: field 'messages[{i}].role': a system message may only be the first message")
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(
                f"{where}: field 'messages[{i}].role': expected {expected!r}, got {role!r} (Gemma's chat template needs "
                f"turns to alternate user/assistant, starting with user, after an optional system message)"
            )


def select_targets(targets: Sequence[Target], n: int, *, source: str = "targets") -> list[Target]:
    """The first n targets; `source` names where they came from, for the error message."""
    if n < 1:
        raise DataError(f"{source}: the number of targets must be at least 1, got {n}")
    if n > len(targets):
        raise DataError(f"{source}: asked for {n} targets but only {len(targets)} exist")
    return list(targets[:n])


# ---------------------------------------------------------------------------------------------- question pool


def load_question_pool(path: Path | None = None, *, variable: str = "sycophancy_questions") -> list[str]:
    """The question pool from `.json` (a list of strings), `.py` (the list bound to `variable`, read without
    running the file) or any other suffix (one question per line). `path=None`: the built-in pool."""
    text, source, suffix = _open(path, "questions.json")
    if suffix == ".json":
        entries = _questions_from_json(text, source)
    elif suffix == ".py":
        entries = _questions_from_python(text, source, variable)
    else:
        entries = [(line.strip(), f"line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    return _check_pool(entries, source)


def _questions_from_json(text: str, source: str) -> list[tuple[str, str]]:
    data = _parse_json(text, source)
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of question strings, got {type(data).__name__} {_show(data)}")
    for index, item in enumerate(data):
        if not isinstance(item, str):
            raise DataError(f"{source}: item {index}: expected a non-empty string, got {_show(item)}")
    return [(item, f"item {index}") for index, item in enumerate(data)]


def _check_pool(entries: list[tuple[str, str]], source: str) -> list[str]:
    """Entries are (question, where it is in the file); checks for blanks and duplicates."""
    if not entries:
        raise DataError(f"{source}: the question pool is empty; expected at least one question")
    first_seen: dict[str, str] = {}
    for question, where in entries:
        if not question.strip():
            raise DataError(f"{source}: {where}: expected a non-empty string, got {_show(question)}")
        # A duplicate would be sampled as two "different" questions and make spread look smaller than it is.
        key = question.strip()
        if key in first_seen:
            raise DataError(f"{source}: {where}: duplicate question {_show(key)}; it is also at {first_seen[key]}")
        first_seen[key] = where
    return [question for question, _ in entries]


def _questions_from_python(text: str, source: str, variable: str) -> list[tuple[str, str]]:
    try:
        return [(question, f"item {index} (line {line})")
                for index, (question, line) in enumerate(read_string_list(text, variable, filename=source))]
    except PySourceError as e:
        raise DataError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------------------- sampling


def question_id(index: int, pool_size: int) -> str:
    """`aoq_07`: the position in the pool, so a question keeps its id whatever the seed or k."""
    width = max(2, len(str(pool_size - 1)))
    return f"aoq_{index:0{width}d}"


def sample_questions(pool: Sequence[str], k: int, seed: int) -> list[Question]:
    """k distinct questions chosen by `random.Random(seed)`, in pool order."""
    if k < 1:
        raise DataError(f"question pool: the number of questions to sample must be at least 1, got {k}")
    if k > len(pool):
        raise DataError(f"question pool: asked for {k} distinct questions but the pool has only {len(pool)}")
    # Random(int).sample over a range is specified and stable across platforms and Python >= 3.11.
    indices = sorted(random.Random(seed).sample(range(len(pool)), k))
    return [Question(id=question_id(i, len(pool)), text=pool[i]) for i in indices]
