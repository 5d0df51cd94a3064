"""The decode step with its Triton kernels in place, end to end: the sampler's greedy answers through refills, with
RMSNorm, RoPE, the decode attention and the seats' copies running as Triton kernels (in Triton's CPU interpreter),
equal HF ``generate``'s token for token, on a tiny random Gemma 3 with 27B's head layout (two query heads a KV head,
several KV heads).

The kernels' own tests (tests/unit/test_triton_kernels.py) feed them tensors made for the test; here they get what a
stage gives them: the slot cache's strides, the cut masks of rows at different steps, idle rows, a prefill's
transposed queries, the stacked q/k/v projections' column views. The interpreter is chosen when Triton is imported,
so the run is a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys

_RUN = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from ao_resampling.engine.decoding import triton_kernels
from ao_resampling.engine.decoding.sampler import Query, Sampler
from ao_resampling.engine.decoding.settings import model_generation_config, resolve_decoding
from ao_resampling.engine.loading.adapters import attach_oracle
from ao_resampling.engine.loading.models import GEMMA3_GENERATION_CONFIG, load_tokenizer, synthetic_config
from transformers import Gemma3ForCausalLM, GenerationConfig
from ao_resampling.engine.reference import sample_hf_batched
from ao_resampling.inputs.oracle import build_oracle_query

tokenizer = load_tokenizer("gemma3-270m-gguf")
config = synthetic_config("tiny")
config.num_attention_heads, config.num_key_value_heads = 4, 2  # 27B's two query heads a KV head, over two KV heads
torch.manual_seed(0)
base = Gemma3ForCausalLM._from_config(config, attn_implementation="eager").eval().requires_grad_(False)
base.generation_config = GenerationConfig(**GEMMA3_GENERATION_CONFIG)
oracle = attach_oracle(base, "random", seed=2)
hidden = config.hidden_size
torch.manual_seed(0)
queries = []
for i, question in enumerate(["What is the persona?", "Colour?",
                              "Is the user asking about the weather, and if so, in which city?"]):
    oq = build_oracle_query(tokenizer, layer=2, question=question)
    queries.append(Query(key=f"q{i}", input_ids=tuple(oq.input_ids), n=2, vectors_KD=torch.randn(1, hidden) * 4,
                         positions_K=tuple(oq.placeholder_positions)))
greedy = resolve_decoding(model_generation_config(oracle), temperature=0, top_p=1.0, top_k=None, max_new_tokens=8,
                          seed=0, fallback_eos=[1, 106])
reference = sample_hf_batched(oracle, tokenizer, queries, injection_layer=1, coefficient=1.0, decoding=greedy)

launches = {"rms_norm": 0, "rotary": 0, "decode_attention": 0, "seat_prompts": 0}
for name in launches:
    kernel = getattr(triton_kernels, name)
    def counted(*args, kernel=kernel, name=name):
        launches[name] += 1
        return kernel(*args)
    setattr(triton_kernels, name, counted)
triton_kernels._probed = lambda device, kernel: True  # "the kernels work on this device": the interpreter's CPU
sampler = Sampler(oracle, tokenizer, decoding=greedy, injection_layer=1, coefficient=1.0, rows=3)
result = sampler.run(queries, progress=False)
json.dump({"sampler": {k: [s.token_ids for s in v] for k, v in result.items()},
           "hf": {k: [s.token_ids for s in v] for k, v in reference.items()},
           "launches": launches, "kernels": sampler.layout.triton_kernels, "refills": sampler.layout.refills},
          sys.stdout)
"""


def test_greedy_answers_with_the_triton_kernels_equal_plain_generate(gemma_tokenizer):
    """``gemma_tokenizer``: the converted tokenizer is on disk before the child process reads it."""
    done = subprocess.run([sys.executable, "-c", _RUN], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["kernels"] == ["rms_norm", "rotary", "attention", "seat"] and out["refills"] > 1
    assert all(n > 0 for n in out["launches"].values()), out["launches"]
    assert out["sampler"] == out["hf"]
