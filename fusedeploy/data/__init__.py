"""Text sources and token sampling."""

from .sampling import eval_windows, sample_sequences, tokenize
from .sources import BUILTIN, HF_DATASETS, load_text
from .split import text_part

__all__ = ["BUILTIN", "HF_DATASETS", "eval_windows", "load_text", "sample_sequences", "text_part", "tokenize"]
