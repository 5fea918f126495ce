"""The quality curve of a `build --max-sparsity` run on public text, and the planner against the profiler.

Part 1 replays the build's compression steps (bitwise each k-block model) and scores every k on
WikiText-2 test and PTB test with the project protocol (ctx 512, first 20 windows, no special
tokens, PyTorch fp32), beside the build's own curve point (perplexity in the deployed runtime on the
held-out builtin text, projected decode speed).

Part 2 exports a few points to GGUF at the curve's precision, measures each in llama.cpp (its own
process, as the build's profile stage does), and compares for several profiles: the planner's ideal
roofline, the planner calibrated with the efficiency the dense artifact reached here, and the
profiler's measured-then-projected figure. Target: calibrated within 15 % of measured-then-projected.

    python benchmarks/curve_table.py --build build/curve --out-json benchmarks/results/curve.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from compress_quality import evaluate


def wikitext_ptb(run_dir: Path) -> list[dict]:
    from fusedeploy.compress import steps

    rows = []
    for k, model, tokenizer in steps.replay(run_dir):
        t = time.time()
        rows.append({"k": k, **evaluate(model.eval(), tokenizer), "eval_s": round(time.time() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def projections(run_dir: Path, base_model: str, precision: str, ks: list[int], profiles: list[str],
                prompt: int, new: int, runs: int) -> dict:
    from fusedeploy import formats
    from fusedeploy.compress import steps
    from fusedeploy.models.loading import load_config, resolve_model, save_tokenizer
    from fusedeploy.profiling.measure import calibrate_host, efficiency, measure_artifact, project
    from fusedeploy.profiling.planner import IDEAL, ModelShape, estimate
    from fusedeploy.profiling.schema import load_profile

    shape = ModelShape.from_config(load_config(resolve_model(base_model)))
    rt = formats.runtime("llama.cpp")
    host = calibrate_host()
    measured = {}
    with tempfile.TemporaryDirectory(prefix="fd-curve-") as scratch:
        scratch = Path(scratch)
        for k, model, tokenizer in steps.replay(run_dir, max(ks)):
            if k not in ks:
                continue
            folder = scratch / f"model-{k}"
            model.save_pretrained(folder)
            save_tokenizer(tokenizer, folder)
            artifact = rt.export(str(folder), scratch / f"k{k}", precision)
            m = measure_artifact(artifact, prompt_tokens=prompt, new_tokens=new, runs=runs)
            measured[k] = {"metrics": m, "size_bytes": rt.size_bytes(artifact)}
            print(f"k={k}: decode {m['metrics']['decode_tokens_per_s']['median']:.1f} tok/s, prefill "
                  f"{m['metrics']['prefill_tokens_per_s']['median']:.1f} tok/s, load {m['host_load']}", flush=True)
            shutil.rmtree(folder)
            artifact.unlink()
    eff = efficiency(shape, measured[0]["metrics"], host, "llama.cpp", precision, shape.blocks,
                     source="dense GGUF measured on this host")
    table = []
    for name in profiles:
        profile = load_profile(name)
        for k in ks:
            kept = shape.blocks - k
            mp = project(measured[k]["metrics"], host, profile, shape.kv_bytes_per_token(kept, "llama.cpp"),
                         measured[k]["size_bytes"])
            ideal = estimate(shape, profile, k / shape.blocks, precision, IDEAL)
            calibrated = estimate(shape, profile, k / shape.blocks, precision, eff)
            table.append({"profile": name, "k": k,
                          "decode": {"ideal": ideal.decode_tokens_per_s, "calibrated": calibrated.decode_tokens_per_s,
                                     "measured_projected": mp["decode_tokens_per_s"]},
                          "ttft": {"ideal": ideal.time_to_first_token_s,
                                   "calibrated": calibrated.time_to_first_token_s,
                                   "measured_projected": mp["time_to_first_token_s"]}})
    return {"host": host.to_dict(), "efficiency": asdict(eff), "prompt_tokens": prompt, "new_tokens": new,
            "measured": {str(k): v["metrics"]["metrics"] for k, v in measured.items()},
            "host_load": {str(k): v["metrics"]["host_load"] for k, v in measured.items()}, "table": table}


def render(result: dict) -> str:
    curve = {p["k"]: p for p in result["build_curve"]}
    lines = ["| removed | sparsity | WikiText-2 PPL | PTB PPL | builtin held-out PPL (llama.cpp) | ratio to dense | "
             "projected decode tok/s (edge-8gb) | meets every budget |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["public"]:
        p = curve[r["k"]]
        lines.append(f"| {r['k']} | {p['sparsity']:.3f} | {r['wikitext2']:.2f} | {r['ptb']:.2f} | "
                     f"{p['perplexity']:.2f} | {p['perplexity_ratio']:.3f} | {p['decode_tokens_per_s']:.1f} | "
                     f"{'yes' if p['fits'] else 'no'} |")
    pj = result["projection"]
    lines += ["", f"Efficiency on this host (dense GGUF): decode {pj['efficiency']['decode']:.3f} of copy bandwidth, "
              f"prefill {pj['efficiency']['prefill']:.3f} of matmul peak.", "",
              "| profile | removed | decode ideal | decode calibrated | decode measured-projected | error | "
              "TTFT ideal | TTFT calibrated | TTFT measured-projected | error |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in pj["table"]:
        d, t = r["decode"], r["ttft"]
        lines.append(f"| {r['profile']} | {r['k']} | {d['ideal']:.1f} | {d['calibrated']:.1f} | "
                     f"{d['measured_projected']:.1f} | {d['calibrated'] / d['measured_projected'] - 1:+.1%} | "
                     f"{t['ideal']:.3f} | {t['calibrated']:.3f} | {t['measured_projected']:.3f} | "
                     f"{t['calibrated'] / t['measured_projected'] - 1:+.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True, help="a build folder made with --max-sparsity")
    ap.add_argument("--ks", default=None, help="points to export and measure (default: 0, middle, chosen, deepest)")
    ap.add_argument("--profiles", default="edge-8gb,laptop-16gb,raspberry-pi-5-8gb")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out-json", default="benchmarks/results/curve.json")
    ap.add_argument("--render", action="store_true", help="only print the tables of --out-json")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(Path(args.out_json).read_text())))
        return
    build = Path(args.build)
    report = json.loads((build / "report" / "report.json").read_text())
    run_dir = build / "compress" / "model"
    points = report["quality_curve"]["points"]
    deepest = points[-1]["k"]
    ks = sorted({int(k) for k in args.ks.split(",")} if args.ks else
                {0, deepest // 2, report["quality_curve"]["chosen_k"], deepest})
    result = {"build": str(build), "model": report["model"], "load_before": os.getloadavg(),
              "build_curve": points, "build_stages": report["stages"], "public": wikitext_ptb(run_dir)}
    result["projection"] = projections(run_dir, report["model"], points[0]["precision"], ks,
                                       args.profiles.split(","), args.prompt_tokens, args.new_tokens, args.runs)
    result["load_after"] = os.getloadavg()
    Path(args.out_json).write_text(json.dumps(result, indent=2))
    print(render(result))


if __name__ == "__main__":
    main()
