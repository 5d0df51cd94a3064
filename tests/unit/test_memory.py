"""The decode step's row budget (engine/decoding/memory.py) and how the sampler and the stages use it, on the CPU.

- ``row_budget``: Gemma 3 27B's bytes per KV position, per decode-step row and per prefilled token, checked against
  the config's numbers and the module's documented constants written out by hand.
- ``rows_that_fit``: hand-computed examples, 0 when not one row fits, and as properties: more free memory never gives
  fewer rows, the rows and the set-asides never take more than ``1 - SAFETY`` of the free memory, one row more would.
- ``free_bytes``: None on a CPU; on a (faked) CUDA device torch's cache is emptied before the free memory is read,
  and what torch holds unused counts as free.
- ``Sampler._layout`` with ``free_bytes`` patched (the GPU path, on the tiny model on the CPU): "auto" takes the rows
  that fit, capped at the samples; an explicit row count that does not fit, or memory for not even one row, is
  refused before any forward runs.
- ``run_sampler``: the refusal and an out-of-memory error become the tool's one-line PipelineError.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ao_resampling.engine.decoding import memory
from ao_resampling.engine.decoding.memory import BatchTooLarge, RowBudget
from ao_resampling.engine.decoding.sampler import PREFILL_QUERIES, Query, Sampler
from ao_resampling.engine.decoding.settings import model_generation_config, resolve_decoding
from ao_resampling.engine.loading.models import synthetic_config, text_config
from ao_resampling.errors import PipelineError
from ao_resampling.stages.common.sampling import run_sampler

GiB = 2**30


# -- row_budget --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma27b_text():
    text = synthetic_config("gemma-3-27b").get_text_config(decoder=True)
    sizes = (text.num_hidden_layers, text.num_key_value_heads, text.head_dim, text.hidden_size,
             text.intermediate_size, text.vocab_size)
    assert sizes == (62, 16, 128, 5376, 21504, 262208), "the numbers below are written for these sizes"
    return text


def test_gemma27b_row_budget_in_bf16(gemma27b_text):
    budget = memory.row_budget(gemma27b_text, torch.bfloat16)

    activations = (memory.STEP_HIDDEN_COPIES * 5376 + 3 * 21504) * 2  # hidden copies and the MLP's 3, bf16
    assert budget.kv_per_position == 62 * 16 * 128 * 2 * 2 == 507904  # layers x KV heads x head_dim x (K, V) x 2 bytes
    assert budget.step_per_row == activations + 262208 * memory.STEP_LOGIT_BYTES
    assert budget.prefill_per_token == 507904 + activations
    assert budget.per_row(39 + 120) == 507904 * 159 + budget.step_per_row


def test_float32_doubles_the_kv_and_activations_not_the_logit_scratch(gemma27b_text):
    bf16 = memory.row_budget(gemma27b_text, torch.bfloat16)
    f32 = memory.row_budget(gemma27b_text, torch.float32)

    activations = (memory.STEP_HIDDEN_COPIES * 5376 + 3 * 21504) * 4
    assert f32.kv_per_position == 2 * bf16.kv_per_position == 62 * 16 * 128 * 2 * 4
    assert f32.step_per_row == activations + 262208 * memory.STEP_LOGIT_BYTES
    assert f32.prefill_per_token == 62 * 16 * 128 * 2 * 4 + activations


# -- rows_that_fit -----------------------------------------------------------------------------------------------------


def fit_by_hand(free: int, kv: int, step: int, prefill: int, *, prompt_len: int, max_new_tokens: int,
                prefill_tokens: int) -> int:
    """The module's documented rule written out: what is left of ``1 - SAFETY`` of the free bytes after the reserve
    and a prefill, in whole rows of (prompt + new tokens) KV positions plus a step's working memory."""
    usable = free * (1 - memory.SAFETY) - memory.RESERVE_BYTES - prefill * prefill_tokens
    return max(0, math.floor(usable / (kv * (prompt_len + max_new_tokens) + step)))


def test_h100_example_27b_bf16(gemma27b_text):
    """25 GiB left after the weights, prompts of 39 tokens, 120 new tokens, a prefill block of 32 prompts."""
    budget = memory.row_budget(gemma27b_text, torch.bfloat16)
    kv, activations = 507904, (12 * 5376 + 3 * 21504) * 2
    step = activations + 262208 * 14

    got = memory.rows_that_fit(25 * GiB, budget, prompt_len=39, max_new_tokens=120, prefill_tokens=32 * 39)

    assert (memory.SAFETY, memory.RESERVE_BYTES, memory.STEP_HIDDEN_COPIES, memory.STEP_LOGIT_BYTES) == \
        (0.10, 2 * GiB, 12, 14), "the 248 below is worked out with these"
    # 25 GiB x 0.9 - 2 GiB - 765952 B x 1248 tokens = 21055799296 B; / (507904 B x 159 + 3928960 B) = 248.6
    assert got == fit_by_hand(25 * GiB, kv, step, kv + activations, prompt_len=39, max_new_tokens=120,
                              prefill_tokens=32 * 39) == 248


@pytest.mark.parametrize("free", [0, 1 * GiB, math.ceil((2 * GiB + 765952 * 1248 + 84685696 // 2) / 0.9)],
                         ids=["nothing", "under_the_reserve", "half_a_row"])
def test_no_row_fits_gives_0(gemma27b_text, free):
    """Nothing, less than the reserve, or room for the reserve and the prefill but only half a row of 84685696 B."""
    budget = memory.row_budget(gemma27b_text, torch.bfloat16)
    assert memory.rows_that_fit(free, budget, prompt_len=39, max_new_tokens=120, prefill_tokens=32 * 39) == 0


budgets = st.builds(RowBudget, kv_per_position=st.integers(1, 2**20), step_per_row=st.integers(0, 2**26),
                    prefill_per_token=st.integers(0, 2**21))
shapes = dict(prompt_len=st.integers(1, 4096), max_new_tokens=st.integers(1, 4096),
              prefill_tokens=st.integers(0, 2**14))


@given(free=st.integers(0, 2**40), more=st.integers(0, 2**40), budget=budgets, **shapes)
def test_more_free_memory_never_gives_fewer_rows(free, more, budget, prompt_len, max_new_tokens, prefill_tokens):
    def rows(free_bytes: int) -> int:
        return memory.rows_that_fit(free_bytes, budget, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                    prefill_tokens=prefill_tokens)
    assert rows(free + more) >= rows(free)


@given(free=st.integers(0, 2**40), budget=budgets, **shapes)
def test_the_rows_and_the_set_asides_stay_within_the_safe_share_and_one_more_row_would_not(
        free, budget, prompt_len, max_new_tokens, prefill_tokens):
    rows = memory.rows_that_fit(free, budget, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                prefill_tokens=prefill_tokens)
    per_row = budget.kv_per_position * (prompt_len + max_new_tokens) + budget.step_per_row
    set_asides = memory.RESERVE_BYTES + budget.prefill_per_token * prefill_tokens
    safe = free * (1 - memory.SAFETY)

    assert rows >= 0
    if rows:
        assert rows * per_row + set_asides <= safe
    assert (rows + 1) * per_row + set_asides > safe  # the most that fit


# -- free_bytes --------------------------------------------------------------------------------------------------------


def test_free_bytes_is_none_on_a_cpu_and_asks_cuda_nothing(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU device asked torch.cuda")
    for name in ("synchronize", "empty_cache", "mem_get_info", "memory_reserved", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)

    assert memory.free_bytes(torch.device("cpu")) is None


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_free_bytes_empties_torchs_cache_first_and_counts_its_unused_blocks(monkeypatch, device):
    device = torch.device(device)
    calls: list[tuple[str, object]] = []

    def recorder(name: str, result=None):
        def call(*args):
            calls.append((name, args[0] if args else None))
            return result
        return call

    monkeypatch.setattr(torch.cuda, "synchronize", recorder("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", recorder("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", recorder("mem_get_info", (30 * GiB, 80 * GiB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", recorder("memory_reserved", 7 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", recorder("memory_allocated", 4 * GiB))

    assert memory.free_bytes(device) == 30 * GiB + 7 * GiB - 4 * GiB
    names = [name for name, _ in calls]
    assert "empty_cache" in names and names.index("empty_cache") < names.index("mem_get_info")
    assert names.index("synchronize") < names.index("empty_cache")
    assert all(arg == device for name, arg in calls if name != "empty_cache"), calls


# -- the sampler's rows (tiny model, CPU, free_bytes patched: the GPU path) --------------------------------------------

PROMPTS = (tuple(range(100, 110)), tuple(range(200, 217)))  # 10 and 17 tokens: the prompt region is 17
N = 3  # samples per query: 6 in all
NEW_TOKENS = 3


def tiny_budget_by_hand(model) -> tuple[int, int, int]:
    """(KV bytes per position, step bytes per row, prefill bytes per token) of a float32 model, from its text config
    and the module's constants."""
    text = text_config(model)
    kv = text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 2 * 4
    activations = (memory.STEP_HIDDEN_COPIES * text.hidden_size + 3 * text.intermediate_size) * 4
    return kv, activations + text.vocab_size * memory.STEP_LOGIT_BYTES, kv + activations


def free_for(model, rows: int) -> int:
    """Free bytes that leave room for ``rows`` rows and a half (half a row short of the next: no rounding edge)."""
    kv, step, prefill = tiny_budget_by_hand(model)
    needed = memory.RESERVE_BYTES + prefill * PREFILL_QUERIES * 17 + (rows + 0.5) * (kv * (17 + NEW_TOKENS) + step)
    return math.ceil(needed / (1 - memory.SAFETY))


def expected_fit(model, free: int) -> int:
    kv, step, prefill = tiny_budget_by_hand(model)
    return fit_by_hand(free, kv, step, prefill, prompt_len=17, max_new_tokens=NEW_TOKENS,
                       prefill_tokens=PREFILL_QUERIES * 17)


@pytest.fixture(params=["tiny_model", "tiny_multimodal_model"])
def model(request):
    """The text-only class and Gemma3ForConditionalGeneration (its sizes in a text config of its own)."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def queries() -> list[Query]:
    return [Query(key=f"q{i}", input_ids=ids, n=N) for i, ids in enumerate(PROMPTS)]


def sampler_for(model, tokenizer, rows) -> Sampler:
    decoding = resolve_decoding(model_generation_config(model), temperature=0, top_p=0.9, top_k=None,
                                max_new_tokens=NEW_TOKENS, seed=0, fallback_eos=[1, 106])
    return Sampler(model, tokenizer, decoding=decoding, injection_layer=1, coefficient=1.0, rows=rows,
                   merge_lora=False)


@pytest.fixture
def free_on_card(monkeypatch):
    """``set(n)``: memory.free_bytes reports n bytes, whatever the device (the sampler takes the GPU path)."""
    def set_free(free: int) -> None:
        monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    return set_free


@pytest.fixture
def forwards(monkeypatch, tiny_model):
    """Every forward of any module of the tiny model, and every prompt pass the sampler starts."""
    calls: list[str] = []
    handles = [m.register_forward_pre_hook(lambda module, args, name=name: calls.append(name or "model"))
               for name, m in tiny_model.named_modules()]
    prefill = Sampler.prefill

    def recorded(self, *args, **kwargs):
        calls.append("Sampler.prefill")
        return prefill(self, *args, **kwargs)
    monkeypatch.setattr(Sampler, "prefill", recorded)
    yield calls
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("fits", [2, 40])
def test_auto_rows_are_the_rows_that_fit_capped_at_the_samples(model, gemma_tokenizer, queries, free_on_card, fits):
    free = free_for(model, fits)
    free_on_card(free)
    assert expected_fit(model, free) == fits

    layout = sampler_for(model, gemma_tokenizer, "auto")._layout(queries, torch.device("cpu"))

    assert layout.rows_that_fit == fits
    assert layout.rows == min(fits, N * len(PROMPTS))
    assert layout.rows_setting == "auto"


def test_a_run_decodes_in_the_rows_that_fit(tiny_model, gemma_tokenizer, queries, free_on_card, forwards):
    free_on_card(free_for(tiny_model, 2))
    sampler = sampler_for(tiny_model, gemma_tokenizer, "auto")

    answers = sampler.run(queries, progress=False)

    assert (sampler.layout.rows, sampler.layout.rows_that_fit) == (2, 2)
    assert sampler.layout.refills >= N * len(PROMPTS) // 2  # 6 samples through 2 rows
    assert {key: len(samples) for key, samples in answers.items()} == {"q0": N, "q1": N}
    assert "Sampler.prefill" in forwards and "model" in forwards  # what the refusals below must not see


def test_explicit_rows_that_fit_exactly_are_taken(tiny_model, gemma_tokenizer, queries, free_on_card):
    free_on_card(free_for(tiny_model, 4))

    layout = sampler_for(tiny_model, gemma_tokenizer, 4)._layout(queries, torch.device("cpu"))

    assert (layout.rows, layout.rows_that_fit, layout.rows_setting) == (4, 4, "4")


def test_explicit_rows_that_do_not_fit_are_refused_before_any_forward(tiny_model, gemma_tokenizer, queries,
                                                                      free_on_card, forwards):
    free = free_for(tiny_model, 4)
    free_on_card(free)
    fits = expected_fit(tiny_model, free)
    assert fits == 4

    with pytest.raises(BatchTooLarge) as refused:
        sampler_for(tiny_model, gemma_tokenizer, 5).run(queries, progress=False)

    assert f"batch_rows = 5 does not fit on cpu: at most {fits} rows of 17 + {NEW_TOKENS} positions" \
        in str(refused.value)
    assert forwards == []


@pytest.mark.parametrize("free", [0, 1 * GiB, "half a row"], ids=["nothing", "under_the_reserve", "half_a_row"])
def test_memory_for_not_even_one_row_is_refused_before_any_forward(tiny_model, gemma_tokenizer, queries,
                                                                   free_on_card, forwards, free):
    free = free_for(tiny_model, 0) if free == "half a row" else free
    assert expected_fit(tiny_model, free) == 0
    free_on_card(free)

    with pytest.raises(BatchTooLarge, match=f"not even one row of 17 \\+ {NEW_TOKENS} positions fits"):
        sampler_for(tiny_model, gemma_tokenizer, "auto").run(queries, progress=False)

    assert forwards == []


# -- run_sampler: the tool's errors ------------------------------------------------------------------------------------


def test_run_sampler_turns_rows_that_do_not_fit_into_a_pipeline_error(tiny_model, gemma_tokenizer, queries,
                                                                      free_on_card, forwards):
    free_on_card(free_for(tiny_model, 2))

    with pytest.raises(PipelineError) as refused:
        run_sampler(sampler_for(tiny_model, gemma_tokenizer, 3), queries, resume="re-run", progress=False)

    message = str(refused.value)
    assert "batch_rows = 3" in message and "at most 2 rows" in message
    assert message.endswith("lower --batch-rows or leave it at 'auto'")
    assert isinstance(refused.value.__cause__, BatchTooLarge)
    assert forwards == []


@pytest.mark.parametrize("oom, first_line", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has a total capacity of 79.19 GiB",
     "CUDA out of memory. Tried to allocate 2.00 GiB."),
    ("", "CUDA out of memory"),
], ids=["multi_line", "empty"])
def test_run_sampler_turns_out_of_memory_into_one_line_naming_the_resume(tiny_model, gemma_tokenizer, queries,
                                                                         monkeypatch, oom, first_line):
    def out_of_memory(self, queries, **kwargs):
        raise torch.OutOfMemoryError(oom)
    monkeypatch.setattr(Sampler, "run", out_of_memory)
    resume = "ao-resampling baseline runs/demo"

    with pytest.raises(PipelineError) as failed:
        run_sampler(sampler_for(tiny_model, gemma_tokenizer, "auto"), queries, resume=resume, progress=False)

    message = str(failed.value)
    assert "\n" not in message
    assert f"({first_line})" in message
    assert "every run journaled before it is kept" in message
    assert f"{resume} with a smaller --batch-rows" in message
    assert isinstance(failed.value.__cause__, torch.OutOfMemoryError)


def test_run_sampler_passes_the_run_through(tiny_model, gemma_tokenizer, queries, monkeypatch):
    seen = {}

    def run(self, queries, **kwargs):
        seen.update(queries=queries, **kwargs)
        return {"q0": []}
    monkeypatch.setattr(Sampler, "run", run)

    got = run_sampler(sampler_for(tiny_model, gemma_tokenizer, "auto"), queries, resume="re-run", progress=False,
                      desc="AO samples")

    assert got == {"q0": []}
    assert seen == {"queries": queries, "progress": False, "desc": "AO samples"}
