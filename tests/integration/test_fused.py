"""Fused decode kernels (engine/fused.py) against Hugging Face's own modules, and the numerical-noise criterion
(engine/noise.py) that decides whether the fast path may use them.

Each fused function is compared with the HF code it replaces (Gemma3RMSNorm, the MLP's activation, the module's
apply_rotary_pos_emb), run on the same inputs, to within the dtype's rounding (a fused sum may add in another order:
float32 results then differ in the last bit); whole decode steps with the swap active are compared with HF
``generate`` (greedy answers) and with the model's own forward (teacher-forced log-probs). On CPU the compiled kernels
round exactly where HF's eager ops do, so the criterion holds with room to spare; a kernel with a 1.5% error in its
norm scale must be flagged.
"""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.gemma3 import modeling_gemma3

import ao_resampling.engine.fused as fused
from ao_resampling.engine.fused import FusedDecode, compiled, fusable
from ao_resampling.engine.noise import hf_path, noise_check
from ao_resampling.engine.reference import sample_hf_batched
from ao_resampling.engine.decoding.sampler import BatchedSampler, DecodeParams, Query
from ao_resampling.inputs.oracle import build_oracle_query

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
QUESTIONS = ["What is the persona?", "Is the user asking about the weather today, and where?", "Colour?", "Why?"]


@pytest.fixture(scope="module", params=["text_only", "multimodal"])
def bf16_oracle(request):
    """The tiny stand-ins in bfloat16 (the real run's dtype), with a seeded random LoRA."""
    from ao_resampling.engine.loading.adapters import attach_oracle
    from ao_resampling.engine.loading.models import load_model

    spec = "synthetic:tiny" if request.param == "text_only" else "synthetic:tiny-multimodal"
    return attach_oracle(load_model(spec, dtype="bfloat16", device="cpu", seed=6), "random", seed=0)


def make_queries(model, tokenizer, n: int = 1) -> list[Query]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    D = base.config.get_text_config().hidden_size
    g = torch.Generator().manual_seed(0)
    out = []
    for i, question in enumerate(QUESTIONS):
        oq = build_oracle_query(tokenizer, layer=2, question=question)
        out.append(Query(key=f"q{i}", input_ids=tuple(oq.input_ids), n=n, vectors_KD=torch.randn(1, D, generator=g),
                         positions_K=tuple(oq.placeholder_positions)))
    return out


def sampler(model, tokenizer, params: DecodeParams, **kwargs) -> BatchedSampler:
    return BatchedSampler(model, tokenizer, injection_layer=1, coefficient=1.0, params=params, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Each kernel against the HF code it replaces


@DTYPES
@pytest.mark.parametrize("shape", [(3, 1, 64), (5, 4, 1, 16), (1, 7, 64)])
@torch.inference_mode()  # as the decode steps run them
def test_fused_norm_equals_gemma3_rms_norm(dtype, shape):
    norm = modeling_gemma3.Gemma3RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).mul(3).to(dtype)
    got = compiled(fused.rms_norm)(x, 1.0 + norm.weight.float(), norm.eps)
    assert got.dtype == dtype
    torch.testing.assert_close(got, norm(x))


@DTYPES
@torch.inference_mode()
def test_fused_residual_norms_equal_hf_layer_arithmetic(dtype):
    post, pre = (modeling_gemma3.Gemma3RMSNorm(64) for _ in range(2))
    with torch.no_grad():
        post.weight.normal_(0, 0.5)
        pre.weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(2)
    residual, x = (torch.randn(6, 1, 64, generator=g).to(dtype) for _ in range(2))
    h, normed = compiled(fused.add_rms_norm)(residual, x, 1.0 + post.weight.float(), 1.0 + pre.weight.float(), 1e-6)
    torch.testing.assert_close(h, residual + post(x))
    torch.testing.assert_close(normed, pre(residual + post(x)))
    torch.testing.assert_close(compiled(fused.add_post_norm)(residual, x, 1.0 + post.weight.float(), 1e-6),
                               residual + post(x))


@DTYPES
@torch.inference_mode()
def test_fused_gelu_mul_and_rope_equal_hf(dtype):
    g = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(4, 1, 96, generator=g).to(dtype) for _ in range(2))
    torch.testing.assert_close(compiled(fused.gelu_mul)(gate, up), ACT2FN["gelu_pytorch_tanh"](gate) * up)
    q, k = torch.randn(4, 8, 1, 16, generator=g).to(dtype), torch.randn(4, 2, 1, 16, generator=g).to(dtype)
    cos, sin = torch.randn(4, 1, 16, generator=g).to(dtype), torch.randn(4, 1, 16, generator=g).to(dtype)
    for got, want in zip(compiled(fused.rope)(q, k, cos, sin), modeling_gemma3.apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------------------
# The swap on a whole model


def test_the_swap_is_undone_after_the_block_also_when_it_raises(bf16_oracle):
    modules = [m for m in bf16_oracle.modules()
               if type(m) in (modeling_gemma3.Gemma3DecoderLayer, modeling_gemma3.Gemma3MLP,
                              modeling_gemma3.Gemma3RMSNorm)]
    rope_before = modeling_gemma3.apply_rotary_pos_emb
    swap = FusedDecode(bf16_oracle)
    with pytest.raises(RuntimeError, match="boom"), swap.active():
        assert all("forward" in m.__dict__ for m in modules)
        assert modeling_gemma3.apply_rotary_pos_emb is not rope_before
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in modules)
    assert modeling_gemma3.apply_rotary_pos_emb is rope_before


def test_only_gemma3_layers_are_fused():
    assert not fusable(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="Gemma 3 decoder layers"):
        FusedDecode(torch.nn.Linear(4, 4))


def test_fused_forward_logits_equal_the_models_own(bf16_oracle, gemma_tokenizer):
    ids = torch.tensor([gemma_tokenizer("The quick brown fox jumps over the lazy dog").input_ids])
    with torch.inference_mode():
        want = bf16_oracle(input_ids=ids).logits
        with FusedDecode(bf16_oracle).active():
            got = bf16_oracle(input_ids=ids).logits
    torch.testing.assert_close(got, want)


def test_fused_fast_path_greedy_answers_equal_hf_generate(tiny_oracle, gemma_tokenizer):
    queries = make_queries(tiny_oracle, gemma_tokenizer)
    params = DecodeParams(temperature=0, top_p=0.9, max_new_tokens=12)
    got = sampler(tiny_oracle, gemma_tokenizer, params, merge_lora=True, fused=True).run(queries, progress=False)
    want = sample_hf_batched(tiny_oracle, gemma_tokenizer, queries, injection_layer=1, coefficient=1.0, params=params)
    assert {k: [s.token_ids for s in v] for k, v in got.items()} == {k: [s.token_ids for s in v]
                                                                    for k, v in want.items()}


# ---------------------------------------------------------------------------------------------------------------------
# The criterion


def forced_tokens(model, tokenizer, queries, steps: int = 16) -> torch.Tensor:
    params = DecodeParams(0.7, 0.9, steps, seed=0, min_new_tokens=steps)
    answers = sampler(model, tokenizer, params, merge_lora=True).run(queries, progress=False)
    return torch.tensor([answers[q.key][0].token_ids for q in queries])


def test_teacher_forced_fast_path_matches_hfs_own_distribution(bf16_oracle, gemma_tokenizer):
    """The fast path's teacher-forced log-probs are those of HF's decoding (dynamic cache, the model's attention)."""
    queries = make_queries(bf16_oracle, gemma_tokenizer)
    tokens_QT = forced_tokens(bf16_oracle, gemma_tokenizer, queries)
    fast = sampler(bf16_oracle, gemma_tokenizer, DecodeParams(0.7, 0.9, 16))
    with fast.stage():
        got_QTV = fast.teacher_forced(queries, tokens_QT)
    want_QTV = hf_path(fast).teacher_forced(queries, tokens_QT)
    assert got_QTV.shape == (len(queries), 16, want_QTV.shape[-1])
    assert got_QTV.argmax(-1).tolist() == want_QTV.argmax(-1).tolist()
    assert (got_QTV - want_QTV).abs().nan_to_num(0.0).max() < 0.05


def test_teacher_forcing_more_tokens_than_the_cache_holds_is_refused(tiny_oracle, gemma_tokenizer):
    fast = sampler(tiny_oracle, gemma_tokenizer, DecodeParams(0.7, 0.9, 4))
    with pytest.raises(ValueError, match="5 tokens fed, but the cache holds max_new_tokens = 4"):
        fast.teacher_forced(make_queries(tiny_oracle, gemma_tokenizer)[:1], torch.zeros(1, 5, dtype=torch.long))


def test_the_fused_path_is_inside_hfs_noise(bf16_oracle, gemma_tokenizer):
    queries = make_queries(bf16_oracle, gemma_tokenizer)
    tokens_QT = forced_tokens(bf16_oracle, gemma_tokenizer, queries)
    check = noise_check(sampler(bf16_oracle, gemma_tokenizer, DecodeParams(0.7, 0.9, 16), merge_lora=True,
                                fused=True), queries, tokens_QT)
    assert len(check.fast_vs_hf1) == len(check.hf_batched_vs_hf1) == 16
    assert check.within_noise, check.summary()


def test_a_kernel_outside_the_noise_is_flagged(bf16_oracle, gemma_tokenizer, monkeypatch):
    def off_by_a_bit(x, scale_D, eps):  # a norm whose scale is 1.5% off: a plausible kernel bug
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * scale_D * 1.015).type_as(x)

    queries = make_queries(bf16_oracle, gemma_tokenizer)
    tokens_QT = forced_tokens(bf16_oracle, gemma_tokenizer, queries)
    monkeypatch.setattr(fused, "rms_norm", off_by_a_bit)
    check = noise_check(sampler(bf16_oracle, gemma_tokenizer, DecodeParams(0.7, 0.9, 16), fused=True), queries,
                        tokens_QT)
    assert not check.within_noise, check.summary()
    assert "OUTSIDE" in check.summary()
