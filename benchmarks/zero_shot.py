"""Zero-shot retention on HellaSwag: a dense model and a compressed one on the subset `build --zero-shot` scores.

Both models are scored by lm-eval (acc and acc_norm) through `fusedeploy.evaluate.zero_shot`, on the
same items a build would pick: the first N items of the file in the seeded permutation (default
N = 1112, the standard error of an accuracy at most 1.5 points; seed 0). The JSON written holds
both accuracies with their standard errors, the retention (compressed / dense acc_norm) with its
paired standard error, the subset (seed, size, digest), the per-item scores and the wall time.
What is scored is the PyTorch checkpoints (a build scores its exported artifacts in their
runtime instead, through `fusedeploy serve`).

`--compressed` names one or more compressed Hugging Face checkpoints (`fusedeploy compress --out`), or
build folders, whose deployed model (the export stage's compressed reference) is then scored. The
dense model is scored once for all of them; the JSON is a list, one record per compressed model.
`--dense-from RECORD` reuses an earlier record's dense scores (on the same items) instead.

    python benchmarks/zero_shot.py --model smollm2-135m --compressed build/compress/model other/model \
        --data ../shared/data/hellaswag/val.jsonl --out-json benchmarks/results/zero-shot.json

`--limit 20` scores only the first 20 items of the subset (the same items a full run starts with):
a smoke test, recorded as such in the JSON, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fusedeploy, whatever else is installed
DATA = Path(os.environ.get("FUSEDEPLOY_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def deployed_checkpoint(path: Path) -> Path:
    """The checkpoint to score: `path` itself, or a build folder's deployed compressed PyTorch model."""
    export = path / "export" / "manifest.json"
    if not export.is_file():
        return path
    outputs = json.loads(export.read_text())["outputs"]
    reference = next((a["reference"] for a in outputs.values() if a["variant"] == "compressed"), None)
    if reference is None:
        raise SystemExit(f"{path} deploys no compressed model; give a build that removed blocks, or a checkpoint")
    return Path(reference) if Path(reference).is_absolute() else path / reference


def recorded_dense(record_path: Path):
    """The dense side of an earlier record, as a side `compare_each` takes: its per-item scores, on the same items."""
    from fusedeploy.evaluate.zero_shot import Scored, items_digest

    first = json.loads(record_path.read_text())[0]
    dense = first["dense"]

    def run(items: list[dict]) -> dict:
        digest = items_digest(items)
        if digest != first["subset"]["items_digest"]:
            raise SystemExit(f"{record_path} scored other items (digest {first['subset']['items_digest'][:12]}, "
                             f"these {digest[:12]}); score the dense model again")
        return {**first["per_item"]["dense"], "items_digest": digest}

    return Scored(run, f"{dense['scored']} (scores read from {record_path})", dense["model"], dense["runtime"])


def main() -> None:
    from fusedeploy.evaluate.zero_shot import DEFAULT_ITEMS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="the dense model (default: the built-in SmolLM2-135M)")
    ap.add_argument("--compressed", required=True, nargs="+",
                    help="compressed HF checkpoint folders or build folders (the dense model is scored once)")
    ap.add_argument("--data", default=str(DATA / "hellaswag" / "val.jsonl"), help="HellaSwag-format JSONL")
    ap.add_argument("--items", type=int, default=DEFAULT_ITEMS, help="subset size (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="the permutation's seed (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N items of the subset (smoke test)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s, as a build scores)")
    ap.add_argument("--dtype", default="float32", help="default: %(default)s, as a build scores")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dense-from", default=None,
                    help="a record this script wrote: reuse its dense scores instead of scoring the dense model "
                         "again (refused unless it scored the same items)")
    ap.add_argument("--out-json", default="benchmarks/results/zero-shot.json")
    args = ap.parse_args()

    from fusedeploy.evaluate.zero_shot import Subset, compare_each, compare_zero_shot, pytorch_side

    compressed = [deployed_checkpoint(Path(c)) for c in args.compressed]
    items = min(args.items, args.limit) if args.limit else args.items  # the subset's prefix: its first items
    load_before, t0 = os.getloadavg()[0], time.time()
    subset = Subset(args.data, items, args.seed)
    if args.dense_from:
        sides = [pytorch_side(c, "compressed pytorch checkpoint", args.device, args.dtype, args.batch_size)
                 for c in compressed]
        compared = compare_each(recorded_dense(Path(args.dense_from)), sides, subset)
    else:
        compared = compare_zero_shot(args.model, compressed, subset, device=args.device, dtype=args.dtype,
                                     batch_size=args.batch_size)
    host = {"platform": platform.platform(), "cpus": os.cpu_count(),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    records = [{"benchmark": "zero-shot retention", "smoke_test": args.limit is not None, "limit": args.limit,
                "items_requested": args.items, **detail, "wall_s_all_models": round(time.time() - t0, 1),
                "host": host, "args": vars(args)} for _, detail in compared]
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2))
    for summary in (s for s, _ in compared):
        m = summary["metric"]
        print(f"{summary['compressed']['model']}: {summary['subset']['n']} items (seed {args.seed}"
              f"{', smoke test' if args.limit else ''}): dense {m} {summary['dense'][m]:.4f} +/- "
              f"{summary['dense'][m + '_se']:.4f}, compressed {summary['compressed'][m]:.4f} +/- "
              f"{summary['compressed'][m + '_se']:.4f}, retention {summary['retention']:.4f} +/- "
              f"{summary['retention_se']:.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
