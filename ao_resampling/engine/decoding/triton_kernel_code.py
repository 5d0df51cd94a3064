"""The Triton source of triton_kernels.py's kernels (this module needs Triton; triton_kernels.py imports it only
where Triton is installed). Triton resolves a kernel's helpers among its module's globals, so they live here, at the
top level. Shapes and what each computes: triton_kernels.py.

``DTYPE`` codes: 0 float32, 1 bfloat16, 2 float16. bfloat16 is rounded by hand (nearest even, as torch rounds), so
Triton's CPU interpreter, which truncates in its own casts, computes what the GPU computes.

Triton compiles a kernel again for each new combination of its integer arguments' divisibility by 16 (and of those
equal to 1): a few seconds each, in the first stage of a process. The norm sees one row stride per size (the hidden
size, the head size); RoPE's head and position counts are marked not to specialise, so a decode step (S = 1) and a
prefill share one compile.
"""

import triton
import triton.language as tl


@triton.jit
def _bf16_rounded_bits(x):
    """The float32 bits of ``x`` plus the nearest-even bias: the bfloat16 is the upper 16 (torch's rounding)."""
    bits = x.to(tl.uint32, bitcast=True)
    return bits + 0x7FFF + ((bits >> 16) & 1)


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to DTYPE (0 float32, 1 bfloat16, 2 float16), as float32 again."""
    if DTYPE == 1:
        x = (_bf16_rounded_bits(x) & 0xFFFF0000).to(tl.float32, bitcast=True)
    elif DTYPE == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _store(ptr, x, mask, DTYPE: tl.constexpr):
    """float32 ``x`` stored as DTYPE (bfloat16: ``ptr`` points at the int16 bits)."""
    if DTYPE == 1:
        tl.store(ptr, (_bf16_rounded_bits(x) >> 16).to(tl.int16), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_rows(x_ptr, scale_ptr, out_ptr, x_row_stride, D, inv_D, eps, BLOCK: tl.constexpr,
                  DTYPE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) * inv_D  # torch's mean: the float32 sum times 1/D
    out = x * tl.rsqrt(mean_square + eps) * tl.load(scale_ptr + cols, mask=inside, other=0.0)
    _store(out_ptr + row * D + cols, out, inside, DTYPE)


@triton.jit(do_not_specialize=["H", "S"])  # index arithmetic only: one compile for decode steps and prefills
def rotary_rows(x_ptr, cos_ptr, sin_ptr, out_ptr, H, S, x_b, x_h, x_s, c_b, c_s, HALF,
                BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one (b, h, s) row of HALF * 2 values
    s, h, b = pid % S, (pid // S) % H, pid // (S * H)
    d = tl.arange(0, BLOCK)
    inside = d < HALF
    x_at, c_at = x_ptr + b * x_b + h * x_h + s * x_s, b * c_b + s * c_s
    x1 = tl.load(x_at + d, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF + d, mask=inside, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + c_at + d, mask=inside, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + c_at + HALF + d, mask=inside, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + c_at + d, mask=inside, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + c_at + HALF + d, mask=inside, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): each op rounded as torch rounds it
    first = _rounded(_rounded(x1 * cos1, DTYPE) + _rounded(-x2 * sin1, DTYPE), DTYPE)
    second = _rounded(_rounded(x2 * cos2, DTYPE) + _rounded(x1 * sin2, DTYPE), DTYPE)
    _store(out_ptr + pid * 2 * HALF + d, first, inside, DTYPE)
    _store(out_ptr + pid * 2 * HALF + HALF + d, second, inside, DTYPE)


@triton.jit
def _dot(a, b, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 sums; float32 inputs multiplied as float32 (not TF32, Triton's default on a GPU).
    ``UPCAST``: half-precision inputs widened first (exact) for Triton's CPU interpreter, whose dot reads bfloat16
    as raw bits; the products and sums are the same as the GPU's half-precision dot, in another order."""
    if DTYPE == 0 or UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit(do_not_specialize=["S", "m_b"])  # the cut length (a multiple of 32, or the slot's length): index only
def decode_attention_rows(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, q_b, q_h, k_b, k_h, k_s, v_b, v_h, v_s, m_b, S,
                          scaling, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                          DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """One (row, KV head): its G query heads against the row's allowed positions only (a masked-off position's key
    and value are never read). Eager attention's roundings: scores rounded to DTYPE, times the scaling rounded,
    float32 softmax, probabilities rounded to DTYPE, then times the values (float32 sums), rounded."""
    b = tl.program_id(0).to(tl.int64)
    kv = tl.program_id(1).to(tl.int64)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    heads = kv * G + g
    q = tl.load(q_ptr + b * q_b + heads[:, None] * q_h + d[None, :], mask=(g < G)[:, None], other=0.0)
    k_row, v_row, m_row = k_ptr + b * k_b + kv * k_h, v_ptr + b * v_b + kv * v_h, mask_ptr + b * m_b
    top = tl.full((G_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((G_PAD,), tl.float32)
    for start in range(0, S, CHUNK):  # pass 1: each head's largest score and its sum of exponentials
        s = start + tl.arange(0, CHUNK)
        allowed = tl.load(m_row + s, mask=s < S, other=-1.0).to(tl.float32) == 0.0  # additive mask: 0 = attend
        k = tl.load(k_row + s[:, None] * k_s + d[None, :], mask=allowed[:, None], other=0.0)
        scores = _rounded(_rounded(_dot(q, tl.trans(k), DTYPE, UPCAST), DTYPE) * scaling, DTYPE)
        scores = tl.where(allowed[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)  # no position allowed yet: nothing to rescale
        total = total * tl.exp(top - safe_top) + tl.sum(tl.exp(scores - safe_top[:, None]), axis=1)
        top = new_top
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.where(total == 0.0, 1.0, total)
    acc = tl.zeros((G_PAD, D), tl.float32)
    for start in range(0, S, CHUNK):  # pass 2: the probabilities, rounded, times the values
        s = start + tl.arange(0, CHUNK)
        allowed = tl.load(m_row + s, mask=s < S, other=-1.0).to(tl.float32) == 0.0
        k = tl.load(k_row + s[:, None] * k_s + d[None, :], mask=allowed[:, None], other=0.0)
        scores = _rounded(_rounded(_dot(q, tl.trans(k), DTYPE, UPCAST), DTYPE) * scaling, DTYPE)
        probs = tl.where(allowed[None, :], tl.exp(scores - top[:, None]) / total[:, None], 0.0)
        v = tl.load(v_row + s[:, None] * v_s + d[None, :], mask=allowed[:, None], other=0.0)
        acc += _dot(_rounded(probs, DTYPE).to(v.dtype), v, DTYPE, UPCAST)
    _store(out_ptr + b * (tl.num_programs(1) * G * D) + heads[:, None] * D + d[None, :], acc, (g < G)[:, None], DTYPE)


@triton.jit
def seat_prompt_rows(prompt_ptr, slot_ptr, rows_ptr, prompts_ptr, p_l, p_q, p_h, s_l, s_b, s_h, PD,
                     BLOCK: tl.constexpr):
    """One (layer, seated row, KV head): the P x D values of its prompt's KV, contiguous in both buffers, copied as
    they are (raw bits). 64-bit offsets: a layer's offset passes 2^31 values at 27B."""
    layer, n, head = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2).to(tl.int64)
    row, prompt = tl.load(rows_ptr + n).to(tl.int64), tl.load(prompts_ptr + n).to(tl.int64)
    source = prompt_ptr + layer * p_l + prompt * p_q + head * p_h
    target = slot_ptr + layer * s_l + row * s_b + head * s_h
    for start in range(0, PD, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        tl.store(target + offsets, tl.load(source + offsets, mask=offsets < PD), mask=offsets < PD)
