"""Pure input handling: target conversations, question pools, chat encoding, AO prompts. No model, no torch."""
