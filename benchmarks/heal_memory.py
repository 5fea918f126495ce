"""Host memory of the healing pass on the real SmolLM2-135M: the process's high-water mark before and after
two healing steps (22 kept blocks, 8 x 256 tokens, the `cpu` recipe's batch, the full 49,152-token vocabulary).

    python benchmarks/heal_memory.py

The allocator is set up as a compression run sets it for the pass (`hostplan.freed_memory_returned`);
`--glibc-default` leaves glibc's dynamic mmap threshold, to show what that setting is worth.
The dense model's last hidden states are random (memory does not depend on their values); the
loss is printed so that two versions of `compress/heal.py` can be checked for the same result.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fusedeploy

from fusedeploy.compress import load_recipe  # noqa: E402
from fusedeploy.compress.activations import ActivationStore  # noqa: E402
from fusedeploy.compress import heal as heal_module  # noqa: E402
from fusedeploy.compress.heal import heal  # noqa: E402
from fusedeploy.compress.distill import REPAIRS  # noqa: E402
from fusedeploy.compress.hostplan import heal_bytes, return_freed_memory, shapes_of  # noqa: E402
from fusedeploy.models import adapter_for  # noqa: E402
from fusedeploy.models.loading import load_model  # noqa: E402

REMOVED = [17, 16, 18, 14, 13, 12, 5, 4]  # the blocks `make run` removed on 2026-12-03


def high_water_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    ap.add_argument("--logit-elements", type=int, default=None,
                    help="logits per slice of the loss (default: heal.LOGIT_ELEMENTS); two values fit the plan's copies")
    args = ap.parse_args()
    if not args.glibc_default:
        return_freed_memory()  # for the whole process, which only heals
    if args.logit_elements:
        heal_module.LOGIT_ELEMENTS = args.logit_elements
    model, _, _ = load_model("smollm2-135m", device="cpu", dtype="float32")
    model.requires_grad_(False)
    adapter = adapter_for(model)
    adapter.remove_blocks(model, REMOVED)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (16, 256), generator=gen)
    dense_final = ActivationStore(16, (256, model.config.hidden_size), torch.float32, torch.device("cpu"))
    dense_final.write(0, torch.randn(16, 256, model.config.hidden_size, generator=gen))
    before = high_water_gib()
    t0 = time.time()
    settings = load_recipe("cpu", {"heal_steps": 2})
    record = heal(model, adapter, ids, dense_final, settings, torch.device("cpu"), torch.float32)
    after = high_water_gib()
    planned = heal_bytes(shapes_of(model, adapter), settings, REPAIRS["fusion"], 4) / 2**30
    print(f"high-water before healing {before:.2f} GiB, after {after:.2f} GiB (+{after - before:.2f}, "
          f"planned +{planned:.2f}); first loss {record['loss_first']:.6f}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
