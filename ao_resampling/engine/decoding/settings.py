"""The decoding Hugging Face ``generate`` does for a loaded model: its ``generation_config`` merged with the run's.

Upstream sampled with ``model.generate(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=120)``. HF merges
those keyword arguments over the checkpoint's ``generation_config.json``, then over its own global defaults
(``GenerationConfig._get_default_generation_params``: top_k 50). ``google/gemma-3-27b-it`` ships ``top_k: 64,
top_p: 0.95, eos_token_id: [1, 106]``, so upstream drew at T=0.7 with top-k 64, then top-p 0.9, stopping at <eos> or
<end_of_turn>. ``resolve_sampling`` decides the same thing from the same inputs; it refuses a ``generation_config``
that asks for any other logits processor (the sampler implements temperature, top-k and top-p only), naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ao_resampling.errors import AOResamplingError

# HF's global defaults for the fields this module reads (transformers 5.x, _get_default_generation_params).
HF_DEFAULT_TOP_K = 50


class UnsupportedGenerationConfig(AOResamplingError, ValueError):
    """The model's generation_config asks for a logits processor the sampler does not implement."""


@dataclass(frozen=True)
class Sampling:
    """What decoding actually does: temperature 0 = greedy; top_k 0 = off; eos ids end an answer."""

    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: tuple[int, ...]


def _set(value: Any) -> bool:
    return value is not None


def _not(default: Any) -> Callable[[Any], bool]:
    return lambda value: value is not None and value != default


def _cutoff(value: Any) -> bool:
    return value is not None and 0.0 < value < 1.0


# Field -> "is it active" as _get_logits_processor decides (transformers 5.17-5.24): each adds a processor or warper.
UNSUPPORTED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "repetition_penalty": _not(1.0), "encoder_repetition_penalty": _not(1.0), "no_repeat_ngram_size": _not(0),
    "encoder_no_repeat_ngram_size": _not(0), "bad_words_ids": _set, "sequence_bias": _set, "min_p": _set,
    "typical_p": _not(1.0), "epsilon_cutoff": _cutoff, "eta_cutoff": _cutoff, "top_h": _set, "guidance_scale": _not(1),
    "forced_bos_token_id": _set, "forced_eos_token_id": _set, "exponential_decay_length_penalty": _set,
    "suppress_tokens": _set, "begin_suppress_tokens": _set, "min_length": _not(0), "min_new_tokens": _not(0),
    "num_beams": _not(1), "penalty_alpha": _set, "diversity_penalty": _not(0.0), "watermarking_config": _set,
}


def unsupported_fields(generation_config) -> dict[str, Any]:
    """The fields of a GenerationConfig that would change sampling in HF generate and that the sampler lacks."""
    if generation_config is None:
        return {}
    return {name: getattr(generation_config, name) for name, active in UNSUPPORTED_FIELDS.items()
            if active(getattr(generation_config, name, None))}


def eos_ids(generation_config, fallback: Sequence[int]) -> tuple[int, ...]:
    """The generation_config's eos_token_id (an int or a list), as HF's generate uses it; else the fallback."""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None or (isinstance(eos, (list, tuple)) and not eos):
        return tuple(sorted(set(fallback)))
    return tuple(sorted({int(e) for e in ([eos] if isinstance(eos, int) else eos)}))


def resolve_sampling(generation_config, *, temperature: float, top_p: float, top_k: int | None,
                     fallback_eos: Sequence[int], source: str = "the model") -> Sampling:
    """The run's settings over the model's generation_config over HF's defaults. ``top_k`` None = the model's."""
    bad = unsupported_fields(generation_config)
    if bad:
        listed = ", ".join(f"{k}={v!r}" for k, v in bad.items())
        raise UnsupportedGenerationConfig(
            f"{source}'s generation_config sets {listed}: HF generate would apply it while sampling, and this "
            f"sampler implements only temperature, top_k and top_p; unset it in generation_config.json")
    model_top_k = getattr(generation_config, "top_k", None) if generation_config is not None else None
    if top_k is None:
        top_k = HF_DEFAULT_TOP_K if model_top_k is None else int(model_top_k)
    return Sampling(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                    eos_token_ids=eos_ids(generation_config, fallback_eos))


def model_generation_config(model):
    """The loaded model's generation_config (through a PEFT wrapper too), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "generation_config", None)


def generate_kwargs(*, temperature: float, top_p: float, top_k: int | None) -> dict[str, Any]:
    """What upstream passed to HF generate (top_k only when the run overrides the model's): HF does the merge."""
    if temperature == 0:
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(do_sample=True, temperature=temperature, top_p=top_p) | ({} if top_k is None else dict(top_k=top_k))
