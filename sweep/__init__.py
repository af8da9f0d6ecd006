"""sweep: declarative experiment sweeps for LLM weight quantization."""
__version__ = "0.1.0"
