"""Small target conversations of mixed lengths (system prompt, multi-turn), shared by the engine tests."""

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are a pirate. Always talk like one."},
     {"role": "user", "content": "What's the weather like today, and should I take an umbrella?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
]
