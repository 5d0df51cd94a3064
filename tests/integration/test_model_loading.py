"""Loading what the real run loads: the checkpoint's class and config, an oracle LoRA whole or not at all, in the
model's dtype, seeded the same in every process; and the weights left exactly as they were after a merged decode.

The adapters here are saved from the multimodal class both ways the AO checkpoints can have been made (PEFT's
``save_pretrained`` and transformers' ``add_adapter`` + ``save_pretrained``); a loaded oracle is compared with the
in-memory model that saved it, logits for logits.
"""

from __future__ import annotations

import subprocess
import sys

from unittest import mock

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from ao_resampling.engine.loading.adapters import LORA_TARGETS, attach_oracle
from ao_resampling.engine.loading.models import ModelLoadError, load_model, num_layers
from ao_resampling.config import Decoding
from ao_resampling.engine.decoding import merge
from ao_resampling.engine.decoding.sampler import Query, Sampler

from conftest import TINY_MULTIMODAL_SEED, REPO_ROOT

PROMPT_BL = torch.tensor([[2, 105, 2364, 107, 3689, 563, 506, 7217, 236881, 106, 107, 105, 4368, 107]])


def tiny_multimodal(dtype: str = "float32"):
    return load_model("synthetic:tiny-multimodal", dtype=dtype, device="cpu", seed=TINY_MULTIMODAL_SEED)


def randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """Nonzero A and B (a trained adapter, not one at its init), from a generator of this test's own."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def last_logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=PROMPT_BL).logits[0, -1]


# ---------------------------------------------------------------------------------------------------------------------
# The checkpoint's class and config


def test_27b_stand_in_is_what_google_gemma_3_27b_it_loads_as():
    from transformers import Gemma3ForConditionalGeneration

    model = load_model("synthetic:gemma-3-27b", device="meta")  # shapes only, no memory

    assert isinstance(model, Gemma3ForConditionalGeneration) and model.dtype == torch.bfloat16
    # The checkpoint's safetensors hold 54,864,813,280 bytes of bf16: 27,432,406,640 parameters.
    assert sum(p.numel() for p in model.parameters()) == 27_432_406_640
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.query_pre_attn_scalar, text.sliding_window,
            text.vocab_size) == (5376, 62, 32, 16, 128, 21_504, 168, 1024, 262_208)
    assert text.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert text.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert text.final_logit_softcapping is None and text.attn_logit_softcapping is None
    assert (vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size, vision.num_attention_heads,
            vision.image_size, vision.patch_size) == (27, 1152, 4304, 16, 896, 14)
    assert (model.config.mm_tokens_per_image, model.config.image_token_index, model.config.boi_token_index,
            model.config.eoi_token_index) == (256, 262_144, 255_999, 256_000)
    generation = model.generation_config
    assert (generation.do_sample, generation.top_k, generation.top_p, generation.eos_token_id,
            generation.bos_token_id, generation.pad_token_id) == (True, 64, 0.95, [1, 106], 2, 0)
    assert num_layers(model) == 62 and model.config._attn_implementation == "eager"


@pytest.mark.parametrize("spec", ["synthetic:tiny", "synthetic:tiny-multimodal", "gemma3-270m-gguf"])
def test_models_load_with_the_references_eager_attention(spec):
    assert load_model(spec, dtype="float32").config._attn_implementation == "eager"


def test_text_only_forward_of_the_multimodal_class_equals_the_text_class(tiny_multimodal_model):
    """Without pixel_values, Gemma3ForConditionalGeneration must compute what its language model alone computes:
    its own masks (bidirectional over image tokens) only come in with images."""
    from transformers import Gemma3ForCausalLM

    text_model = Gemma3ForCausalLM(tiny_multimodal_model.config.text_config).eval()
    state = {k.replace("model.language_model.", "model."): v for k, v in tiny_multimodal_model.state_dict().items()
             if k.startswith("model.language_model.") or k.startswith("lm_head.")}
    text_model.load_state_dict(state, strict=False)
    text_model.config._attn_implementation = "eager"
    torch.testing.assert_close(last_logits(tiny_multimodal_model), last_logits(text_model), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The oracle LoRA: whole or not at all


@pytest.fixture(scope="module")
def peft_saved(tmp_path_factory):
    """An adapter saved by PEFT from the multimodal class, and the logits of the model that saved it."""
    model = get_peft_model(tiny_multimodal(), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    randomize_lora(model, seed=1)
    folder = tmp_path_factory.mktemp("peft_adapter")
    model.save_pretrained(folder)
    return folder, last_logits(model)


def save_like_transformers(model: torch.nn.Module, config: LoraConfig, folder) -> None:
    """transformers 5.24's ``model.add_adapter(config)`` + ``model.save_pretrained(folder)``, step for step: the
    adapter injected into the model itself (no PeftModel around it), its state dict taken from the model and written
    with the ``base_model.model.`` prefix (``save_peft_format=True``), beside the adapter config. (transformers calls
    these PEFT functions itself, but refuses PEFT < 0.22, and 0.21.2 is the newest release this project can install.)
    """
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    inject_adapter_in_model(config, model, "default")
    model.peft_config = {"default": config}
    randomize_lora(model, seed=2)
    state = get_peft_model_state_dict(model, adapter_name="default")
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()},
              folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)


@pytest.fixture(scope="module")
def transformers_saved(tmp_path_factory):
    """An adapter saved through transformers' PEFT integration (``add_adapter`` + ``save_pretrained``)."""
    model = tiny_multimodal()
    folder = tmp_path_factory.mktemp("transformers_adapter")
    save_like_transformers(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS), folder)
    return folder, last_logits(model)


@pytest.mark.parametrize("saved", ["peft_saved", "transformers_saved"])
def test_a_saved_adapter_loads_whole(saved, request):
    folder, expected = request.getfixturevalue(saved)
    oracle = attach_oracle(tiny_multimodal(), str(folder))
    torch.testing.assert_close(last_logits(oracle), expected, rtol=0, atol=1e-6)
    file_tensors = load_file(folder / "adapter_model.safetensors")
    assert len(file_tensors) == sum("lora_" in n for n, _ in oracle.named_parameters()) > 0


def save_renamed(folder, out, old: str, new: str) -> None:
    """A copy of the adapter in ``folder`` saved to ``out`` with ``old`` replaced by ``new`` in every key."""
    tensors = load_file(folder / "adapter_model.safetensors")
    renamed = {k.replace(old, new): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    (out / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file(renamed, out / "adapter_model.safetensors")


def test_an_adapter_whose_keys_do_not_match_the_module_tree_is_refused(peft_saved, tmp_path):
    """Module names that are not in this model's tree (as after a rename across transformers versions): PEFT only
    warns and leaves those LoRA weights at their init, an oracle that is partly the base model."""
    folder, _ = peft_saved
    save_renamed(folder, tmp_path, ".self_attn.", ".attention.")

    with pytest.raises(ModelLoadError, match="did not load whole") as info:
        attach_oracle(tiny_multimodal(), str(tmp_path))
    assert ".attention." in str(info.value), "the message names keys that did not load"


def test_the_older_multimodal_key_names_load_whole(peft_saved, tmp_path):
    """Adapters trained under transformers < 4.52 name the layers ``language_model.model.layers``; PEFT maps them
    onto today's ``model.language_model.layers``, and the check agrees that all of them landed."""
    folder, expected = peft_saved
    save_renamed(folder, tmp_path, "model.language_model.layers", "language_model.model.layers")
    torch.testing.assert_close(last_logits(attach_oracle(tiny_multimodal(), str(tmp_path))), expected, rtol=0,
                               atol=1e-6)


def test_an_adapter_that_changes_nothing_is_refused(tmp_path):
    model = get_peft_model(tiny_multimodal(), LoraConfig(r=4, target_modules=LORA_TARGETS))  # B = 0: identity
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="changes nothing"):
        attach_oracle(tiny_multimodal(), str(tmp_path))


def test_a_bf16_model_keeps_its_lora_in_bf16(peft_saved):
    folder, _ = peft_saved
    oracle = attach_oracle(tiny_multimodal("bfloat16"), str(folder))
    dtypes = {p.dtype for n, p in oracle.named_parameters() if "lora_" in n}
    assert dtypes == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------------
# A merged decode leaves the base model exactly as it was


def test_after_a_merged_decode_every_weight_is_bit_identical(gemma_tokenizer):
    """In bf16, merge then unmerge moves weights by a rounding step; the next capture would see another model."""
    oracle = attach_oracle(tiny_multimodal("bfloat16"), "random", seed=0)
    before = {name: t.clone() for name, t in oracle.state_dict().items()}
    vectors_KD = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    query = Query(key="q", input_ids=tuple(PROMPT_BL[0].tolist()), n=2, vectors_KD=vectors_KD, positions_K=(4,))
    decoding = Decoding(temperature=0.7, top_p=0.9, max_new_tokens=3, top_k=64, eos_token_ids=(1, 106), seed=0)
    sampler = Sampler(oracle, gemma_tokenizer, decoding=decoding, injection_layer=1, coefficient=1.0, merge_lora=True)
    sampler.run([query], progress=False)

    after = oracle.state_dict()
    changed = [name for name, t in before.items() if not torch.equal(t, after[name])]
    assert changed == []
    assert not any(getattr(m, "merged", False) for m in oracle.modules()), "the adapter is unmerged again"
    assert all(not getattr(m, "disable_adapters", False) for m in merge.lora_modules(oracle)), "adapters back on"


def test_a_last_use_decode_keeps_the_merge_and_refuses_the_model_as_a_base_afterwards(gemma_tokenizer):
    """``last_use``: no copy of the base weights (none is taken: the snapshot is never called); the answers are
    those of a decode that restores (the same merged weights, the same streams); afterwards the model is the
    merged oracle with its adapter layers off (its logits those of the adapter on, unmerged), and every use of it
    as the base model (activation capture, the baseline, another merge, PEFT's own disable_adapter) is refused
    instead of silently reading the oracle's weights."""
    from ao_resampling.engine.hooks import capture_activations_at
    from ao_resampling.engine.loading.adapters import adapter_disabled

    vectors_KD = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    query = Query(key="q", input_ids=tuple(PROMPT_BL[0].tolist()), n=3, vectors_KD=vectors_KD, positions_K=(4,))
    decoding = Decoding(temperature=0.7, top_p=0.9, max_new_tokens=4, top_k=64, eos_token_ids=(1, 106), seed=0)

    def answers(oracle, last_use):
        sampler = Sampler(oracle, gemma_tokenizer, decoding=decoding, injection_layer=1, coefficient=1.0,
                          last_use=last_use)
        return [s.token_ids for s in sampler.run([query], progress=False)["q"]]

    restored = answers(attach_oracle(tiny_multimodal(), "random", seed=0), last_use=False)
    oracle = attach_oracle(tiny_multimodal(), "random", seed=0)
    with torch.inference_mode():
        adapter_on = oracle(input_ids=PROMPT_BL).logits
    with mock.patch.object(merge, "weights_snapshot", side_effect=AssertionError("snapshot taken")):
        kept = answers(oracle, last_use=True)

    assert kept == restored
    with torch.inference_mode():
        torch.testing.assert_close(oracle(input_ids=PROMPT_BL).logits, adapter_on, rtol=0, atol=1e-4)
    assert all(m.disable_adapters for m in merge.lora_modules(oracle))
    for use_as_base in (lambda: adapter_disabled(oracle).__enter__(), lambda: merge.merged_lora(oracle).__enter__(),
                        lambda: capture_activations_at(oracle, [PROMPT_BL[0].tolist()], [[3]], 1, 0),
                        lambda: oracle.disable_adapter().__enter__()):  # PEFT's own switch too
        with pytest.raises(RuntimeError, match="merged into its weights for good"):
            use_as_base()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_block_merge_gives_peft_merges_weights(dtype, monkeypatch):
    """The merge a block of output rows at a time (bounded temporaries) writes what PEFT's whole-matrix
    ``merge_adapter`` writes; inside it the forward is the merged base model, the adapter layers off."""
    monkeypatch.setattr(merge, "MERGE_CHUNK_BYTES", 512)  # many blocks per weight
    oracle = attach_oracle(tiny_multimodal(dtype), "random", seed=0)
    modules = merge.lora_modules(oracle)
    assert modules and all(m.base_layer.weight.shape[0] > max(1, 512 // (m.base_layer.in_features * 4))
                           for m in modules), "every weight merged in several blocks"
    with torch.inference_mode():
        unmerged_logits = oracle(input_ids=PROMPT_BL).logits
        with merge.merged_lora(oracle):
            ours = {id(m): m.base_layer.weight.clone() for m in modules}
            merged_logits = oracle(input_ids=PROMPT_BL).logits
        oracle.merge_adapter()
        peft = {id(m): m.base_layer.weight.clone() for m in modules}
        oracle.unmerge_adapter()
    for module in modules:
        # the same arithmetic; a block's matmul may sum in another order (float32: ~1e-9 here), which in bf16 can
        # round a few elements one ulp the other way (2 of 1024 here, 3e-5 on weights of ~0.02)
        close = {} if dtype == "float32" else dict(rtol=2**-7, atol=1e-4)
        torch.testing.assert_close(ours[id(module)], peft[id(module)], **close)
    tolerance = dict(rtol=0, atol=1e-4) if dtype == "float32" else dict(rtol=0.05, atol=0.5)
    torch.testing.assert_close(merged_logits.float(), unmerged_logits.float(), **tolerance)


# ---------------------------------------------------------------------------------------------------------------------
# The random stand-in oracle is the same in every process

LORA_DIGESTS = """
import hashlib, sys, torch
from ao_resampling.engine.loading.adapters import attach_oracle
from ao_resampling.engine.loading.models import load_model
for global_seed, lora_seed in zip(map(int, sys.argv[1::2]), map(int, sys.argv[2::2])):
    model = load_model("gemma3-270m-gguf", dtype="float32")
    torch.manual_seed(global_seed)  # whatever else this process drew from the global RNG before
    oracle = attach_oracle(model, "random", seed=lora_seed)
    digest = hashlib.sha256()
    for name, param in sorted(oracle.named_parameters(), key=lambda item: item[0]):
        if "lora_" in name:
            digest.update(name.encode() + param.detach().numpy().tobytes())
    print(digest.hexdigest())
import gc; gc.freeze()  # exit at once (as the CLI does): no last collection over torch's and the model's objects
"""


def lora_digests(*processes: list[tuple[int, int]]) -> list[list[str]]:
    """Each process's digests of the random LoRA for each of its (global seed, LoRA seed), in order. The processes
    run side by side (each its own interpreter; nothing is shared but the files they read)."""
    started = []
    for seeds in processes:
        args = [str(seed) for pair in seeds for seed in pair]
        started.append(subprocess.Popen([sys.executable, "-c", LORA_DIGESTS, *args], cwd=REPO_ROOT, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outputs = [proc.communicate(timeout=600) for proc in started]
    finally:  # none outlives the test, whatever failed
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_, stderr) in zip(started, outputs):
        assert proc.returncode == 0, stderr[-2000:]
    return [stdout.strip().splitlines()[-len(seeds):] for (stdout, _), seeds in zip(outputs, processes)]


def test_random_lora_is_bit_identical_in_two_processes():
    # Two processes, not three: the second LoRA seed is drawn in the first process, after the first adapter.
    [first, other_lora_seed], [second] = lora_digests([(1, 0), (1, 1)], [(2, 0)])
    assert first == second
    assert other_lora_seed != first, "the LoRA seed does choose the adapter"


def test_loading_an_oracle_warns_of_nothing_deprecated():
    """transformers 5.x deprecations (past_key_values=, is_gradient_checkpointing via PEFT) must not reach users."""
    import warnings

    from ao_resampling.engine.loading.adapters import attach_oracle
    from ao_resampling.engine.loading.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        attach_oracle(load_model("synthetic:tiny", dtype="float32", device="cpu"), "random", seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# The packaged tokenizer's folder records its added tokens in its config (a load parses tokenizer.json once)


def test_recording_the_added_tokens_in_the_config_loads_the_same_tokenizer(tmp_path):
    """What ``_record_added_tokens`` writes into a converted tokenizer's folder changes nothing that is loaded: the
    same backend (vocabulary, merges, normalizer, added tokens and their flags), special tokens and settings."""
    import json

    from transformers import AddedToken, AutoTokenizer
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    from ao_resampling.engine.loading.models import _record_added_tokens

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5, "a": 6, "b": 7, "▁a": 8}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[("▁", "a")])
    tokenizer.add_tokens([AddedToken("<start_of_turn>", special=True, normalized=False),
                          AddedToken("<end_of_turn>", special=True, normalized=False),
                          AddedToken("[plain]", special=False, normalized=True, lstrip=True)])
    tokenizer.save_pretrained(tmp_path)
    before = AutoTokenizer.from_pretrained(str(tmp_path))
    _record_added_tokens(tmp_path)
    recorded = json.loads((tmp_path / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    after = AutoTokenizer.from_pretrained(str(tmp_path))

    in_json = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
    assert recorded == {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in in_json}
    (plain,) = [t for t in recorded.values() if t["content"] == "[plain]"]
    assert plain["lstrip"] and plain["normalized"] and not plain["special"]
    assert after.backend_tokenizer.to_str() == before.backend_tokenizer.to_str()
    assert {i: t.__getstate__() for i, t in after.added_tokens_decoder.items()} == \
        {i: t.__getstate__() for i, t in before.added_tokens_decoder.items()}
    assert after.special_tokens_map == before.special_tokens_map
    assert after.init_kwargs.keys() == before.init_kwargs.keys()
    text = "<start_of_turn>a b [plain] <end_of_turn>"
    assert after(text).input_ids == before(text).input_ids
    _record_added_tokens(tmp_path)  # once there, left as it is
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["added_tokens_decoder"] == recorded


def test_a_tokenizer_folder_that_cannot_be_written_is_left_as_it_is(tmp_path, monkeypatch):
    """A read-only tokenizer folder (a shared cache) loads as before: the added tokens are not recorded, no error,
    no half-written config and no temporary file left."""
    import errno
    import json
    import os

    from transformers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    from ao_resampling.engine.loading.models import _record_added_tokens

    tokenizer = GemmaTokenizer(vocab={"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "a": 5}, merges=[])
    tokenizer.add_tokens([AddedToken("<start_of_turn>", special=True, normalized=False)])
    tokenizer.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def read_only(*_):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    _record_added_tokens(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert "added_tokens_decoder" not in json.loads((tmp_path / "tokenizer_config.json").read_text())


def test_the_packaged_tokenizer_folder_has_its_added_tokens_in_its_config(gemma_tokenizer):
    import json

    from ao_resampling.engine.loading.models import _converted_gemma3_270m

    config = json.loads((_converted_gemma3_270m() / "tokenizer" / "tokenizer_config.json").read_text())
    recorded = config["added_tokens_decoder"]
    assert len(recorded) == len(gemma_tokenizer.added_tokens_decoder) > 6000
    assert recorded["106"] == {"content": "<end_of_turn>", "single_word": False, "lstrip": False, "rstrip": False,
                               "normalized": False, "special": True}
