"""The oracle's adapter: attaching it whole or not at all, and the oracle a run uses (base model + adapter).

Oracle adapters (``--oracle-lora``): a PEFT LoRA by hub id or local dir, or ``random`` (seeded, nonzero B) for
plumbing tests and demos. A real adapter must put every tensor of its file into the model and change the logits, or
loading fails (PEFT only warns). Activations are read with the adapter disabled (``adapter_disabled``); AO answers are
generated with it enabled. Shapes: B = batch, L = sequence; ``_BX`` = a tensor of any shape.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ao_resampling.engine.loading.models import (
    LoadedOracle,
    ModelLoadError,
    layer_at_percent,
    load_model,
    load_tokenizer,
    model_device,
    num_layers,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def attach_oracle(model: nn.Module, spec: str, seed: int = 0, rank: int = 8):
    """Wrap ``model`` in a PeftModel holding the oracle LoRA ('random' = seeded random LoRA with nonzero B).

    A real adapter loads whole or not at all: every tensor of its file must land in the model (PEFT only warns about
    keys it cannot place, leaving those LoRA weights at their init) and enabling it must change the logits.
    Its weights stay in the model's dtype, as transformers' ``load_adapter`` (the reference's loader) keeps them.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if spec == "random":
        with _peft_quietly():
            peft_model = get_peft_model(
                model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
            )
        seed_lora_weights(peft_model, seed)
    else:
        try:
            with _peft_quietly():
                peft_model = PeftModel.from_pretrained(model, spec, is_trainable=False, autocast_adapter_dtype=False)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load oracle LoRA {spec!r} (hub id or local directory): {e}") from e
        check_lora_loaded(spec, adapter_file_tensors(spec), adapter_tensors(peft_model))
        check_adapter_changes_logits(spec, peft_model)
    peft_model.eval().requires_grad_(False)
    return peft_model


@contextlib.contextmanager
def _peft_quietly() -> Iterator[None]:
    """PEFT's own wrapper (0.21) calls transformers' deprecated ``is_gradient_checkpointing``: a FutureWarning about
    PEFT's code, not ours, that every run would print. Only that one message is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def seed_lora_weights(peft_model: nn.Module, seed: int) -> None:
    """Every LoRA tensor drawn from one generator seeded with ``seed``, in name order: the same adapter in every
    process (PEFT would draw lora_A from the global RNG, and a resumed demo would mix two adapters)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in sorted(peft_model.named_parameters(), key=lambda item: item[0]):
        if "lora_A" in name:  # PEFT's kaiming-uniform range, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            values = (torch.rand(param.shape, generator=generator) * 2 - 1) * param.shape[-1] ** -0.5
        elif "lora_B" in name:  # PEFT initialises B to zero (adapter = identity); make it do something
            values = torch.randn(param.shape, generator=generator) * 0.02
        else:
            continue
        param.data.copy_(values.to(param.dtype))


def adapter_file_tensors(spec: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter's weights file (local folder or hub id), by their names in the file."""
    from safetensors.torch import load_file

    folder = Path(spec)
    if not folder.exists():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec, allow_patterns=["adapter_model.*", "adapter_config.json"]))
    if (folder / "adapter_model.safetensors").exists():
        return load_file(str(folder / "adapter_model.safetensors"))
    if (folder / "adapter_model.bin").exists():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise ModelLoadError(f"oracle LoRA {spec!r}: no adapter_model.safetensors or adapter_model.bin in {folder}")


def adapter_tensors(peft_model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The model's tensors that belong to ``adapter`` (its LoRA A/B, any modules_to_save copies)."""
    return {name: param for name, param in peft_model.named_parameters() if f".{adapter}." in f"{name}."}


def unmatched_tensors(file_BX: dict[str, torch.Tensor], model_BX: dict[str, torch.Tensor]
                      ) -> tuple[list[str], list[str]]:
    """(file tensors found nowhere in the model, model tensors equal to no file tensor), matched by shape and value
    (in the model's dtype), whatever the names: a loaded adapter holds exactly its file's tensors."""
    import collections
    import hashlib

    def fingerprint(t: torch.Tensor, dtype: torch.dtype) -> tuple:
        data = t.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8)
        return tuple(t.shape), hashlib.sha256(data.numpy().tobytes()).hexdigest()

    dtype = next(iter(model_BX.values())).dtype if model_BX else torch.float32
    in_model = collections.Counter(fingerprint(t, t.dtype) for t in model_BX.values())
    in_file = collections.Counter(fingerprint(t, dtype) for t in file_BX.values())
    unused, spare = in_file - in_model, in_model - in_file
    file_unused = [n for n, t in file_BX.items() if unused[fingerprint(t, dtype)] > 0]
    model_at_init = [n for n, t in model_BX.items() if spare[fingerprint(t, t.dtype)] > 0]
    return file_unused, model_at_init


def check_lora_loaded(spec: str, file_BX: dict[str, torch.Tensor], model_BX: dict[str, torch.Tensor]) -> None:
    file_unused, model_at_init = unmatched_tensors(file_BX, model_BX)
    if file_unused or model_at_init or not model_BX:
        raise ModelLoadError(
            f"oracle LoRA {spec!r} did not load whole ({len(file_BX)} tensors in the file, {len(model_BX)} in the "
            f"model): {len(file_unused)} file tensor(s) unused, e.g. {file_unused[:3]}; {len(model_at_init)} model "
            f"LoRA tensor(s) left at init, e.g. {model_at_init[:3]}. The key names in the adapter file do not match "
            f"this model's module tree (a transformers version that renamed the Gemma 3 modules?)"
        )


@torch.inference_mode()
def check_adapter_changes_logits(spec: str, peft_model: nn.Module) -> None:
    ids_BL = torch.tensor([[2, 105, 2364, 107, 9259, 106]], device=model_device(peft_model))  # <bos>user turn
    with_adapter = peft_model(input_ids=ids_BL).logits[0, -1]
    with peft_model.disable_adapter():
        without = peft_model(input_ids=ids_BL).logits[0, -1]
    if torch.equal(with_adapter, without):
        raise ModelLoadError(f"oracle LoRA {spec!r} loaded but changes nothing: the logits with and without it are "
                             f"equal (an adapter saved at its init, or one whose layers are not in this model)")


# Set on a model whose last decode stage merged the LoRA into the weights for good (merge.py, restore=False): its
# weights are the oracle's, and nothing can give the base model back but loading it again.
LORA_MERGED_FOR_GOOD = "ao_resampling_lora_merged_for_good"


BASE_WEIGHTS_GONE = ("this model's LoRA was merged into its weights for good by a decode stage that was to be its "
                     "last (no copy of the base weights was kept): load the model again")


def check_base_weights(model: nn.Module) -> None:
    """Refuses a model whose base weights are gone (``LORA_MERGED_FOR_GOOD``), before it is used as the base."""
    if getattr(model, LORA_MERGED_FOR_GOOD, False):
        raise RuntimeError(BASE_WEIGHTS_GONE)


def mark_base_weights_gone(model: nn.Module) -> None:
    """``LORA_MERGED_FOR_GOOD`` set, and PEFT's own ``disable_adapter()`` on this model refused too (it would run the
    merged weights as if they were the base model's)."""
    setattr(model, LORA_MERGED_FOR_GOOD, True)

    def disable_adapter(*_args, **_kwargs):
        raise RuntimeError(BASE_WEIGHTS_GONE)

    model.disable_adapter = disable_adapter  # shadows PeftModel.disable_adapter on this instance


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Base-model behaviour for activation capture and the target baseline; no-op for a plain model."""
    check_base_weights(model)
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


def load_oracle(*, model: str, tokenizer: str | None, oracle_lora: str, dtype: str, device: str,
                device_map: str | None = None, layer_percent: int = 50, injection_layer: int = 1) -> LoadedOracle:
    tok = load_tokenizer(tokenizer or model)
    base = load_model(model, dtype=dtype, device=device, device_map=device_map)
    n = num_layers(base)
    if not 0 <= injection_layer < n:
        raise ModelLoadError(f"injection_layer {injection_layer} is outside the model's {n} layers")
    oracle = attach_oracle(base, oracle_lora)
    return LoadedOracle(oracle, tok, n, layer_at_percent(n, layer_percent), injection_layer)
