"""Quantization arithmetic in plain torch: grids, the GPTQ solver, walking a model's decoder layers, per-layer bit plans."""
