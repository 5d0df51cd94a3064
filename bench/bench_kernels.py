"""Decode-step pieces of the 27B shape at batch 760, timed alone: attention over a static cache, and Gemma's RMSNorm.

    python bench/bench_kernels.py --rows 760 --cut 96

Attention: ``gqa_attention`` (batched matmuls over the grouped heads, reading the cache once) against SDPA with
``enable_gqa=True`` and against HF's path (repeat_kv, then SDPA). RMSNorm: HF's Gemma3RMSNorm (about ten
elementwise kernels) against ``torch.nn.functional.rms_norm`` with the (1 + w) weight folded in and against the
sampler's one Triton kernel (``triton_kernels.rms_norm``); RoPE: HF's ``apply_rotary_pos_emb`` against
``triton_kernels.rotary``. Times are CUDA-event
means over repeats after a warm-up, and the achieved bandwidth counts the bytes each must read and write.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm, apply_rotary_pos_emb, repeat_kv

from cuda_timing import cuda_ms  # bench/, beside this script

from ao_resampling.engine.decoding.attention import gqa_attention
from ao_resampling.engine.decoding import triton_kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=760)
    ap.add_argument("--cut", type=int, default=96, help="filled cache positions read by one decode step")
    ap.add_argument("--cache-len", type=int, default=160)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py times CUDA kernels; it needs a GPU")
    B, H, K, D, S = args.rows, 32, 16, 128, args.cut
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, H, 1, D, **bf16)
    k_cache = torch.randn(B, K, args.cache_len, D, **bf16)
    v_cache = torch.randn(B, K, args.cache_len, D, **bf16)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device="cuda")
    mask[::3, ..., :5] = False  # left padding on some rows
    module = SimpleNamespace(num_key_value_groups=H // K, head_dim=D, training=False)
    kv_bytes = 2 * B * K * S * D * 2

    def sdpa_gqa():
        return F.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S], attn_mask=mask,
                                              scale=D**-0.5, enable_gqa=True)

    def hf_repeat_kv():
        return F.scaled_dot_product_attention(q, repeat_kv(k_cache[:, :, :S], 2), repeat_kv(v_cache[:, :, :S], 2),
                                              attn_mask=mask, scale=D**-0.5)

    ours = gqa_attention(module, q, k_cache, v_cache, mask, scaling=D**-0.5)[0]
    print(f"attention, {B} rows x {S} cached positions, {K} KV heads x {H // K} query heads, per layer "
          f"({kv_bytes / 1e9:.2f} GB of K+V to read); gqa == sdpa: "
          f"{torch.allclose(ours, sdpa_gqa().transpose(1, 2), atol=2e-2, rtol=2e-2)}")
    for name, fn in [("gqa_attention (batched matmuls)", lambda: gqa_attention(module, q, k_cache, v_cache, mask,
                                                                                 scaling=D**-0.5)),
                     ("SDPA enable_gqa=True", sdpa_gqa), ("HF: repeat_kv + SDPA", hf_repeat_kv)]:
        ms = cuda_ms(fn, 20)
        print(f"  {name:<36} {ms:7.3f} ms  {kv_bytes / ms / 1e6:7.0f} GB/s   x62 layers: {62 * ms:6.1f} ms")

    hf_norm = Gemma3RMSNorm(5376).to("cuda")
    torch.nn.init.normal_(hf_norm.weight, std=0.1)
    weight = (1.0 + hf_norm.weight.float())
    for shape in ((B, 1, 5376), (B, 1, H, D)):
        x = torch.randn(*shape, **bf16)
        norm = hf_norm if shape[-1] == 5376 else Gemma3RMSNorm(D).to("cuda")
        w = weight if shape[-1] == 5376 else (1.0 + norm.weight.float())

        def fused():
            return F.rms_norm(x.float(), (shape[-1],), weight=w, eps=1e-6).type_as(x)

        same = torch.equal(fused(), norm(x))
        close = torch.allclose(fused().float(), norm(x).float(), atol=1e-2, rtol=1e-2)
        print(f"RMSNorm {tuple(shape)}: fused equals HF bit for bit: {same}, within bf16 rounding: {close}")
        def triton_norm():
            return triton_kernels.rms_norm(x, w.contiguous(), 1e-6)

        differing = (triton_norm() != norm(x)).float().mean().item()
        print(f"  Triton kernel (the sampler's on a GPU): {differing:.2e} of outputs differ from HF (by one bf16 ulp)")
        for name, fn in [("HF Gemma3RMSNorm", lambda: norm(x)), ("F.rms_norm, (1+w) folded", fused),
                         ("triton_kernels.rms_norm", triton_norm)]:
            ms = cuda_ms(fn, 100)
            print(f"  {name:<36} {ms * 1000:7.1f} us   x6 norms x62 layers: {6 * 62 * ms:6.1f} ms")

    q, k = torch.randn(B, H, 1, D, **bf16), torch.randn(B, K, 1, D, **bf16)
    cos, sin = torch.randn(2, B, 1, D, **bf16)
    same = torch.equal(triton_kernels.rotary(q, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)[0])
    print(f"RoPE, q {tuple(q.shape)} and k {tuple(k.shape)}: Triton equals HF bit for bit: {same}")
    for name, fn in [("HF apply_rotary_pos_emb", lambda: apply_rotary_pos_emb(q, k, cos, sin)),
                     ("triton_kernels.rotary (q, k)", lambda: (triton_kernels.rotary(q, cos, sin),
                                                               triton_kernels.rotary(k, cos, sin)))]:
        ms = cuda_ms(fn, 100)
        print(f"  {name:<36} {ms * 1000:7.1f} us   x62 layers: {62 * ms:6.1f} ms")


if __name__ == "__main__":
    main()
