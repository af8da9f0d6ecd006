"""Functions the task YAMLs name: lm-eval's own, so our wikitext scores are computed exactly as its task does."""
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401
