"""The Triton kernels compiled while the weights load (triton_kernels.compile_in_background) are every kernel a
decode stage then launches, and the stage waits for them.

Triton compiles a kernel once per combination of its argument dtypes, its constexprs and, for each integer
argument it specialises, whether it is divisible by 16 and whether it is 1. A compile the early one missed would
run inside the first stage, as before. On a CPU the kernels cannot run, so both are replaced by recorders that
note each launch's compile key (derived here from the launch's tensors, as Triton derives it) and compute with
torch: the early compile's keys must hold every key of a real stage (prompt passes and decode steps: norms, RoPE, the
decode attention; the seats' copies) of the tiny oracle, both classes.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from transformers.models.gemma3 import modeling_gemma3

from ao_resampling.config import ExperimentConfig
from ao_resampling.engine.decoding import triton_kernels
from ao_resampling.engine.decoding.attention import gqa_attention
from ao_resampling.engine.decoding.norms import gemma_rms_norm
from ao_resampling.engine.decoding.sampler import Query, Sampler
from ao_resampling.engine.decoding.settings import model_generation_config, resolve_decoding
from ao_resampling.engine.loading.models import text_config
from ao_resampling.inputs.oracle import build_oracle_query
from ao_resampling.stages.common import sampling


def _int_key(value: int) -> tuple[bool, bool]:
    return value % 16 == 0, value == 1


def norm_key(x: torch.Tensor, scale_D: torch.Tensor) -> tuple:
    """rms_norm_rows' compile key: dtypes, the size (BLOCK and D), the row stride of the (N, D) rows it reads."""
    D = x.shape[-1]
    x_ND = x.reshape(-1, D)
    if x_ND.stride(-1) != 1:
        x_ND = x_ND.contiguous()
    return "rms_norm", x.dtype, scale_D.dtype, D, _int_key(x_ND.stride(0))


def attention_key(query_BHQD: torch.Tensor, key_BKSD: torch.Tensor, value_BKSD: torch.Tensor,
                  mask_B11S: torch.Tensor) -> tuple:
    """decode_attention_rows' compile key: dtypes, the head layout, the strides it specialises (not the mask's row
    stride and the cut length)."""
    B, H, _, D = query_BHQD.shape
    strides = (*query_BHQD.stride()[:2], *key_BKSD.stride()[:3], *value_BKSD.stride()[:3])
    return ("attention", query_BHQD.dtype, key_BKSD.dtype, mask_B11S.dtype, H // key_BKSD.shape[1], D,
            tuple(_int_key(s) for s in strides))


def rotary_key(x_BHSD: torch.Tensor, cos_BSD: torch.Tensor) -> tuple:
    """rotary_rows' compile key: dtypes, the half head size, the strides it specialises (not H and S)."""
    B, H, S, D = x_BHSD.shape
    cos_BSD = cos_BSD.expand(B, S, D)
    strides = (*x_BHSD.stride()[:3], *cos_BSD.stride()[:2])
    return "rotary", x_BHSD.dtype, cos_BSD.dtype, D // 2, tuple(_int_key(s) for s in strides)


def seat_key(slot_LBHSD: torch.Tensor, prompt_LQHPD: torch.Tensor) -> tuple:
    """seat_prompt_rows' compile key: the values' size (copied as bits), the strides and P x D, each specialised."""
    _, _, _, P, D = prompt_LQHPD.shape
    return ("seat", prompt_LQHPD.element_size(),
            tuple(_int_key(s) for s in (*prompt_LQHPD.stride()[:3], *slot_LBHSD.stride()[:3], P * D)))


@pytest.fixture
def recorded(monkeypatch) -> list[tuple]:
    """The kernels 'work' on any device; each launch records its compile key and computes with torch."""
    keys: list[tuple] = []

    def rms_norm(x, scale_D, eps):
        keys.append(norm_key(x, scale_D))
        return gemma_rms_norm(x, scale_D, eps)

    def rotary(x_BHSD, cos_BSD, sin_BSD):
        keys.append(rotary_key(x_BHSD, cos_BSD))
        return x_BHSD * cos_BSD[:, None] + modeling_gemma3.rotate_half(x_BHSD) * sin_BSD[:, None]

    def decode_attention(query_BHQD, key_BKSD, value_BKSD, mask_B11S, scaling):
        keys.append(attention_key(query_BHQD, key_BKSD, value_BKSD, mask_B11S))
        with monkeypatch.context() as torch_path:
            torch_path.setattr(triton_kernels, "_probed", lambda device, kernel: False)
            return gqa_attention(None, query_BHQD, key_BKSD, value_BKSD, mask_B11S == 0, scaling=scaling)[0]

    def seat_prompts(slot_LBHSD, prompt_LQHPD, rows_N, prompts_N):
        keys.append(seat_key(slot_LBHSD, prompt_LQHPD))
        slot_LBHSD[:, rows_N, :, :prompt_LQHPD.shape[3]] = prompt_LQHPD[:, prompts_N]

    monkeypatch.setattr(triton_kernels, "_probed", lambda device, kernel: True)
    monkeypatch.setattr(triton_kernels, "decode_attention", decode_attention)
    monkeypatch.setattr(triton_kernels, "seat_prompts", seat_prompts)
    monkeypatch.setattr(triton_kernels, "rms_norm", rms_norm)
    monkeypatch.setattr(triton_kernels, "rotary", rotary)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return keys


@pytest.mark.parametrize("oracle_fixture", ["tiny_oracle", "tiny_multimodal_oracle"])
def test_the_early_compile_covers_every_kernel_a_stage_launches(recorded, oracle_fixture, gemma_tokenizer, request):
    oracle = request.getfixturevalue(oracle_fixture)
    config = text_config(oracle)
    dtype = next(oracle.parameters()).dtype
    triton_kernels._compile(torch.device("cpu"), config.hidden_size, config.head_dim, config.num_attention_heads,
                            config.num_key_value_heads, dtype)
    early = set(recorded)
    recorded.clear()

    decoding = resolve_decoding(model_generation_config(oracle), temperature=0.7, top_p=0.9, top_k=None, max_new_tokens=5,
                                seed=0, fallback_eos=[1, 106])
    queries = []
    for i, question in enumerate(["Colour?", "Is the user asking about the weather, and in which city?"]):
        oq = build_oracle_query(gemma_tokenizer, layer=2, question=question)
        queries.append(Query(key=f"q{i}", input_ids=tuple(oq.input_ids), n=3,
                             vectors_KD=torch.randn(len(oq.placeholder_positions), config.hidden_size),
                             positions_K=tuple(oq.placeholder_positions)))
    Sampler(oracle, gemma_tokenizer, decoding=decoding, injection_layer=1, coefficient=1.0, rows=4).run(
        queries, progress=False)

    stage = set(recorded)
    assert {key[0] for key in stage} == {"rms_norm", "rotary", "attention", "seat"}, "the stage ran the kernels"
    assert stage <= early, f"compiled inside the stage: {stage - early}"


def test_a_kernel_is_not_used_before_the_early_compile_of_its_device_is_done(monkeypatch):
    """``available`` (what the norms and RoPE ask before their first launch) joins the compiling thread."""
    compiled = threading.Event()

    def slow_compile(device, hidden_size, head_dim, query_heads, kv_heads, dtype):
        assert (hidden_size, head_dim, query_heads, kv_heads, dtype) == (5376, 128, 32, 16, torch.bfloat16)
        assert triton_kernels.available(device, "rms_norm")  # on its own thread: no wait for itself
        time.sleep(0.3)
        compiled.set()

    monkeypatch.setattr(triton_kernels, "_kernels", lambda: object())  # "Triton is installed"
    monkeypatch.setattr(triton_kernels, "_probed", lambda device, kernel: device.type == "cuda")
    monkeypatch.setattr(triton_kernels, "_compile", slow_compile)
    monkeypatch.setattr(triton_kernels, "_COMPILING", {})
    device = torch.device("cuda", 0)
    triton_kernels.compile_in_background(device, hidden_size=5376, head_dim=128, query_heads=32, kv_heads=16,
                                         dtype=torch.bfloat16)
    assert not compiled.is_set()
    assert triton_kernels.available(device, "rotary") and compiled.is_set()
    assert triton_kernels._COMPILING == {}


def test_nothing_compiles_early_on_a_cpu_or_without_triton(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_COMPILING", {})
    sizes = {"hidden_size": 8, "head_dim": 4, "query_heads": 2, "kv_heads": 1, "dtype": torch.float32}
    triton_kernels.compile_in_background(torch.device("cpu"), **sizes)
    monkeypatch.setattr(triton_kernels, "_kernels", lambda: None)
    triton_kernels.compile_in_background(torch.device("cuda", 0), **sizes)
    assert triton_kernels._COMPILING == {}


def test_loading_the_oracle_on_a_gpu_starts_the_compile_with_the_models_sizes(monkeypatch):
    """The sizes come from the model's config alone (nothing loaded yet): 27B's hidden size and head size."""
    started = []
    monkeypatch.setattr(triton_kernels, "compile_in_background",
                        lambda device, **sizes: started.append((device, sizes)))
    monkeypatch.setattr(sampling.adapters, "load_oracle", lambda **kwargs: "loaded")
    config = ExperimentConfig(model="synthetic:gemma-3-27b", oracle_lora="random", device="cuda")
    assert sampling.load_oracle(config) == "loaded"
    assert started == [(torch.device("cuda"), {"hidden_size": 5376, "head_dim": 128, "query_heads": 32, "kv_heads": 16,
                                               "dtype": torch.bfloat16})]
    started.clear()
    sampling.load_oracle(config.model_copy(update={"device": "cpu"}))
    sampling.load_oracle(config.model_copy(update={"device_map": "auto"}))
    assert started == []
