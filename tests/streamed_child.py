"""Run one compression in this fresh process and report its host-memory high-water mark (JSON on stdout).

Used by tests/test_compress_streaming.py: `python -m tests.streamed_child MODEL CALIB OUT MODE ALLOWANCE_BYTES [DTYPE]`,
MODE `memory` (the in-memory plan, forced), `streamed` (forced) or `auto` (the plan decides);
ALLOWANCE_BYTES 0: no budget (the machine's); DTYPE the compute dtype (default: compress's).
Everything the run imports is imported first, then the kernel's high-water mark is reset to the
resident size at that moment (/proc/self/clear_refs, "5"), so what is measured is what the run
adds on top of the interpreter, torch and the libraries. The budget the run plans against is that
baseline plus ALLOWANCE_BYTES, since the plan counts this process's own size as the machine's
memory it already uses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    model, calib, out, mode, allowance = sys.argv[1:6]
    dtype = sys.argv[6] if len(sys.argv) > 6 else None
    # what the run would import lazily, imported before the baseline
    import accelerate  # noqa: F401
    import huggingface_hub.serialization  # noqa: F401
    import psutil  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    import fusedeploy.data  # noqa: F401
    from fusedeploy.compress import CompressJob, compress_model, load_recipe
    from fusedeploy.compress import driver  # noqa: F401
    from fusedeploy.models.loading import load_config, load_tokenizer, resolve_model

    torch.set_num_threads(1)
    load_tokenizer(resolve_model(model))  # tokenizer machinery warm, as every run has it
    load_config(resolve_model(model))
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status("VmRSS")
    # one removal, a group of two, short sequences: the run is about memory, not quality
    settings = load_recipe("quick", {"group_size": 1, "mi_samples": 1, "ft_samples": 4, "batch_size": 2,
                                     "seq_len": 16})
    job = CompressJob(model, out, 0.005, calib=calib, settings=settings,
                      dtype=dtype, stream={"streamed": True, "memory": False, "auto": None}[mode],
                      max_host_memory=(baseline + int(allowance)) / 1e9 if int(allowance) else None)
    report = compress_model(job)
    print(json.dumps({"baseline": baseline, "peak": _status("VmHWM"), "removed": report["removed_blocks"],
                      "plan": report["memory"]["host_plan"]}))


if __name__ == "__main__":
    main()
