"""The decode step's Triton kernels: Gemma's RMSNorm, the rotary embedding and the decode attention, each one
launch a call; and the seat's copy of prompt KV into the rows.

A 27B decode step on an H100 is ~23 ms of matmuls and, before these kernels, ~16 ms of small elementwise kernels:
``Gemma3RMSNorm`` runs its float32 arithmetic as ~8 launches (372 norms a forward) and ``apply_rotary_pos_emb`` as
~5 per tensor (124 calls). Launch for launch they are cheap; there are ~3,600 of them a step.

- ``rms_norm``: each program one row, loaded once, widened to float32, ``x * rsqrt(mean(x^2) + eps) * scale`` in
  float32, cast back once. HF's arithmetic on the same float32 values; only the order the mean's sum is added in
  differs (a tree in one program against torch's reduction), which can move the mean by a float32 ulp and, rarely,
  the cast result by one bf16 ulp (7.5e-6 of the outputs of a (272, 5376) norm on an H100; none of a q/k norm's):
  far inside the noise batching adds to HF's own matmuls (bench/noise.py measures both on a GPU).
- ``rotary``: ``x * cos + rotate_half(x) * sin``, each product and the sum rounded to the tensor's dtype exactly as
  torch rounds each elementwise op (computed in float32, rounded to nearest even): bit for bit HF's (so on the H100).
- ``decode_attention``: attention.py's ``gqa_attention`` for one query position a row, one program per (row, KV
  head) reading only the positions the row's mask allows. At the real answer lengths the longest row's cut is ~96
  positions while the average row is ~50 into its slot: the eager path read (and multiplied) all 96 for every row,
  in ~6 launches a layer. Eager's roundings (scores, scaled scores and probabilities rounded to the dtype, float32
  softmax); only the order of float32 sums differs.
- ``seat_prompts``: a refill's copy of each seated row's prompt KV from the prompt buffer into its slot, one launch
  for all rows and layers of a device (bits copied, nothing computed).

bfloat16 results are rounded by hand (``_bf16_rounded_bits``), not by Triton's cast, so Triton's CPU interpreter (the
tests' only Triton) rounds as the GPU does. ``available(device, kernel)`` compiles and probes each once per device;
where Triton is missing or cannot compile (it needs a C compiler), the callers keep torch's kernels, with one warning.
Compiling costs ~1.6 s at 27B in a machine's first process (Triton's disk cache is empty then):
``compile_in_background`` does it on a thread of its own while the weights load, and ``available`` waits for it.
``fused_rotary`` switches Gemma 3's attention to the RoPE kernel for a block of code (the norms: norms.py).

Shape letters:
    N  rows of a norm: every leading position of its input, flattened
    D  the normalised size (hidden size, or head size for the query/key norms), or the head size for RoPE
    B  batch rows, H heads, S positions (RoPE's input is (B, H, S, D), its cos/sin (B, S, D))
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Collection, Iterator
from types import ModuleType

import torch


@functools.cache
def _kernels() -> ModuleType | None:
    """The kernels' module (each kernel compiled on first launch); None without Triton (a CPU-only install)."""
    try:
        from ao_resampling.engine.decoding import triton_kernel_code
    except ImportError:
        return None
    return triton_kernel_code


_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _out_arg(out: torch.Tensor) -> torch.Tensor:
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


def _launch_kernels() -> ModuleType:
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("the Triton kernels need Triton (pip install triton)")
    return kernels


def rms_norm(x: torch.Tensor, scale_D: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma3RMSNorm with ``scale_D = 1 + weight.float()`` (float32, contiguous, on ``x``'s device), one launch.
    ``x``: any leading shape, D last."""
    kernels = _launch_kernels()
    D = x.shape[-1]
    x_ND = x.reshape(-1, D)  # a view where the layout allows (decode steps); a copy for a prefill's transposed q/k
    if x_ND.stride(-1) != 1:
        x_ND = x_ND.contiguous()
    out_ND = torch.empty((x_ND.shape[0], D), dtype=x.dtype, device=x.device)
    if x_ND.shape[0]:
        block = 1 << (D - 1).bit_length()
        with torch.cuda.device_of(x):  # Triton launches on the current device; device_map="auto" layers are elsewhere
            kernels.rms_norm_rows[(x_ND.shape[0],)](x_ND, scale_D, _out_arg(out_ND), x_ND.stride(0), D, 1.0 / D, eps,
                                                    BLOCK=block, DTYPE=_DTYPE_CODE[x.dtype],
                                                    num_warps=max(1, min(16, block // 512)))
    return out_ND.view(x.shape)


def rotary(x_BHSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """``x * cos[:, None] + rotate_half(x) * sin[:, None]`` (HF's ``apply_rotary_pos_emb`` for one tensor) in one
    launch, bit for bit. Any strides with the last dimension contiguous; the output is contiguous."""
    kernels = _launch_kernels()
    B, H, S, D = x_BHSD.shape
    cos_BSD, sin_BSD = cos_BSD.expand(B, S, D), sin_BSD.expand(B, S, D)
    if x_BHSD.stride(-1) != 1 or cos_BSD.stride() != sin_BSD.stride() or cos_BSD.stride(-1) != 1:
        raise ValueError("rotary: the last dimension must be contiguous and cos/sin laid out alike")
    out = torch.empty((B, H, S, D), dtype=x_BHSD.dtype, device=x_BHSD.device)
    if out.numel():
        half = D // 2
        with torch.cuda.device_of(x_BHSD):  # as in rms_norm
            kernels.rotary_rows[(B * H * S,)](x_BHSD, cos_BSD, sin_BSD, _out_arg(out), H, S, *x_BHSD.stride()[:3],
                                              *cos_BSD.stride()[:2], half, BLOCK=1 << (half - 1).bit_length(),
                                              DTYPE=_DTYPE_CODE[x_BHSD.dtype], num_warps=1)
    return out


ATTENTION_CHUNK = 32  # positions a program reads at a time (cut lengths are multiples of 32)


def decode_attention_fits(H: int, K: int, D: int) -> bool:
    """The kernel's shapes: a power-of-two head size of at least 16 (its matmul tiles), H a multiple of K."""
    return D >= 16 and D & (D - 1) == 0 and H % K == 0


def decode_attention(query_BHQD: torch.Tensor, key_BKSD: torch.Tensor, value_BKSD: torch.Tensor,
                     mask_B11S: torch.Tensor, scaling: float) -> torch.Tensor:
    """``gqa_attention`` of one query position a row (a decode step) in one launch: each (row, KV head) reads only
    the positions its additive mask allows (0 = attend), so a row 20 tokens into its answer does not read the 60
    empty positions the longest row's cut gives it. Keys/values: any strides, the last contiguous; the mask's last
    dimension S' <= S cuts them. Returns (B, 1, H, D), as HF's attention functions return it."""
    kernels = _launch_kernels()
    B, H, Q, D = query_BHQD.shape
    K, S = key_BKSD.shape[1], mask_B11S.shape[-1]
    if Q != 1 or not decode_attention_fits(H, K, D) or not mask_B11S.dtype.is_floating_point:
        raise ValueError(f"decode_attention: one query position, a power-of-two head size >= 16 and an additive mask "
                         f"(got Q={Q}, D={D}, mask {mask_B11S.dtype})")
    if any(t.stride(-1) != 1 for t in (query_BHQD, key_BKSD, value_BKSD, mask_B11S)):
        raise ValueError("decode_attention: the last dimension of every input must be contiguous")
    out = torch.empty((B, 1, H, D), dtype=query_BHQD.dtype, device=query_BHQD.device)
    if out.numel():
        G = H // K
        with torch.cuda.device_of(query_BHQD):  # as in rms_norm
            kernels.decode_attention_rows[(B, K)](
                query_BHQD, key_BKSD, value_BKSD, mask_B11S, _out_arg(out), query_BHQD.stride(0),
                query_BHQD.stride(1), *key_BKSD.stride()[:3], *value_BKSD.stride()[:3], mask_B11S.stride(0), S,
                scaling, G=G, G_PAD=max(16, 1 << (G - 1).bit_length()), D=D, CHUNK=ATTENTION_CHUNK,
                DTYPE=_DTYPE_CODE[query_BHQD.dtype], UPCAST=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4)
    return out


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a copy moves bits: no dtype to round


def seat_prompts(slot_LBHSD: torch.Tensor, prompt_LQHPD: torch.Tensor, rows_N: torch.Tensor,
                 prompts_N: torch.Tensor) -> None:
    """``slot_LBHSD[:, rows_N[i], :, :P] = prompt_LQHPD[:, prompts_N[i]]`` for every i, in one launch: a program a
    (layer, row, KV head) copies its P x D values, which are contiguous in both. Torch's own ways were ~10x slower at
    27B on an H100 for a refill's 34 scattered rows (bench/bench_seat.py): an indexed write after a gather, or a
    strided copy a run of rows, each indexing every element. ``rows_N``/``prompts_N``: int64 on the buffers'
    device."""
    kernels = _launch_kernels()
    L, Q, H, P, D = prompt_LQHPD.shape
    if slot_LBHSD.shape[0] != L or slot_LBHSD.shape[2] != H or slot_LBHSD.shape[3] < P or slot_LBHSD.shape[4] != D \
            or slot_LBHSD.dtype != prompt_LQHPD.dtype:
        raise ValueError(f"seat_prompts: prompts {tuple(prompt_LQHPD.shape)} do not fit slots "
                         f"{tuple(slot_LBHSD.shape)} ({prompt_LQHPD.dtype} into {slot_LBHSD.dtype})")
    if any(t.stride(4) != 1 or t.stride(3) != D for t in (slot_LBHSD, prompt_LQHPD)):
        raise ValueError("seat_prompts: each head's positions x head size must be contiguous in both buffers")
    if rows_N.numel():
        bits = _BITS[prompt_LQHPD.element_size()]
        with torch.cuda.device_of(slot_LBHSD):  # as in rms_norm
            kernels.seat_prompt_rows[(L, rows_N.shape[0], H)](
                prompt_LQHPD.view(bits), slot_LBHSD.view(bits), rows_N, prompts_N, *prompt_LQHPD.stride()[:3],
                *slot_LBHSD.stride()[:3], P * D, BLOCK=1024, num_warps=4)


_COMPILING: dict[torch.device, threading.Thread] = {}  # compile_in_background's threads, until waited for


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current device>``: the loader names a device one way, the model's parameters the other."""
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def available(device: torch.device, kernel: str) -> bool:
    """``kernel`` (a key of ``_PROBES``) works on ``device``: a CUDA device, Triton importable, and a probe (which
    compiles it) agreeing with torch's arithmetic. Otherwise one warning, and False: the caller keeps torch's kernels.
    Waits for ``compile_in_background``'s thread for the device first, if one runs."""
    device = _indexed(device)
    compiling = _COMPILING.get(device)
    if compiling is not None and compiling is not threading.current_thread():
        compiling.join()
        _COMPILING.pop(device, None)
    return _probed(device, kernel)


@functools.cache
def _probed(device: torch.device, kernel: str) -> bool:
    if device.type != "cuda":
        return False
    if _kernels() is None:
        warnings.warn("Triton is not installed: RMSNorm, RoPE, the decode attention and the seat's copies run as "
                      "torch's kernels (slower decode steps)", stacklevel=3)
        return False
    try:
        _PROBES[kernel](device)
    except Exception as e:  # noqa: BLE001 -- any failure of Triton's toolchain means: use torch's kernels
        warnings.warn(f"the Triton {kernel} kernel does not work here ({type(e).__name__}: {e}); it runs as separate "
                      "torch kernels (slower decode steps)", stacklevel=3)
        return False
    return True


def compile_in_background(device: torch.device, *, hidden_size: int, head_dim: int, query_heads: int, kv_heads: int,
                          dtype: torch.dtype) -> None:
    """Compile, on a thread of its own, every kernel a decode stage of a model of these sizes will launch on
    ``device``: the probes, the norm at the hidden size and at the head size (Triton compiles again for each BLOCK
    and each row stride's divisibility by 16), RoPE, the decode attention and the seat's copy in the model's dtype
    and head layout.
    Called before the weights load, so the ~1.6 s of a machine's first process run beside the load instead of in
    the first stage; nothing on a CPU or without Triton. ``available`` waits for it."""
    if device.type != "cuda" or _kernels() is None:
        return
    device = _indexed(device)
    if device in _COMPILING:
        return
    _COMPILING[device] = threading.Thread(target=_compile, name=f"triton-compile-{device}", daemon=True,
                                          args=(device, hidden_size, head_dim, query_heads, kv_heads, dtype))
    _COMPILING[device].start()


def _compile(device: torch.device, hidden_size: int, head_dim: int, query_heads: int, kv_heads: int,
             dtype: torch.dtype) -> None:
    try:
        with torch.cuda.device(device):
            if available(device, "rms_norm"):
                for size in dict.fromkeys((hidden_size, head_dim)):  # the layers' norms, the query/key norms
                    rms_norm(torch.ones(2, size, dtype=dtype, device=device), torch.ones(size, device=device), 1e-6)
            if available(device, "rotary"):  # its probe's compile is bfloat16's; a model in another dtype needs its own
                x_BHSD = torch.ones(2, 1, 2, head_dim, dtype=dtype, device=device).transpose(1, 2)  # a decode step's q
                rotary(x_BHSD, torch.ones(2, 1, head_dim, dtype=dtype, device=device),
                       torch.ones(2, 1, head_dim, dtype=dtype, device=device))
            if decode_attention_fits(query_heads, kv_heads, head_dim) and available(device, "attention"):
                q_BHQD = torch.ones(2, 1, query_heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
                kv_BKSD = torch.ones(2, kv_heads, 48, head_dim, dtype=dtype, device=device)
                decode_attention(q_BHQD, kv_BKSD, kv_BKSD, torch.zeros(2, 1, 1, 32, dtype=dtype, device=device), 1.0)
            if available(device, "seat"):  # its probe's compile is bfloat16's: a model in another dtype needs its own
                slot_LBHSD = torch.zeros(1, 2, kv_heads, 9, head_dim, dtype=dtype, device=device)
                seat_prompts(slot_LBHSD, torch.ones(1, 2, kv_heads, 7, head_dim, dtype=dtype, device=device),
                             torch.tensor([1, 0], device=device), torch.tensor([0, 1], device=device))
            torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 -- only a head start: the stage's own launches compile, and report, again
        pass


# The probes use the 27B's head size (128): the compiles they make are the ones its q/k norms and RoPE use.
def _probe_rms_norm(device: torch.device) -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    hf_norm = Gemma3RMSNorm(128, eps=1e-6).to(device)
    torch.nn.init.normal_(hf_norm.weight, std=0.5)
    x = torch.randn(3, 128, device=device).to(torch.bfloat16)
    scale = (1.0 + hf_norm.weight.detach().float()).contiguous()
    with torch.no_grad():
        torch_norm = hf_norm(x)
    if (rms_norm(x, scale, 1e-6).float() - torch_norm.float()).abs().max() > 0.02 * torch_norm.float().abs().max():
        raise RuntimeError("its output disagrees with torch's arithmetic")


def _probe_rotary(device: torch.device) -> None:
    from transformers.models.gemma3.modeling_gemma3 import rotate_half

    q = torch.randn(2, 4, 3, 128, device=device).to(torch.bfloat16)
    cos, sin = torch.randn(2, 2, 3, 128, device=device).to(torch.bfloat16)
    if not torch.equal(rotary(q, cos, sin), q * cos[:, None] + rotate_half(q) * sin[:, None]):
        raise RuntimeError("its output is not torch's bit for bit")


def _probe_attention(device: torch.device) -> None:
    q = torch.randn(3, 1, 32, 128, device=device).to(torch.bfloat16).transpose(1, 2)  # as a decode step lays it out
    k, v = torch.randn(2, 3, 16, 70, 128, device=device).to(torch.bfloat16)
    allowed = torch.rand(3, 1, 1, 64, device=device) < 0.7
    allowed[..., 0] = True
    additive = torch.where(allowed, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)
    k_rep, v_rep = (t[:, :, :64].repeat_interleave(2, dim=1) for t in (k, v))  # eager attention's repeat_kv
    scores = (q @ k_rep.transpose(2, 3) * 128**-0.5).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    expected = (scores.softmax(-1, dtype=torch.float32).to(torch.bfloat16) @ v_rep).transpose(1, 2)
    got = decode_attention(q, k[:, :, :64], v[:, :, :64], additive, 128**-0.5)
    if (got.float() - expected.float()).abs().max() > 0.02 * expected.float().abs().max():
        raise RuntimeError("its output disagrees with eager attention's")


def _probe_seat(device: torch.device) -> None:
    slot = torch.randn(2, 5, 3, 9, 128, device=device).to(torch.bfloat16)
    prompt = torch.randn(2, 4, 3, 7, 128, device=device).to(torch.bfloat16)
    rows, prompts = torch.tensor([4, 0, 1], device=device), torch.tensor([2, 2, 0], device=device)
    expected = slot.clone()
    expected[:, rows, :, :7] = prompt[:, prompts]
    seat_prompts(slot, prompt, rows, prompts)
    if not torch.equal(slot, expected):
        raise RuntimeError("its copies are not torch's indexed write")


_PROBES = {"rms_norm": _probe_rms_norm, "rotary": _probe_rotary, "attention": _probe_attention,
           "seat": _probe_seat}


@contextlib.contextmanager
def fused_rotary(devices: Collection[torch.device]) -> Iterator[bool]:
    """Inside the block Gemma 3's attention layers apply RoPE with ``rotary`` to tensors on ``devices`` (the model's;
    anything else goes to HF's function), if the kernel works on every one of them; yields whether it does. HF's
    function comes back after, also when the block raises."""
    from transformers.models.gemma3 import modeling_gemma3

    devices = set(devices)
    if not devices or not all(available(device, "rotary") for device in devices):
        yield False
        return
    hf_apply = modeling_gemma3.apply_rotary_pos_emb

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1 or q.device not in devices:
            return hf_apply(q, k, cos, sin, unsqueeze_dim)
        return rotary(q, cos, sin), rotary(k, cos, sin)

    modeling_gemma3.apply_rotary_pos_emb = apply_rotary_pos_emb  # the attention layers look it up at each call
    try:
        yield True
    finally:
        modeling_gemma3.apply_rotary_pos_emb = hf_apply
