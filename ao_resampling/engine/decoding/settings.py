"""The decoding Hugging Face ``generate`` does for a loaded model: its ``generation_config`` merged with the run's.

Upstream sampled with ``model.generate(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=120)``. HF merges
those keyword arguments over the checkpoint's ``generation_config.json``, then over its own global defaults
(``GenerationConfig._get_default_generation_params``: top_k 50). ``google/gemma-3-27b-it`` ships ``top_k: 64,
top_p: 0.95, eos_token_id: [1, 106]``, so upstream drew at T=0.7 with top-k 64, then top-p 0.9, stopping at <eos> or
<end_of_turn>. ``resolve_decoding`` decides the same thing from the same inputs, once, at plan time: the one
``Decoding`` value (config.py) the plan stores and the sampler and the baseline read. It refuses a
``generation_config`` that asks for any other logits processor (the sampler implements temperature, top-k and top-p
only), or holds a value HF would refuse (``top_k: -5``, ``top_k: 10.7``), naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ao_resampling.config import Decoding, ExperimentConfig
from ao_resampling.errors import AOResamplingError

# HF's global defaults for the fields this module reads (transformers 5.x, _get_default_generation_params).
HF_DEFAULT_TOP_K = 50


class UnsupportedGenerationConfig(AOResamplingError, ValueError):
    """The model's generation_config asks for a logits processor the sampler does not implement."""


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
    # Stopping criteria HF adds besides the eos ids and max_new_tokens: an answer would end where this sampler's
    # does not.
    "stop_strings": _set, "max_time": _set, "dola_layers": _set, "max_length": lambda value: False,
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


def _checked_top_k(value: Any, source: str) -> int:
    """A generation_config's top_k as HF's TopKLogitsWarper accepts it (a whole number; 0 or None = off)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnsupportedGenerationConfig(f"{source}'s generation_config sets top_k={value!r}: HF generate refuses "
                                          "it (expected a whole number >= 0); fix generation_config.json")
    return value


def _checked_top_p(value: Any, source: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise UnsupportedGenerationConfig(f"{source}'s generation_config sets top_p={value!r}: HF generate refuses "
                                          "it (expected a number in [0, 1]); fix generation_config.json")


def resolve_decoding(generation_config, *, temperature: float, top_p: float, top_k: int | None,
                     max_new_tokens: int, seed: int, fallback_eos: Sequence[int],
                     source: str = "the model") -> Decoding:
    """The run's settings over the model's generation_config over HF's defaults, as one value.

    ``top_k`` None = the model's. Greedy decoding (temperature 0) uses neither top-k nor top-p: they are recorded
    off (0 and 1.0), not as settings that did nothing.
    """
    bad = unsupported_fields(generation_config)
    if bad:
        listed = ", ".join(f"{k}={v!r}" for k, v in bad.items())
        raise UnsupportedGenerationConfig(
            f"{source}'s generation_config sets {listed}: HF generate would apply it while sampling, and this "
            f"sampler implements only temperature, top_k and top_p; unset it in generation_config.json")
    model_top_k = getattr(generation_config, "top_k", None) if generation_config is not None else None
    model_top_k = None if model_top_k is None else _checked_top_k(model_top_k, source)
    _checked_top_p(getattr(generation_config, "top_p", None) if generation_config is not None else None, source)
    if top_k is None:
        top_k = HF_DEFAULT_TOP_K if model_top_k is None else model_top_k
    greedy = temperature == 0
    return Decoding(temperature=float(temperature), top_p=1.0 if greedy else float(top_p),
                    top_k=0 if greedy else int(top_k), max_new_tokens=max_new_tokens, do_sample=not greedy,
                    seed=seed, eos_token_ids=eos_ids(generation_config, fallback_eos))


def run_decoding(config: ExperimentConfig, generation_config, *, fallback_eos: Sequence[int]) -> Decoding:
    """``config``'s decoding settings merged with ``generation_config``: the one place that reads them off the run's
    settings (the plan from the model's files; generate, to check the loaded model against the plan)."""
    return resolve_decoding(generation_config, temperature=config.temperature, top_p=config.top_p,
                            top_k=config.top_k, max_new_tokens=config.max_new_tokens, seed=config.decode_seed,
                            fallback_eos=fallback_eos, source=f"model {config.model!r}")


def model_generation_config(model):
    """The loaded model's generation_config (through a PEFT wrapper too), or None."""
    from ao_resampling.engine.loading.models import base_model

    return getattr(base_model(model), "generation_config", None)


def generate_kwargs(decoding: Decoding) -> dict[str, Any]:
    """HF ``generate``'s arguments for the same decoding (the reference paths): every merged setting passed
    explicitly, so HF decodes as the plan says whatever the loaded model's generation_config holds."""
    common = dict(max_new_tokens=decoding.max_new_tokens, eos_token_id=list(decoding.eos_token_ids or ()))
    if not decoding.do_sample:
        return common | dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return common | dict(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p,
                         top_k=decoding.top_k)
