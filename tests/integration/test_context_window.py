"""models.model_context_length reads the context window from a config alone (no weights), for the pre-flight
check that refuses targets and oracle prompts longer than it."""

from __future__ import annotations

import json

from ao_resampling.engine.loading import models


def test_a_multimodal_config_gives_its_text_models_window(tmp_path):
    # google/gemma-3-27b-it is a Gemma3ForConditionalGeneration: the window is in text_config, not at the top level.
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "text_config": {"model_type": "gemma3_text", "max_position_embeddings": 12_345, "num_hidden_layers": 6},
              "vision_config": {"model_type": "siglip_vision_model"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert models.model_context_length(str(tmp_path)) == 12_345


def test_the_converted_270m_and_the_synthetic_shapes():
    length = models.model_context_length("gemma3-270m-gguf")  # converts the GGUF first on a fresh machine
    converted = json.loads((models._converted_gemma3_270m() / "model" / "config.json").read_text())
    assert length == converted["max_position_embeddings"]
    assert models.model_context_length("synthetic:tiny") == 4096
    assert models.model_context_length("synthetic:gemma-3-27b") == 131_072  # google/gemma-3-27b-it's text_config
