"""Loading: the only place models, tokenizers and adapters come from."""
