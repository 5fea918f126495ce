"""Text for calibration and evaluation: sources and token sampling.

Modules: `sources` (files, folders, JSON Lines, Hugging Face datasets, the
offline `builtin` corpus) and `sampling` (seeded calibration samples, fixed
evaluation windows; the two never share windows).
"""

from .sampling import eval_windows, sample_sequences, tokenize
from .sources import BUILTIN, HF_DATASETS, load_text
from .split import text_part

__all__ = ["BUILTIN", "HF_DATASETS", "eval_windows", "load_text", "sample_sequences", "text_part", "tokenize"]
