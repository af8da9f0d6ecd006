"""Names of the artifacts a run's measurements write and the report reads back.

Kept apart from the measurements themselves (which import torch, transformers, lm-eval) so that
`python -m sweep.report` reads a store without importing any of them.
"""
# Per-item evaluation results (sweep/measure/quality.py writes them; sweep/analysis/significance.py pools them).
ITEMS_ARTIFACT = "eval_items.json"
# The per-layer-group sensitivity table of a `method=sensitivity` run (sweep/measure/sensitivity.py), and the
# name its row for the output head has.
SENSITIVITY_ARTIFACT = "sensitivity.json"
LM_HEAD = "lm_head"
