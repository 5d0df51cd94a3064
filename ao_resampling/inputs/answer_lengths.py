"""The answer lengths a stand-in reproduces: how long the real oracle's answers are, drawn per sample.

A random-weight stand-in almost never draws a stop token, so at scale its answers all run to max_new_tokens: ~5.7x
the decode work of the real oracle, whose answers are short (``ao_answer_lengths.json``: mean 20.9 tokens, max 43).
With ``answer_lengths = PATH`` (stand-ins only) each sample gets a length drawn from the file's ``counts_by_length``
table; the sampler then makes its stop token win at that token (engine/decoding/sampler.py), so the answer ends
through the same early-stop paths a real one does.

The draw is a pure function of (decode seed, run id, sample index): the same lengths on every card, batch size and
resume. Lengths count the answer's tokens, its stop token included; max_new_tokens still caps them.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ao_resampling.errors import AOResamplingError


class AnswerLengthsError(AOResamplingError, ValueError):
    """An answer-lengths file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class LengthTable:
    """Lengths and their cumulative counts, ascending."""

    lengths: tuple[int, ...]
    cumulative: tuple[int, ...]
    source: str

    @property
    def total(self) -> int:
        return self.cumulative[-1]

    def length_at(self, rank: int) -> int:
        """The length of the answer at ``rank`` (0 <= rank < total) when all are sorted by length."""
        return self.lengths[bisect.bisect_right(self.cumulative, rank)]


def load_answer_lengths(path: Path | str) -> LengthTable:
    """The ``counts_by_length`` table of a lengths file ({"counts_by_length": {"21": 89, ...}, ...})."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise AnswerLengthsError(f"{path}: cannot read the answer-lengths file: {e}") from e
    except json.JSONDecodeError as e:
        raise AnswerLengthsError(f"{path}: not valid JSON: {e}") from e
    counts = data.get("counts_by_length") if isinstance(data, dict) else None
    if not isinstance(counts, dict) or not counts:
        raise AnswerLengthsError(f"{path}: expected an object with a non-empty 'counts_by_length' object "
                                 "({\"length\": count, ...})")
    table = []
    for key, count in counts.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) >= 1):
            raise AnswerLengthsError(f"{path}: counts_by_length key {key!r}: expected a whole number of tokens >= 1")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise AnswerLengthsError(f"{path}: counts_by_length[{key!r}] = {count!r}: expected a count >= 0")
        if count:
            table.append((int(key), count))
    if not table:
        raise AnswerLengthsError(f"{path}: counts_by_length holds no answer (every count is 0)")
    table.sort()
    cumulative, running = [], 0
    for _, count in table:
        running += count
        cumulative.append(running)
    return LengthTable(tuple(length for length, _ in table), tuple(cumulative), str(path))


def _rank(seed: int, run_id: str, sample_index: int, total: int) -> int:
    digest = hashlib.blake2b(f"answer-length|{seed}|{run_id}|{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % total


def answer_lengths_for(table: LengthTable, *, seed: int, run_id: str, n: int, max_new_tokens: int) -> tuple[int, ...]:
    """The lengths of a run's n samples: each drawn from the table by its own hash, capped at max_new_tokens."""
    return tuple(min(table.length_at(_rank(seed, run_id, i, table.total)), max_new_tokens) for i in range(n))
