"""Measurements of a model as run: memory, generation latency, quality through lm-eval, a perplexity probe, per-layer sensitivity."""
