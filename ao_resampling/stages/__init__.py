"""The experiment's stages, each load -> work -> journal: plan, generate, judge, spread, baseline."""
