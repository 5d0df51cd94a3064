"""The oracle adapter loads whole or not at all (engine/loading/adapters.py), each check on its own: one module's LoRA
missing from the file (the model keeps that module's LoRA at its init), one tensor of the file that matches no module
(PEFT would drop it with a warning), an adapter whose effect is tiny but real (it must load: no tolerance may call it
"changes nothing"), and the injection layers the config allows (layer 0 included) accepted by the loader.
Adapters saved by PEFT from the tiny text model, edited on disk the way a damaged or mismatched file would be."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from ao_resampling.engine.loading import adapters
from ao_resampling.engine.loading.adapters import LORA_TARGETS, attach_oracle, load_oracle
from ao_resampling.engine.loading.models import ModelLoadError, load_model, load_tokenizer

PROMPT_BL = torch.tensor([[2, 105, 2364, 107, 3689, 563, 506, 7217, 236881, 106, 107, 105, 4368, 107]])
DROPPED = "layers.1.mlp.down_proj"  # the module whose LoRA is cut out of the file


def tiny():
    return load_model("synthetic:tiny", dtype="float32", device="cpu")


def save_adapter(folder, *, b_scale: float) -> None:
    """A PEFT adapter of the tiny model: A ~ N(0, 0.05), B ~ N(0, b_scale), from a generator of its own."""
    model = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(3)
    for name, param in sorted(model.named_parameters()):
        if "lora_A" in name or "lora_B" in name:
            scale = 0.05 if "lora_A" in name else b_scale
            param.data.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(folder, b_scale=0.05)
    return folder


def edited_copy(saved, out, edit) -> str:
    tensors = load_file(saved / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    save_file(edit(dict(tensors)), out / "adapter_model.safetensors")
    return str(out)


def test_an_adapter_file_missing_one_modules_lora_is_refused(saved, tmp_path):
    def drop(tensors):
        gone = [k for k in tensors if DROPPED in k]
        assert len(gone) == 2  # its lora_A and lora_B
        return {k: v for k, v in tensors.items() if DROPPED not in k}

    with pytest.raises(ModelLoadError, match=r"0 file tensor\(s\) unused.*2 model LoRA tensor\(s\) left at init"
                       ) as info:
        attach_oracle(tiny(), edited_copy(saved, tmp_path, drop))
    assert DROPPED in str(info.value)


def test_an_adapter_file_with_a_tensor_for_no_module_is_refused(saved, tmp_path):
    def add(tensors):
        like = next(k for k in tensors if "q_proj.lora_A" in k)
        return {**tensors, like.replace("q_proj", "no_such_proj"): torch.ones_like(tensors[like])}

    with pytest.raises(ModelLoadError, match=r"1 file tensor\(s\) unused.*no_such_proj.*0 model LoRA tensor\(s\)"):
        attach_oracle(tiny(), edited_copy(saved, tmp_path, add))


def test_an_adapter_with_a_tiny_but_real_effect_loads(tmp_path):
    save_adapter(tmp_path, b_scale=1e-6)
    oracle = attach_oracle(tiny(), str(tmp_path))
    with torch.inference_mode():
        with_adapter = oracle(input_ids=PROMPT_BL).logits[0, -1]
        with oracle.disable_adapter():
            without = oracle(input_ids=PROMPT_BL).logits[0, -1]
    # The effect is real but tiny (~3e-5 of logits ~1): a "changes nothing" check with a tolerance would refuse it.
    assert not torch.equal(with_adapter, without) and (with_adapter - without).abs().max() < 1e-4
    file_tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(file_tensors) == sum("lora_" in n for n, _ in oracle.named_parameters())


@pytest.mark.parametrize("layer", [0, 3])  # the first and the last of the tiny model's 4 layers
def test_the_loader_accepts_every_injection_layer_the_model_has(monkeypatch, gemma_tokenizer, layer):
    monkeypatch.setattr(adapters, "load_tokenizer", lambda spec: gemma_tokenizer)
    loaded = load_oracle(model="synthetic:tiny", tokenizer=None, oracle_lora="random", dtype="float32",
                         device="cpu", injection_layer=layer)
    assert (loaded.injection_layer, loaded.num_layers) == (layer, 4)
    with pytest.raises(ModelLoadError, match="injection_layer 4 is outside the model's 4 layers"):
        load_oracle(model="synthetic:tiny", tokenizer=None, oracle_lora="random", dtype="float32", device="cpu",
                    injection_layer=4)
