"""One FuseGPT iteration (cpu recipe, one block, 64 fine-tuning sequences, builtin calibration, no healing):
wall, scoring and distillation time and the process's high-water mark, under one glibc allocator setting.

    python benchmarks/log/2026-12-06-allocator-ab.py dynamic            # glibc's default
    python benchmarks/log/2026-12-06-allocator-ab.py fixed              # the mmap threshold fixed at 128 kB
    MALLOC_MMAP_THRESHOLD_=4194304 python benchmarks/log/2026-12-06-allocator-ab.py dynamic   # fixed at 4 MB
    MALLOC_MMAP_THRESHOLD_=16777216 python benchmarks/log/2026-12-06-allocator-ab.py dynamic  # fixed at 16 MB
    python benchmarks/log/2026-12-06-allocator-ab.py trim               # dynamic, malloc_trim after every Adam step

Each in its own process, one after the other. Written against the code of 2026-12-06, when every
compression briefly fixed the threshold itself ("fixed" then needed nothing; it is applied here).
"""
import ctypes
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fusedeploy.compress import CompressJob, compress_model, hostplan, load_recipe  # noqa: E402

mode = sys.argv[1]
if mode == "fixed":
    hostplan.return_freed_memory()
if mode == "trim":
    libc, step = ctypes.CDLL("libc.so.6"), torch.optim.Adam.step

    def trimmed(self, *a, **k):
        out = step(self, *a, **k)
        libc.malloc_trim(0)
        return out

    torch.optim.Adam.step = trimmed
marks: dict[str, float] = {}


def progress(kind, done, total, status):
    marks.setdefault(kind, time.time())
    marks[kind + "_end"] = time.time()


t0 = time.time()
compress_model(CompressJob("smollm2-135m", f"runs/allocator-{mode}", 1 / 30, calib="builtin", force=True,
                           settings=load_recipe("cpu", {"heal_steps": 0, "ft_samples": 64})), progress)
print(mode, "wall", round(time.time() - t0, 1), "scoring", round(marks["score_end"] - marks["score"], 1),
      "distillation", round(marks["epoch_end"] - marks["score_end"], 1),
      "peak GiB", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
