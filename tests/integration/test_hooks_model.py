"""Capture and injection hooks on the tiny random Gemma 3 (and its random-LoRA oracle).

What is checked: hooks never outlive their ``with`` (also when the body or the forward raises); the captured
activation is exactly the residual HF reports for that layer and position, with left padding, and with the oracle's
LoRA switched off; capture stops the forward at the read layer; injection acts on the prompt pass only.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ao_resampling.inputs.encoding import encode_target
from ao_resampling.engine.hooks import (
    attached,
    capture_activations,
    inject,
    injecting,
    left_pad,
    position_ids_from_mask,
)
from ao_resampling.engine.loading.models import decoder_layers, layer_at_percent, num_layers
from ao_resampling.inputs.oracle import build_oracle_query

from tests.support.conversations import CONVERSATIONS

INJECTION_LAYER = 1


@pytest.fixture(scope="module", params=[pytest.param(False, id="text_only"), pytest.param(True, id="multimodal")])
def multimodal(request) -> bool:
    return request.param


@pytest.fixture(scope="module")
def tiny_model(tiny_model, multimodal, request):
    """Every test here runs on the text-only class and on Gemma3ForConditionalGeneration (what the hub checkpoint
    loads as: vision tower, ``model.language_model.layers``, its own forward and masks)."""
    return request.getfixturevalue("tiny_multimodal_model") if multimodal else tiny_model


@pytest.fixture(scope="module")
def tiny_oracle(tiny_oracle, multimodal, request):
    return request.getfixturevalue("tiny_multimodal_oracle") if multimodal else tiny_oracle


def language_model(root: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (layers + final norm) of either class."""
    return getattr(root.model, "language_model", root.model)


def test_the_multimodal_stand_in_has_the_checkpoint_class(tiny_model, multimodal):
    from transformers import Gemma3ForConditionalGeneration

    assert isinstance(tiny_model, Gemma3ForConditionalGeneration) == multimodal
    assert decoder_layers(tiny_model) is language_model(tiny_model).layers


@pytest.fixture(scope="module")
def read_layer(tiny_model) -> int:
    return layer_at_percent(num_layers(tiny_model), 50)


@pytest.fixture(scope="module")
def targets(gemma_tokenizer):
    encoded = [encode_target(gemma_tokenizer, m) for m in CONVERSATIONS]
    assert len({len(e.input_ids) for e in encoded}) == len(encoded), "mixed lengths, so the batch is padded"
    return encoded


@pytest.fixture(scope="module")
def reference_model(tiny_model):
    """A private copy for ``output_hidden_states``: HF installs its capturing hooks on first use and keeps them,
    and the shared fixture should not carry them into other tests."""
    return copy.deepcopy(tiny_model)


def hook_snapshot(model: torch.nn.Module) -> dict[str, tuple]:
    """Every module's forward (pre-)hooks. HF installs output-capturing hooks of its own the first time anyone asks
    a model for hidden states, and keeps them; so "no hook left" is checked as "the same hooks as before, none of
    ours", which holds whatever other tests did to the shared fixture first."""
    return {name: (tuple(m._forward_hooks.items()), tuple(m._forward_pre_hooks.items()))
            for name, m in model.named_modules()}


def our_hooks(model: torch.nn.Module) -> list[str]:
    """Hooks defined in ao_resampling, wherever they sit."""
    return [f"{name}: {fn}" for name, m in model.named_modules()
            for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
            if getattr(fn, "__module__", "").startswith("ao_resampling")]


def oracle_logits(oracle, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return oracle(input_ids=torch.tensor([ids])).logits[0, -1]


def layer_output_recorder(store: dict):
    def hook(module, args, output):
        store["h"] = (output[0] if isinstance(output, tuple) else output).clone()

    return hook


def capture(model, targets, layer):
    return capture_activations(model, [t.input_ids for t in targets], [t.assistant_start_idx for t in targets], layer,
                               pad_id=0)


# ---------------------------------------------------------------------------------------------------------------------
# Hook lifecycle


def test_no_hook_left_after_capture_and_injection(tiny_oracle, targets, read_layer):
    before = hook_snapshot(tiny_oracle)
    acts_BD = capture(tiny_oracle, targets, read_layer)
    assert hook_snapshot(tiny_oracle) == before
    with injecting(tiny_oracle, INJECTION_LAYER, acts_BD[:1, None], torch.tensor([[3]]), 1.0):
        assert our_hooks(tiny_oracle), "the injection hook is attached inside the with"
        oracle_logits(tiny_oracle, targets[0].input_ids)
    assert hook_snapshot(tiny_oracle) == before
    assert our_hooks(tiny_oracle) == []


def test_no_hook_left_after_an_exception_in_the_with_body(tiny_oracle):
    before = hook_snapshot(tiny_oracle)
    with pytest.raises(KeyboardInterrupt):
        with injecting(tiny_oracle, INJECTION_LAYER, torch.randn(1, 1, 64), torch.tensor([[0]]), 1.0):
            raise KeyboardInterrupt
    assert hook_snapshot(tiny_oracle) == before


def test_no_hook_left_after_an_exception_inside_the_forward(tiny_oracle, targets):
    before = hook_snapshot(tiny_oracle)
    wrong_width = torch.randn(1, 1, 65)  # the hidden size is 64: inject raises inside the forward
    with pytest.raises(ValueError, match="disagree"):
        with injecting(tiny_oracle, INJECTION_LAYER, wrong_width, torch.tensor([[3]]), 1.0):
            oracle_logits(tiny_oracle, targets[0].input_ids)
    assert hook_snapshot(tiny_oracle) == before


def test_capture_cleans_up_hook_and_adapter_when_the_forward_raises(tiny_oracle, targets, read_layer):
    expected = oracle_logits(tiny_oracle, targets[0].input_ids)
    before = hook_snapshot(tiny_oracle)
    out_of_vocab = [[10**7, 1, 2]]  # the embedding lookup fails, before the read layer
    with pytest.raises(IndexError):
        capture_activations(tiny_oracle, out_of_vocab, [0], read_layer, pad_id=0)
    assert hook_snapshot(tiny_oracle) == before
    torch.testing.assert_close(oracle_logits(tiny_oracle, targets[0].input_ids), expected, rtol=0, atol=0,
                               msg="the LoRA is enabled again after a failed capture")


# ---------------------------------------------------------------------------------------------------------------------
# Capture


def test_capture_equals_hf_hidden_states_with_left_padding(tiny_model, reference_model, targets, read_layer):
    acts_BD = capture(tiny_model, targets, read_layer)
    assert acts_BD.shape == (len(targets), tiny_model.config.get_text_config(decoder=True).hidden_size)

    with torch.inference_mode():
        for b, t in enumerate(targets):  # each target alone, unpadded
            hidden = reference_model(input_ids=torch.tensor([t.input_ids]), output_hidden_states=True).hidden_states
            assert len(hidden) == num_layers(tiny_model) + 1  # embeddings, then one per layer
            torch.testing.assert_close(acts_BD[b], hidden[read_layer + 1][0, t.assistant_start_idx], rtol=0,
                                       atol=1e-5)
        # ...and the same padded batch through HF's own forward.
        ids_BL, mask_BL = left_pad([t.input_ids for t in targets], pad_id=0)
        hidden = reference_model(input_ids=ids_BL, attention_mask=mask_BL,
                                 position_ids=position_ids_from_mask(mask_BL), output_hidden_states=True).hidden_states
    L = ids_BL.shape[1]
    for b, t in enumerate(targets):
        position = L - len(t.input_ids) + t.assistant_start_idx
        torch.testing.assert_close(acts_BD[b], hidden[read_layer + 1][b, position], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer", [pytest.param(0, id="first_layer"), pytest.param(3, id="last_layer")])
def test_capture_at_other_layers(tiny_model, reference_model, targets, layer):
    """Compared with a plain recording hook: HF's hidden_states[-1] is taken after the final norm, the capture
    (correctly, for a residual read) before it."""
    acts_BD = capture(tiny_model, targets, layer)
    store: dict = {}
    for b, t in enumerate(targets):
        with attached(decoder_layers(reference_model)[layer], layer_output_recorder(store)), torch.inference_mode():
            reference_model(input_ids=torch.tensor([t.input_ids]), use_cache=False)
        torch.testing.assert_close(acts_BD[b], store["h"][0, t.assistant_start_idx], rtol=0, atol=1e-5)


def test_capture_ignores_the_oracle_lora_which_otherwise_matters(tiny_model, tiny_oracle, targets, read_layer):
    base_params = dict(tiny_model.named_parameters())
    for name, param in tiny_oracle.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_params[name.replace(".base_layer", "")]), name

    torch.testing.assert_close(capture(tiny_oracle, targets, read_layer), capture(tiny_model, targets, read_layer),
                               rtol=0, atol=1e-6)
    with torch.inference_mode():
        ids = torch.tensor([targets[1].input_ids])
        with_lora = tiny_oracle(input_ids=ids).logits
        without_lora = tiny_model(input_ids=ids).logits
    assert (with_lora - without_lora).abs().max() > 1e-2, "the random LoRA changes the oracle's logits"


def test_capture_stops_the_forward_after_the_read_layer(tiny_oracle, targets, read_layer):
    root = tiny_oracle.get_base_model()
    later = {"next_layer": decoder_layers(tiny_oracle)[read_layer + 1], "final_norm": language_model(root).norm,
             "lm_head": root.lm_head}
    calls: list[str] = []

    def recorder(name):
        return lambda module, args, output: calls.append(name)

    def run_with_recorders(fn):
        calls.clear()
        with attached(later["next_layer"], recorder("next_layer")), \
                attached(later["final_norm"], recorder("final_norm")), attached(later["lm_head"], recorder("lm_head")):
            fn()
        return list(calls)

    assert run_with_recorders(lambda: capture(tiny_oracle, targets, read_layer)) == []
    # The recorders do fire on an ordinary forward, so the empty list above means something.
    assert run_with_recorders(lambda: oracle_logits(tiny_oracle, targets[0].input_ids)) == \
        ["next_layer", "final_norm", "lm_head"]


# ---------------------------------------------------------------------------------------------------------------------
# Injection: prompt pass only


@pytest.fixture(scope="module")
def oracle_batch(gemma_tokenizer, tiny_oracle, targets, read_layer):
    """Two oracle prompts of different lengths, left-padded, with one captured vector each."""
    queries = [build_oracle_query(gemma_tokenizer, layer=read_layer, question=q)
               for q in ("What is the persona?", "Is the user asking about weather, and if so, where?")]
    acts_BD = capture(tiny_oracle, targets[:2], read_layer)
    ids_BL, mask_BL = left_pad([q.input_ids for q in queries], pad_id=0)
    L = ids_BL.shape[1]
    positions_BK = torch.tensor([[L - len(q.input_ids) + p for p in q.placeholder_positions] for q in queries])
    return ids_BL, mask_BL, acts_BD[:, None], positions_BK


def test_prefill_hook_applies_inject_to_the_layer_output(tiny_oracle, oracle_batch):
    ids_BL, mask_BL, vectors_BKD, positions_BK = oracle_batch
    layer = decoder_layers(tiny_oracle)[INJECTION_LAYER]
    plain, steered = {}, {}
    kwargs = dict(input_ids=ids_BL, attention_mask=mask_BL, position_ids=position_ids_from_mask(mask_BL),
                  use_cache=False)
    with torch.inference_mode():
        with attached(layer, layer_output_recorder(plain)):
            plain_logits = tiny_oracle(**kwargs).logits
        # The injection hook is registered first, so the recorder sees its result.
        with injecting(tiny_oracle, INJECTION_LAYER, vectors_BKD, positions_BK, 1.0), \
                attached(layer, layer_output_recorder(steered)):
            steered_logits = tiny_oracle(**kwargs).logits
    assert torch.equal(steered["h"], inject(plain["h"], vectors_BKD, positions_BK, 1.0))
    assert not torch.equal(steered["h"], plain["h"])
    assert (steered_logits - plain_logits).abs().max() > 1e-4, "the injection reaches the logits"


def test_decode_step_is_untouched_by_the_injection_hook(tiny_oracle, oracle_batch):
    ids_BL, mask_BL, vectors_BKD, positions_BK = oracle_batch
    layer = decoder_layers(tiny_oracle)[INJECTION_LAYER]
    with torch.inference_mode():
        prefill = tiny_oracle(input_ids=ids_BL, attention_mask=mask_BL, position_ids=position_ids_from_mask(mask_BL),
                              use_cache=True)
        next_ids_B1 = prefill.logits[:, -1].argmax(-1, keepdim=True)
        step = dict(input_ids=next_ids_B1, attention_mask=torch.cat([mask_BL, mask_BL.new_ones(2, 1)], dim=1),
                    position_ids=position_ids_from_mask(mask_BL)[:, -1:] + 1)

        plain, hooked = {}, {}
        with attached(layer, layer_output_recorder(plain)):
            plain_logits = tiny_oracle(**step, past_key_values=copy.deepcopy(prefill.past_key_values),
                                       use_cache=True).logits
        with injecting(tiny_oracle, INJECTION_LAYER, vectors_BKD, positions_BK, 10.0), \
                attached(layer, layer_output_recorder(hooked)):
            hooked_logits = tiny_oracle(**step, past_key_values=copy.deepcopy(prefill.past_key_values),
                                        use_cache=True).logits
    assert hooked["h"].shape[1] == 1, "a decode step feeds one token per row"
    assert torch.equal(hooked["h"], plain["h"])
    assert torch.equal(hooked_logits, plain_logits)
