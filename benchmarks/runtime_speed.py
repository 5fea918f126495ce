"""Decode/prefill speed of several artifacts, measured in interleaved rounds.

The build's profile stage measures each artifact once, one after the other, so a
burst of load on the machine lands on one artifact only and skews the ratio.
Here every round measures every artifact (each in its own process, through the
project's profiler), and the table reports the median over rounds, so the
dense/compressed ratio is taken side by side under the same conditions.

    python benchmarks/runtime_speed.py --artifact dense=build/x/export/dense-onnx \\
        --artifact fusegpt=build/x/export/model-onnx --rounds 3 --out-json speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from fusedeploy.errors import UserError
from fusedeploy.profiling.measure import measure_artifact

KEYS = ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", action="append", required=True, help="label=path (.gguf or ONNX folder)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args()

    bad = [a for a in args.artifact if "=" not in a or not Path(a.split("=", 1)[1]).exists()]
    if bad:
        ap.error(f"--artifact expects label=path to an existing .gguf file or ONNX folder, got {bad[0]!r}")
    artifacts = dict(a.split("=", 1) for a in args.artifact)
    samples: dict[str, list[dict]] = {label: [] for label in artifacts}
    for rnd in range(args.rounds):
        for label, path in artifacts.items():
            load = os.getloadavg()[0]
            try:
                m = measure_artifact(path, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                     runs=args.runs)
            except UserError as exc:
                ap.exit(2, f"error: {exc}\n")
            row = {k: m["metrics"][k]["median"] for k in KEYS}
            row.update(peak_rss_mb=m["peak_rss_bytes"] / 2**20, load_before=load, round=rnd)
            samples[label].append(row)
            print(json.dumps({"label": label, **row}), flush=True)

    summary = {label: {k: statistics.median(r[k] for r in rows) for k in (*KEYS, "peak_rss_mb")}
               for label, rows in samples.items()}
    lines = ["| artifact | decode tok/s | prefill tok/s | TTFT (s) | peak RSS (MiB) |", "|---|---:|---:|---:|---:|"]
    for label, s in summary.items():
        lines.append(f"| {label} | {s['decode_tokens_per_s']:.2f} | {s['prefill_tokens_per_s']:.0f} | "
                     f"{s['time_to_first_token_s']:.3f} | {s['peak_rss_mb']:.0f} |")
    print("\n".join(lines))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"settings": vars(args), "samples": samples, "summary": summary},
                                                  indent=2))


if __name__ == "__main__":
    main()
