"""Text sources and token sampling."""

from .sampling import eval_windows, sample_sequences, tokenize
from .sources import BUILTIN, HF_DATASETS, load_text

__all__ = ["BUILTIN", "HF_DATASETS", "eval_windows", "load_text", "sample_sequences", "tokenize"]
