"""Quality of every compression method on the real SmolLM2-135M (CPU recipe by default).

Calibrates on wikitext-2/valid.txt, evaluates perplexity on wikitext-2/test.txt and
ptb/test.txt with the project protocol (ctx 512, first 20 non-overlapping windows,
no special tokens), records compression time. Results are appended to a JSON file
(one record per run, so an interrupted benchmark keeps what finished) and rendered
as a markdown table.

    nice -n 5 python benchmarks/compress_quality.py --sparsity 0.25 --methods fusegpt,sleb,shortgpt,mi \
        --out-json benchmarks/compress_results.json --work /tmp/fd-bench
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

DATA = Path(os.environ.get("FUSEDEPLOY_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
EVAL_SETS = {"wikitext2": DATA / "wikitext-2" / "test.txt", "ptb": DATA / "ptb" / "test.txt"}


def evaluate(model, tokenizer) -> dict:
    from fusedeploy.data import eval_windows, tokenize
    from fusedeploy.evaluate import TorchBackend, perplexity

    out = {}
    for name, path in EVAL_SETS.items():
        windows = eval_windows(tokenize(tokenizer, path.read_text()), 512, 20)
        out[name] = round(perplexity(TorchBackend(model), windows).ppl, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default=str(DATA / "wikitext-2" / "valid.txt"))
    ap.add_argument("--sparsity", default="0.25", help="comma-separated")
    ap.add_argument("--methods", default="shortgpt,mi,sleb,fusegpt")
    ap.add_argument("--recipe", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="setting override key=value")
    ap.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    ap.add_argument("--out-json", default="benchmarks/compress_results.json")
    ap.add_argument("--work", default="/tmp/fd-compress-bench")
    ap.add_argument("--resume", action="store_true", help="continue interrupted runs from their saved state")
    ap.add_argument("--device", default="cpu", help="compression device (evaluation stays on the CPU in fp32)")
    ap.add_argument("--dtype", default=None, help="compute dtype of the compression (default: compress's, bf16 where native; float32 reproduces the fp32 records)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds; each method runs once per seed and the "
                                                  "table adds mean ± sd per method and sparsity")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusedeploy.compress import CompressJob, compress_model, load_recipe, parse_overrides
    from fusedeploy.models.loading import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    results_path = Path(args.out_json)
    results = json.loads(results_path.read_text()) if results_path.exists() else []

    def save(rec):
        results.append(rec)
        results_path.write_text(json.dumps(results, indent=2))
        print(json.dumps(rec), flush=True)

    overrides = parse_overrides(args.set)
    if args.dense:
        model, tok, _ = load_model(args.model, device="cpu", dtype="float32")
        save({"method": "dense", "sparsity": 0.0, "blocks": len(model.model.layers), **evaluate(model, tok),
              "time_s": 0.0})
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    for sparsity, method, seed in [(float(sp), m, sd) for sp in args.sparsity.split(",")
                                   for m in args.methods.split(",") for sd in seeds]:
        run_overrides = overrides if seed is None else {**overrides, "seed": seed}
        settings = load_recipe(args.recipe, run_overrides)
        out = Path(args.work) / run_name(method, sparsity, args.recipe, args.calib, run_overrides)
        load_before = os.getloadavg()[0]
        t0 = time.time()
        def progress(kind, done, total, status, t0=t0):
            if kind == "iteration":
                print(f"[{time.time() - t0:7.1f} s] {method}: {done}/{total} blocks removed {status}", flush=True)
            elif kind == "search" and done == total:
                print(f"[{time.time() - t0:7.1f} s] {method}: {done} block sets searched, {status}", flush=True)

        job = CompressJob(args.model, out, sparsity, method=method, calib=args.calib, settings=settings,
                          resume=args.resume, force=True, device=args.device, dtype=args.dtype)
        report = compress_model(job, progress=progress)
        elapsed = time.time() - t0
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(out)
        save({"method": method, "sparsity": sparsity, "recipe": args.recipe, "overrides": run_overrides,
              "seed": settings.seed, "calib": calib_label(args.calib),
              "blocks": report["blocks_after"], "removed": report["removed_blocks"], **evaluate(model, tok),
              "time_s": round(elapsed, 1), "load_before": round(load_before, 2),
              "load_after": round(os.getloadavg()[0], 2),
              "time_score_s": round(sum(r.get("time_score_s", 0) for r in report["iterations"]), 1),
              "time_distill_s": round(sum(r.get("time_distill_s", 0) for r in report["iterations"]), 1),
              "losses": [[r.get("loss_before"), r.get("loss_after")] for r in report["iterations"]],
              "device": report["device"], "compute_dtype": report["compute_dtype"],
              "memory": report["memory"],
              "fold_errors": [r["fold_error"] for r in report["iterations"] if "fold_error" in r],
              "heal": report.get("heal"),
              **({"search": {k: report["search"][k] for k in ("seed_set", "seed_kl", "best_set", "best_kl",
                                                              "evaluations", "exhausted", "time_s")}}
                 if report.get("search") else {})})
    print(render(results))
    if args.seeds:
        print(render_seeds(results))


def calib_label(calib: str) -> str:
    """The calibration source as the results name it: `wikitext-2/valid.txt`, or `self`."""
    return "/".join(Path(calib).parts[-2:])


def other_overrides(overrides: dict | None) -> list[tuple[str, str]]:
    """The overrides that make a configuration, apart from the seed that repeats it."""
    return sorted((k, str(v)) for k, v in (overrides or {}).items() if k != "seed")


def run_name(method: str, sparsity: float, recipe: str, calib: str, overrides: dict) -> str:
    """One work folder per configuration, so runs with another recipe, calibration or override never
    overwrite each other's models, and `--resume` finds the state of the same configuration."""
    parts = [method, str(sparsity), recipe, calib_label(calib).replace("/", "_")]
    parts += [f"{k}={v}" for k, v in other_overrides(overrides)]
    if "seed" in overrides:
        parts.append(f"seed{overrides['seed']}")
    return "-".join(parts)


def render_seeds(results: list[dict]) -> str:
    """Mean ± sample standard deviation over seeds, per (method, sparsity, recipe, other overrides)."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["method"] == "dense":
            continue
        rest = tuple(other_overrides(r.get("overrides")))
        groups.setdefault((r["method"], r["sparsity"], r.get("calib", "-"), r.get("recipe", "-"), rest), []).append(r)

    def ms(vals):
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.2f} ± {sd:.2f}"

    lines = ["| method | sparsity | calibration | recipe / overrides | seeds | WikiText-2 PPL | PTB PPL | "
             "compress time (s) |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for (method, sparsity, calib, recipe, rest), rs in groups.items():
        over = ", ".join(f"{k}={v}" for k, v in rest)
        lines.append(f"| {method} | {sparsity:.0%} | {calib} | {recipe}{f' ({over})' if over else ''} | "
                     f"{','.join(str(r.get('seed', '-')) for r in rs)} | {ms([r['wikitext2'] for r in rs])} | "
                     f"{ms([r['ptb'] for r in rs])} | {statistics.mean(r['time_s'] for r in rs):.0f} |")
    return "\n".join(lines)


def render(results: list[dict]) -> str:
    lines = ["| method | sparsity | recipe / overrides | blocks | removed (original numbering, in order) | "
             "WikiText-2 PPL | PTB PPL | compress time (s) | of which scoring / distillation (s) |",
             "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in results:
        over = ", ".join(f"{k}={v}" for k, v in (r.get("overrides") or {}).items())
        rec = r.get("recipe", "-") + (f" ({over})" if over else "")
        removed = ", ".join(str(b) for b in r.get("removed", [])) or "-"
        split = f"{r['time_score_s']:.0f} / {r['time_distill_s']:.0f}" if "time_score_s" in r else "-"
        lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {rec} | {r['blocks']} | {removed} | "
                     f"{r['wikitext2']:.2f} | {r['ptb']:.2f} | {r['time_s']:.0f} | {split} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
