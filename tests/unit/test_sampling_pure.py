"""The pure pieces of the sampler: batch planning (batching.py), the top-p keep rule and the token sampler
(nucleus.py), and the decode loop's bookkeeping on a scripted model (sampler.py).

The sampler's top-p avoids sorting the whole vocabulary; these tests check it is still *exactly* HF's nucleus
sampling: the same keep-set as ``TopPLogitsWarper``, the same distribution over many seeded draws (on both the
candidate path and the full-sort fallback), and never a token outside the nucleus.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ao_resampling.engine.decoding.batching import plan_batches
from ao_resampling.engine.decoding import nucleus
from ao_resampling.engine.decoding.nucleus import nucleus_threshold, sample_next_tokens, sampling_weights, top_p_keep_mask
from ao_resampling.engine.decoding.sampler import Query

# ---------------------------------------------------------------------------------------------------------------------
# plan_batches


def queries_from(specs: list[tuple[int, int]]) -> list[Query]:
    return [Query(key=f"q{i:03d}", input_ids=tuple(range(length)), n=n) for i, (length, n) in enumerate(specs)]


query_specs = st.lists(st.tuples(st.integers(1, 300), st.integers(1, 12)), min_size=0, max_size=40)


@settings(max_examples=50, deadline=None)
@given(specs=query_specs, max_rows=st.integers(1, 64), max_tokens=st.integers(1, 20_000),
       max_new_tokens=st.integers(1, 200))
def test_plan_batches_is_a_partition_within_budget(specs, max_rows, max_tokens, max_new_tokens):
    queries = queries_from(specs)

    batches = plan_batches(queries, max_new_tokens=max_new_tokens, max_rows=max_rows, max_tokens=max_tokens)

    assert sorted(i for batch in batches for i in batch) == list(range(len(queries))), "every query exactly once"
    assert all(batches), "no empty batch"
    for batch in batches:
        rows = sum(queries[i].n for i in batch)
        longest = max(len(queries[i].input_ids) for i in batch)
        if len(batch) > 1:  # a single query over budget is allowed, alone
            assert rows <= max_rows
            assert rows * (longest + max_new_tokens) <= max_tokens


@settings(max_examples=25, deadline=None)
@given(specs=query_specs)
def test_plan_batches_with_room_for_everything_is_one_batch(specs):
    queries = queries_from(specs)
    batches = plan_batches(queries, max_new_tokens=10, max_rows=10_000, max_tokens=10**9)
    assert len(batches) == (1 if queries else 0)


@settings(max_examples=50, deadline=None)
@given(n_queries=st.integers(1, 200), n=st.integers(1, 12), max_rows=st.integers(12, 300),
       lengths=st.lists(st.integers(1, 60), min_size=1, max_size=5))
def test_plan_batches_uses_as_few_batches_as_the_row_budget_allows(n_queries, n, max_rows, lengths):
    """Every query asks for the same n (as in the experiment): no more batches than filling each one would give,
    all of one size but the last, and the last not much smaller."""
    queries = queries_from([(lengths[i % len(lengths)], n) for i in range(n_queries)])
    per_batch = max_rows // n

    batches = plan_batches(queries, max_new_tokens=10, max_rows=max_rows, max_tokens=10**9)

    assert len(batches) == -(-n_queries // per_batch)
    sizes = [len(b) for b in batches]
    assert len(set(sizes[:-1])) <= 1, sizes
    assert sizes[-1] >= sizes[0] - len(batches) + 1, sizes  # the last is short by less than one query a batch


def test_plan_batches_spreads_the_experiment_evenly():
    """1000 queries x 10 samples under 768 rows: 14 batches of 720 and 640 rows, not 13 x 760 and one of 120."""
    batches = plan_batches(queries_from([(40, 10)] * 1000), max_new_tokens=120, max_rows=768, max_tokens=10**9)
    assert [len(b) * 10 for b in batches] == [720] * 13 + [640]


def test_plan_batches_counts_pad_to_in_the_token_budget():
    queries = queries_from([(10, 2)] * 4)
    assert len(plan_batches(queries, max_new_tokens=10, max_rows=100, max_tokens=8 * 20)) == 1
    assert len(plan_batches(queries, max_new_tokens=10, max_rows=100, max_tokens=8 * 20, pad_to=30)) == 2


def test_plan_batches_oversized_query_sits_alone():
    queries = queries_from([(10, 2), (50, 100), (10, 2)])  # q001 alone exceeds both budgets
    batches = plan_batches(queries, max_new_tokens=5, max_rows=8, max_tokens=1000)
    assert [1] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# top_p_keep_mask == HF's TopPLogitsWarper keep-set


def keep_set_ours(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    probs_BV = logits_BV.float().softmax(-1)
    sorted_probs_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    keep_sorted_BV = top_p_keep_mask(sorted_probs_BV, top_p)
    return torch.zeros_like(keep_sorted_BV).scatter(-1, order_BV, keep_sorted_BV)


def keep_set_hf(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    warped_BV = TopPLogitsWarper(top_p=top_p)(torch.zeros(logits_BV.shape[0], 1, dtype=torch.long),
                                              logits_BV.float().clone())
    return warped_BV > float("-inf")


def margin_to_boundary(logits_BV: torch.Tensor, top_p: float) -> float:
    """How far the nearest token's 'mass above it' is from top_p: near 0, float rounding may decide either way."""
    probs_BV = logits_BV.double().softmax(-1).sort(dim=-1, descending=True).values
    return (probs_BV.cumsum(-1) - probs_BV - top_p).abs().min().item()


# Distinct logits on a 0.1 grid: no ties, so the keep-set is well defined (ties would make it order-dependent).
logit_rows = st.lists(st.integers(-150, 150), min_size=2, max_size=60, unique=True).map(
    lambda xs: [x / 10 for x in xs])
top_ps = st.one_of(st.floats(0.05, 0.999), st.sampled_from([0.9, 0.5, 0.95, 0.99]))


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(logit_rows, min_size=1, max_size=4), top_p=top_ps)
def test_top_p_keep_mask_matches_hf_warper(rows, top_p):
    V = min(len(r) for r in rows)
    logits_BV = torch.tensor([r[:V] for r in rows])
    assume(margin_to_boundary(logits_BV, top_p) > 1e-5)
    assert torch.equal(keep_set_ours(logits_BV, top_p), keep_set_hf(logits_BV, top_p))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 20), top_p=top_ps)
def test_top_p_keep_mask_matches_hf_warper_on_a_large_vocab(seed, scale, top_p):
    logits_BV = torch.randn(3, 5000, generator=torch.Generator().manual_seed(seed)) * scale
    assume(margin_to_boundary(logits_BV, top_p) > 1e-5)
    assert torch.equal(keep_set_ours(logits_BV, top_p), keep_set_hf(logits_BV, top_p))


def test_top_p_keep_mask_always_keeps_the_top_token():
    sorted_probs_BK = torch.tensor([[0.97, 0.02, 0.01], [0.4, 0.35, 0.25]])
    keep_BK = top_p_keep_mask(sorted_probs_BK, 0.01)
    assert keep_BK.tolist() == [[True, False, False], [True, False, False]]


# ---------------------------------------------------------------------------------------------------------------------
# sample_next_tokens


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 5), V=st.integers(2, 500))
def test_temperature_zero_is_argmax(seed, B, V):
    logits_BV = torch.randn(B, V, generator=torch.Generator().manual_seed(seed))
    tokens_B = sample_next_tokens(logits_BV, temperature=0, top_p=0.9, generator=None)
    assert torch.equal(tokens_B, logits_BV.argmax(-1))


def exact_nucleus_distribution(logits_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The nucleus distribution computed independently, in float64."""
    probs_V = (logits_V.double() / temperature).softmax(-1)
    sorted_V, order_V = probs_V.sort(descending=True)
    keep_V = (sorted_V.cumsum(-1) - sorted_V) < top_p
    keep_V[0] = True
    kept_V = torch.zeros_like(probs_V).scatter(-1, order_V, sorted_V * keep_V)
    return kept_V / kept_V.sum()


# Two rows over a vocabulary of 20: with 4 candidates, the peaked row's nucleus lies inside them (candidate path),
# the flat row's does not (full-sort fallback). Both are drawn in the same calls, as in a real batch.
PEAKED_V = torch.tensor([4.0, 3.6, 3.1, 2.0, 1.0] + [-1.0 - 0.1 * i for i in range(15)])
FLAT_V = torch.tensor([0.5 - 0.07 * i for i in range(20)])
CANDIDATES, TOP_P, TEMPERATURE = 4, 0.8, 0.7


def test_the_two_rows_exercise_both_paths():
    for logits_V, short in ((PEAKED_V, False), (FLAT_V, True)):
        probs_V = (logits_V / TEMPERATURE).softmax(-1)
        assert (probs_V.topk(CANDIDATES).values.sum() < TOP_P).item() is short


def test_empirical_distribution_matches_the_exact_nucleus_on_both_paths():
    draws = 20_000
    logits_BV = torch.stack([PEAKED_V, FLAT_V]).repeat(draws, 1)  # rows alternate peaked / flat
    generator = torch.Generator().manual_seed(1234)

    tokens_B = sample_next_tokens(logits_BV, temperature=TEMPERATURE, top_p=TOP_P, generator=generator,
                                  candidates=CANDIDATES)

    for row, logits_V in enumerate((PEAKED_V, FLAT_V)):
        exact_V = exact_nucleus_distribution(logits_V, TEMPERATURE, TOP_P)
        counts_V = torch.bincount(tokens_B[row::2], minlength=20).double()
        assert counts_V[exact_V == 0].sum() == 0, "a token outside the nucleus was drawn"
        total_variation = 0.5 * (counts_V / draws - exact_V).abs().sum().item()
        assert total_variation < 0.05, (row, total_variation)
    # Sanity: the two rows have nuclei of clearly different sizes, so a mix-up would show.
    assert (exact_nucleus_distribution(PEAKED_V, TEMPERATURE, TOP_P) > 0).sum() < CANDIDATES
    assert (exact_nucleus_distribution(FLAT_V, TEMPERATURE, TOP_P) > 0).sum() > CANDIDATES


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 300), candidates=st.integers(1, 64), top_p=top_ps,
       scale=st.floats(0.1, 10), temperature=st.sampled_from([0.3, 0.7, 1.0, 1.5]))
def test_never_draws_outside_the_hf_nucleus(seed, V, candidates, top_p, scale, temperature):
    g = torch.Generator().manual_seed(seed)
    logits_BV = torch.randn(8, V, generator=g) * scale
    assume(margin_to_boundary(logits_BV / temperature, top_p) > 1e-5)
    allowed_BV = keep_set_hf(logits_BV / temperature, top_p)
    for _ in range(5):
        tokens_B = sample_next_tokens(logits_BV, temperature=temperature, top_p=top_p, generator=g,
                                      candidates=candidates)
        assert allowed_BV.gather(-1, tokens_B[:, None]).all()


@pytest.mark.parametrize("candidates", [pytest.param(4, id="mixed_paths"), pytest.param(256, id="candidate_path"),
                                        pytest.param(1, id="fallback_path")])
def test_same_generator_seed_same_tokens(candidates):
    logits_BV = torch.stack([PEAKED_V, FLAT_V]).repeat(500, 1)

    def draw(seed: int) -> torch.Tensor:
        return sample_next_tokens(logits_BV, temperature=TEMPERATURE, top_p=TOP_P,
                                  generator=torch.Generator().manual_seed(seed), candidates=candidates)

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 5000), top_p=st.floats(0.05, 0.99),
       scale=st.sampled_from([0.01, 0.5, 3.0]), temperature=st.sampled_from([0.7, 1.0]))
def test_full_nucleus_threshold_equals_hf_keep_set(seed, V, top_p, scale, temperature):
    """The fallback path keeps exactly the tokens HF's warper keeps (no ties in random float32 logits)."""
    logits_BV = torch.randn(3, V, generator=torch.Generator().manual_seed(seed)) * scale
    scaled_BV = logits_BV / temperature
    assume(margin_to_boundary(scaled_BV, top_p) > 1e-5)
    threshold_B1 = nucleus_threshold(logits_BV, scaled_BV.logsumexp(-1, keepdim=True), temperature=temperature,
                                     top_p=top_p, rows_per_sort=2)  # 2 rows a sort: the chunking is exercised too
    hf_keep_BV = TopPLogitsWarper(top_p)(None, scaled_BV.clone()) > float("-inf")
    assert torch.equal(logits_BV >= threshold_B1, hf_keep_BV)


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_full_nucleus_threshold_on_bf16_logits_keeps_the_float32_nucleus(top_p):
    """A bf16 model's logits are sorted as bf16; the kept set is the one of their float32 scaled values."""
    logits_BV = (torch.randn(4, 3000, generator=torch.Generator().manual_seed(5)) * 2).bfloat16()
    scaled_BV = logits_BV.float() / 0.7
    threshold_B1 = nucleus_threshold(logits_BV, scaled_BV.logsumexp(-1, keepdim=True), temperature=0.7, top_p=top_p)
    assert threshold_B1.dtype == torch.bfloat16
    kept_BV = logits_BV >= threshold_B1
    exact_BV = torch.stack([exact_nucleus_distribution(row, 0.7, top_p) > 0 for row in logits_BV.float()])
    # bf16 logits tie often; HF keeps some of a tied group at the boundary, this keeps all of it. Away from the
    # boundary value the two sets agree, and each kept set reaches top_p.
    boundary_BV = logits_BV == threshold_B1
    assert torch.equal(kept_BV & ~boundary_BV, exact_BV & ~boundary_BV)
    assert ((scaled_BV.softmax(-1) * kept_BV).sum(-1) >= top_p - 1e-6).all()


@pytest.mark.parametrize("tied", [1, 12, 400], ids=["no_tie", "tie_inside_the_candidates", "tie_past_them"])
def test_top_k_keeps_every_token_tied_at_the_kth_as_hf_does(tied, monkeypatch):
    """Tokens tied with the k-th logit (bf16 logits tie often) are all kept, as TopKLogitsWarper keeps them, with HF's
    probabilities; a tie group longer than the candidates takes the full-row path, a shorter one does not."""
    top_k, V = 64, 5000
    logits_1V = torch.linspace(30.0, -30.0, V)[None]  # distinct, descending
    logits_1V[0, top_k - 1:top_k - 1 + tied] = logits_1V[0, top_k - 1]  # a tie group starting at the k-th
    logits_1V = logits_1V[:, torch.randperm(V, generator=torch.Generator().manual_seed(0))]
    full_rows = []
    real_full_row_weights = nucleus._full_row_weights
    monkeypatch.setattr(nucleus, "_full_row_weights", lambda logits, *a: full_rows.append(len(logits))
                        or real_full_row_weights(logits, *a))

    got_1V = sampling_weights(logits_1V, temperature=0.7, top_p=1.0, top_k=top_k)
    warped_1V = TopKLogitsWarper(top_k)(None, TemperatureLogitsWarper(0.7)(None, logits_1V.clone()))
    torch.testing.assert_close(got_1V, warped_1V.softmax(-1))
    assert int((got_1V > 0).sum()) == top_k - 1 + tied
    assert bool(full_rows) == (top_k - 1 + tied >= nucleus.TOP_P_CANDIDATES)


# ---------------------------------------------------------------------------------------------------------------------
# The decode loop's early-stop paths, on a scripted decode step (no model)

V_FAKE, STOP, WORD, PAD = 8, 1, 5, 0


class ScriptedStep:
    """A decode step whose original row r emits STOP at step ``stop_at[r]`` and WORD otherwise (as one-hot logits);
    it tracks which original rows are still in the batch through ``select``, as the real steps do."""

    def __init__(self, stop_at: list[int], ladder: bool = False):
        self.stop_at, self.rows, self.ladder = stop_at, list(range(len(stop_at))), ladder
        self.selects: list[list[int]] = []

    def rows_to_keep(self, n_live: int) -> int:
        """As ``StaticDecodeStep`` (``ladder``: row counts from the ladder) or ``PlainDecodeStep`` (the live rows,
        once they are half of the batch or fewer)."""
        from ao_resampling.engine.decoding.decode_step import rung

        if self.ladder:
            return rung(n_live, len(self.stop_at))
        return n_live if n_live * 2 <= len(self.rows) else len(self.rows)

    def logits(self, step: int) -> torch.Tensor:
        logits_AV = torch.full((len(self.rows), V_FAKE), -10.0)
        logits_AV[:, WORD] = 5.0  # the runner-up when STOP leads (and is suppressed before min_new_tokens)
        for a, r in enumerate(self.rows):
            logits_AV[a, STOP] = 10.0 if self.stop_at[r] == step else -10.0
        return logits_AV

    def __call__(self, tokens_A: torch.Tensor, positions_A: torch.Tensor, length: int) -> torch.Tensor:
        assert tokens_A.shape[0] == positions_A.shape[0] == len(self.rows)
        return self.logits(length - self.prompt_len)

    def select(self, keep_A: torch.Tensor) -> None:
        assert keep_A.max() < len(self.rows), "kept rows must index the rows still in the batch"
        self.selects.append([self.rows[a] for a in keep_A.tolist()])
        self.rows = [self.rows[a] for a in keep_A.tolist()]


def scripted_sampler(max_new_tokens: int, min_new_tokens: int = 0, **params):
    from types import SimpleNamespace

    from ao_resampling.engine.decoding.sampler import BatchedSampler, DecodeParams

    tokenizer = SimpleNamespace(eos_token_id=STOP, unk_token_id=3, pad_token_id=PAD,
                                convert_tokens_to_ids=lambda token: 3)
    return BatchedSampler(SimpleNamespace(generation_config=None), tokenizer, injection_layer=1, coefficient=1.0,
                          params=DecodeParams(temperature=0, top_p=0.9, max_new_tokens=max_new_tokens,
                                              min_new_tokens=min_new_tokens, **params))


def run_scripted(stop_at: list[int], max_new_tokens: int, min_new_tokens: int = 0, ladder: bool = False):
    step, prompt_len = ScriptedStep(stop_at, ladder), 4
    step.prompt_len = prompt_len
    mask_AL = torch.ones(len(stop_at), prompt_len, dtype=torch.bool)
    tokens_BT = scripted_sampler(max_new_tokens, min_new_tokens)._decode(step, step.logits(0), mask_AL, prompt_len,
                                                                         torch.Generator().manual_seed(0))
    return step, tokens_BT


def expected_row(stop: int, max_new_tokens: int, min_new_tokens: int = 0) -> list[int]:
    if stop < min_new_tokens or stop >= max_new_tokens:  # suppressed (or never reached): WORD to the end
        return [WORD] * max_new_tokens
    return [WORD] * stop + [STOP] + [PAD] * (max_new_tokens - stop - 1)


def test_finished_rows_are_compacted_again_and_again(monkeypatch):
    import ao_resampling.engine.decoding.sampler as sampling

    monkeypatch.setattr(sampling, "SYNC_EVERY", 1)
    stop_at = [1, 1, 1, 1, 3, 3, 5, 99]  # half finish, then half of the rest, then half again
    step, tokens_BT = run_scripted(stop_at, max_new_tokens=10)

    assert step.selects == [[4, 5, 6, 7], [6, 7], [7]]
    assert tokens_BT.tolist() == [expected_row(s, 10) for s in stop_at]


def test_on_the_ladder_finished_rows_fill_up_to_the_rung(monkeypatch):
    import ao_resampling.engine.decoding.sampler as sampling

    monkeypatch.setattr(sampling, "SYNC_EVERY", 1)
    stop_at = [1, 1, 1, 1, 1, 3, 5, 99]  # 3 live after step 1: the rung of 4 keeps them and one finished row
    step, tokens_BT = run_scripted(stop_at, max_new_tokens=10, ladder=True)

    assert step.selects == [[5, 6, 7, 0], [6, 7], [7]]
    assert tokens_BT.tolist() == [expected_row(s, 10) for s in stop_at], "the finished filler row stays finished"


@given(batch_rows=st.integers(1, 2000), data=st.data())
def test_rung_is_the_smallest_ladder_row_count_that_holds_the_live_rows(batch_rows, data):
    from ao_resampling.engine.decoding.decode_step import rung

    n_live = data.draw(st.integers(1, batch_rows))
    ladder = [batch_rows]
    while ladder[-1] > 1:
        ladder.append(math.ceil(ladder[-1] / 2))
    got = rung(n_live, batch_rows)
    assert got in ladder and got >= n_live
    assert all(r < n_live for r in ladder if r < got)


def test_a_stop_token_at_step_zero_ends_the_answer_there(monkeypatch):
    import ao_resampling.engine.decoding.sampler as sampling

    monkeypatch.setattr(sampling, "SYNC_EVERY", 1)
    stop_at = [0, 0, 2, 99]
    _, tokens_BT = run_scripted(stop_at, max_new_tokens=6, min_new_tokens=0)
    assert tokens_BT.tolist() == [expected_row(s, 6) for s in stop_at]
    assert sampling.until_stop(tokens_BT[0].tolist(), [STOP], PAD) == [STOP]  # an answer of one token, the stop

    _, suppressed_BT = run_scripted(stop_at, max_new_tokens=6, min_new_tokens=1)  # min_new_tokens < max_new_tokens
    assert suppressed_BT.tolist() == [expected_row(s, 6, min_new_tokens=1) for s in stop_at]


@pytest.mark.parametrize("gap", [-1e-4, -1e-6, 0.0, 1e-6, 1e-4], ids=lambda g: f"candidates_mass_top_p{g:+g}")
def test_a_nucleus_at_the_candidate_fallback_boundary_is_hfs(gap):
    """The top ``candidates`` tokens hold top_p + gap of the mass: just inside, on, or just outside the candidates
    (the sampler's two paths meet there). The kept set must be HF's TopPLogitsWarper's either way."""
    from ao_resampling.engine.decoding.nucleus import sampling_weights

    top_p, candidates, V = 0.9, 8, 64
    probs_V = torch.empty(V, dtype=torch.float64)
    probs_V[:candidates] = torch.linspace(0.2, 0.05, candidates)
    probs_V[:candidates] *= (top_p + gap) / probs_V[:candidates].sum()
    probs_V[candidates:] = (1 - probs_V[:candidates].sum()) * torch.linspace(0.1, 0.001, V - candidates).softmax(0)
    logits_1V = probs_V.log().float()[None]
    ours_1V = sampling_weights(logits_1V, temperature=1.0, top_p=top_p, candidates=candidates)
    hf_1V = TopPLogitsWarper(top_p)(None, logits_1V.clone()).softmax(-1)
    if abs(gap) > 1e-5:  # away from float rounding: the exact rule decides, candidates only or one more token
        assert torch.equal(ours_1V > 0, hf_1V > 0)
        assert int((ours_1V > 0).sum()) == (candidates if gap > 0 else candidates + 1)
    else:  # within rounding of top_p: either answer is HF's up to its own float noise, never a third one
        assert int((ours_1V > 0).sum()) in (candidates, candidates + 1)
        assert torch.equal((ours_1V > 0)[0, :candidates], torch.ones(candidates, dtype=torch.bool))
    torch.testing.assert_close(ours_1V.sum(), torch.tensor(1.0))
    g = torch.Generator().manual_seed(0)
    drawn = sample_next_tokens(logits_1V.expand(2000, V), temperature=1.0, top_p=top_p, generator=g,
                               candidates=candidates)
    assert (ours_1V[0, drawn] > 0).all(), "a token outside the kept set was drawn"
